"""The native AVX-512 VNNI kernels (accel.cpu.native) behind the ``vnni`` int8 block-sparse strategy: the
quantization bit for bit against accel's eager rule, the product and epilogue bit for bit against the eager
strategies, layout checks before any raw pointer is read, and where the kernels are not offered (ISA caps,
ACCEL_COMPILE=0, a failing compiler: one logged warning, the other strategies serve)."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from accel import engines
from accel.cpu import int8 as cpu_int8
from accel.cpu import int8_bsr as cpu_int8_bsr
from accel.cpu import native
from tests.sparse_refs import bsr_from_mask, random_block_mask

pytestmark = pytest.mark.skipif(not native.int8_available(),
                                reason=f"native kernels not offered here ({native._allowed() or 'build failed'})")


def make(n, k, block, density, empty_rows=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    mask = random_block_mask(math.ceil(n / block), math.ceil(k / block), density, empty_rows, seed)
    v, crow, col = bsr_from_mask(w, block, mask)
    return v, torch.rand(n, generator=g) * 0.01 + 1e-4, crow, col, torch.randn(n, generator=g)


def eager_quantized(x, qmax, static=None):
    """accel's rule in eager steps: ``(integers, scale)`` per row (a static scale saturates at +-qmax)."""
    scale, inv = cpu_int8.act_scale_inv(x.float(), qmax, static)
    return torch.round(torch.clamp(x.float() * inv[:, None], -qmax, qmax)), scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("qmax", [63, 127])
@pytest.mark.parametrize("k", [1, 7, 16, 31, 64, 130, 1000])
def test_quantization_is_accels_rule_bit_for_bit(dtype, qmax, k):
    g = torch.Generator().manual_seed(k)
    wide = (torch.randn(9, k + 5, generator=g) * 10).to(dtype)
    x = wide[:, :k]  # rows of unit stride, not contiguous
    x[1] = 0
    x[2, k // 2] = float("nan")
    x[3, k - 1] = float("inf")
    x[4, 0] = float("-inf")
    x[5] *= 1e-30 if dtype == torch.float32 else 1e-3  # tiny values: large inverse scales
    if dtype != torch.float16:  # max |x| ~ 1e-38: qmax / max overflows to inf, and the rule's inverse is 0
        x[6] *= 1e-39
    width = math.ceil(k / 16) * 16 + 16
    u, scale = native.quantize_rows(x, qmax, width)
    v, want_scale = eager_quantized(x, qmax)
    assert torch.equal(scale.nan_to_num(-1.0), want_scale.nan_to_num(-1.0))
    finite = torch.isfinite(want_scale)
    assert torch.equal(u[finite, :k].int() - 128, v[finite].int())
    assert bool((u[:, k:] == 128).all()) and bool((u[~finite] == 128).all())
    assert torch.isnan(scale[[2, 3, 4]]).all() and scale[1] == 0


INT8_NATIVE = ["vnni"] + (["vnni_amx"] if native.int8_amx_available() else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("threads", [1, 3])
def test_static_scale_rows_saturate_as_the_eager_rule(dtype, threads):
    """quantize_rows with one fp32 static scale: the eager rule's integers (clamped to +-qmax) and scales bit for bit,
    for short rows, rows split between threads, -0.0 / 0 / negative scales; rows holding NaN/inf scale NaN, bytes 128."""
    g = torch.Generator().manual_seed(threads)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m, k in ((5, 70), (2, 70001), (9, 1)):
            x = (torch.randn(m, k, generator=g) * 4).to(dtype)
            x[1, k // 2] = float("nan")
            x[-1] = 0
            for s, qmax in ((0.02, 127), (0.5, 63), (0.0, 127), (-0.0, 127), (-0.02, 63), (1e30, 127)):
                static = torch.tensor([s])
                u, scale = native.quantize_rows(x, qmax, k + 3, static_scale=static)
                v, want = eager_quantized(x, qmax, static)
                ok = torch.isfinite(want)
                assert torch.equal(scale.nan_to_num(-1.0).view(torch.int32), want.nan_to_num(-1.0).view(torch.int32))
                assert torch.equal(u[ok, :k].int() - 128, v[ok].int()), (m, k, s, qmax)
                assert bool((u[~ok] == 128).all()) and bool((u[:, k:] == 128).all())
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("threads", [1, 3])
def test_images_quantized_into_their_padding_as_rows(dtype, threads):
    """A conv's images (channels_last, or NCHW with whole groups of 16 channels) quantized straight into the padded
    NHWC buffer: each image the integers and scale of its row of quantize_rows, the padding 128; an image holding
    NaN/inf all 128 (scale NaN), an all-zero image scale 0."""
    g = torch.Generator().manual_seed(threads)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # (the last: images of 2-4 MB, past half of any L2 here: whole images per thread)
        for n, h, w, c, ph, pw in ((3, 5, 7, 16, 1, 1), (2, 9, 4, 64, 0, 2), (1, 1, 1, 3, 3, 0), (4, 56, 11, 32, 2, 1),
                                   (2, 3, 3, 8, 0, 0), (0, 4, 4, 16, 1, 1), (2, 7, 37, 48, 1, 1),
                                   (3, 130, 120, 64, 1, 2)):
            x = (torch.randn(n, h, w, c, generator=g) * 5).to(dtype)
            if n > 1:
                x[1] = 0
                x[-1, h // 2, w - 1, c - 1] = float("nan") if n % 2 else float("-inf")
            u, want_scale = native.quantize_rows(x.reshape(n, h * w * c), 127, h * w * c)
            want = F.pad(u.view(n, h, w, c).permute(0, 3, 1, 2), (pw, pw, ph, ph), value=128).permute(0, 2, 3, 1)
            want = want.contiguous()
            cl = x.permute(0, 3, 1, 2)  # [N, C, H, W], channels_last
            for layout in (cl, cl.contiguous()) if c % 16 == 0 else (cl,):
                up, scale = native.quantize_images_padded(layout, 127, (ph, pw))
                assert up.shape == (n, h + 2 * ph, w + 2 * pw, c)
                assert torch.equal(up, want), (n, h, w, c, ph, pw, layout.is_contiguous())
                assert torch.equal(scale.nan_to_num(-1.0), want_scale.nan_to_num(-1.0))
                # static scales: x * 50 saturates at +-qmax; -0.0 is +0.0 in the rule (its poison + s)
                for s, qmax in ((0.02, 127), (3e-3, 63), (0.0, 127), (-0.0, 127), (-0.02, 63)):
                    static = torch.tensor([s])
                    v, ss = eager_quantized(x.reshape(n, h * w * c), qmax, static)
                    us = (v.nan_to_num(0.0) + 128).to(torch.uint8)
                    ws = F.pad(us.view(n, h, w, c).permute(0, 3, 1, 2), (pw, pw, ph, ph), value=128).permute(0, 2, 3, 1)
                    up, scale = native.quantize_images_padded(layout, qmax, (ph, pw), static)
                    ok = torch.isfinite(ss)  # (the eager bytes of an image holding NaN/inf are undefined; its scale NaN)
                    assert torch.equal(up[ok], ws[ok]), (n, h, w, c, s, qmax)
                    assert torch.equal(scale.nan_to_num(-1.0).view(torch.int32), ss.float().nan_to_num(-1.0).view(torch.int32))
                    assert bool((up[~ok] == 128).all())
    finally:
        torch.set_num_threads(old)
    with pytest.raises(ValueError, match="quantize_images_padded"):  # NCHW with channels not in groups of 16
        native.quantize_images_padded(torch.randn(2, 8, 4, 4), 127, (1, 1))
    with pytest.raises(ValueError, match="quantize_images_padded"):
        native.quantize_images_padded(torch.randn(2, 16, 4, 4).transpose(2, 3), 127, (1, 1))


@pytest.mark.parametrize("strategy", INT8_NATIVE)
@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("m", [1, 4, 8, 9, 16, 17, 33, 70])
def test_vnni_strategy_equals_the_eager_strategies(block, m, strategy):
    """Same integers, same epilogue order: equal to the ``rows`` strategy (int32 GEMMs + the eager epilogue) bit for
    bit before the activation, with N and K not multiples of the block, an empty block row, with and without bias,
    every activation."""
    n, k = 3 * block - 5, 2 * block + 7
    v, ws, crow, col, bias = make(n, k, block, 0.6, (1,))
    x = torch.randn(m, k) * 3
    other = "rows" if "rows" in cpu_int8_bsr.strategies(127) else "float"
    for b in (bias, None):
        for activation in ("none", "relu", "gelu"):
            y = cpu_int8_bsr.int8_bsr_linear_cpu(x, v, ws, crow, col, n, b, activation, 127, strategy)
            want = cpu_int8_bsr.int8_bsr_linear_cpu(x, v, ws, crow, col, n, b, activation, 127, other)
            assert y.shape == (m, n) and y.is_contiguous()
            if other == "rows" and activation != "gelu":
                assert torch.equal(y, want), (b is None, activation)
            else:  # (torch's gelu rounds differently on strided and contiguous outputs: the eager one is strided)
                torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("strategy", INT8_NATIVE)
def test_sums_beyond_fp32_integers_and_huge_scales(strategy):
    """-128 weights times -127 activations at K = 4096 (sums near 2**26: int32, wrapping uint8 sums corrected),
    and tokens whose scale passes 2**96 (the epilogue in fp64): equal to the eager epilogue."""
    n, k, bs = 64, 4096, 32
    v, ws, crow, col, _ = make(n, k, bs, 0.5)
    v.fill_(-128)
    x = -torch.ones(5, k)
    x[2] *= 1e33  # scale ~ 8e30 > 2**96
    y = cpu_int8_bsr.int8_bsr_linear_cpu(x, v, ws, crow, col, n, None, "none", 127, strategy)
    q, scale = eager_quantized(x, 127)
    acc = q.double() @ cpu_int8_bsr_dense(v, crow, col, n, k).t()
    want = cpu_int8_bsr.epilogue(acc.to(torch.int32), scale, ws, None, "none", torch.float32)
    assert torch.equal(y, want) and bool(torch.isfinite(y).all())


def assert_same_bf16(y, want):
    """The same bits, NaNs aside (PyTorch's own conversion writes NaN as 0x7FC0 or 0xFFFF depending on its path)."""
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(y), nan)
    assert torch.equal(y[~nan].view(torch.int16), want[~nan].view(torch.int16))


@pytest.mark.parametrize("strategy", INT8_NATIVE)
@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
def test_bf16_layers_get_the_fp32_result_rounded_once(strategy, activation):
    """bf16 activations: the kernel stores bf16 itself (none) or fp32 for the activation (relu, gelu); either way the
    bits of the fp32 layer's result on the same values, activated, then converted, including NaN rows, a zero row,
    tokens with a scale past 2**96 (fp64 rows), tiny results (relu of -0.0 / +0.0; denormals in all outputs or in half
    of each pair of output groups the AMX epilogue rounds together) and exact bf16 rounding ties."""
    n, k, bs = 70, 200, 32
    v, ws, crow, col, bias = make(n, k, bs, 0.6, (1,))
    x = (torch.randn(9, k) * 3).bfloat16()
    x[2, 5] = float("nan")
    x[3] = 0
    x[4] *= 1e33
    half = torch.where(torch.arange(n) % 32 < 16, 1e-43, ws)  # tiny results in one half of each 32 outputs
    for b, w_scale in ((bias, ws), (None, ws), (None, torch.full_like(ws, 1e-43)), (bias, half)):
        y = cpu_int8_bsr.int8_bsr_linear_cpu(x, v, w_scale, crow, col, n, b, activation, 127, strategy)
        want = cpu_int8_bsr.int8_bsr_linear_cpu(x.float(), v, w_scale, crow, col, n, b, activation, 127, strategy)
        assert y.dtype == torch.bfloat16 and y.is_contiguous()
        assert_same_bf16(y, want.bfloat16())
    # exact ties: integer sums 2**8 + odd (and times 2**100 in an fp64 row) round to even in bf16
    ties = torch.tensor([257, 259, 385, 771, -257, 513])
    wt = torch.zeros(32, 32, dtype=torch.int8)
    a = torch.round(ties / 127)
    wt[:ties.numel(), 0], wt[:ties.numel(), 1] = a.to(torch.int8), (ties - 127 * a).to(torch.int8)
    xt = torch.zeros(2, 32)
    xt[:, :2] = torch.tensor([127.0, 1.0])  # (scale 1 and 2**100: the integers 127, 1)
    xt[1] *= 2.0 ** 100
    sums = (xt[0].double() @ wt.double().t())[:ties.numel()]
    assert bool((sums.float().bfloat16().float() != sums.float()).all())  # (really ties)
    yt = cpu_int8_bsr.int8_bsr_linear_cpu(xt.bfloat16(), wt[None], torch.ones(32), torch.tensor([0, 1]),
                                          torch.tensor([0]), 32, None, "none", 127, strategy)
    want = cpu_int8_bsr.int8_bsr_linear_cpu(xt, wt[None], torch.ones(32), torch.tensor([0, 1]), torch.tensor([0]),
                                            32, None, "none", 127, strategy)
    assert torch.equal(want[0, :ties.numel()].double(), sums)
    assert_same_bf16(yt, want.bfloat16())
    u, scale = native.quantize_rows(x, 127, 224, spread=True)
    w = native.pack(v, crow, col)
    ones = torch.ones(n)
    for out in (torch.float32, torch.bfloat16):  # the raw kernel: every output dtype it takes, and no other
        y = native.int8_bsr_linear(u, w, scale, ones, None, n, strategy == "vnni_amx", out_dtype=out)
        assert y.dtype == out
    with pytest.raises(ValueError, match="out_dtype"):
        native.int8_bsr_linear(u, w, scale, ones, None, n, strategy == "vnni_amx", out_dtype=torch.float16)


@pytest.mark.parametrize("m", [1, 3])
def test_spread_rows_and_long_rows_quantize_alike(m):
    """Rows spread an odd number of cache lines apart hold the same bytes; rows long enough to be split between
    threads (one image of a conv) get the same integers and scales as whole rows."""
    for width in (1, 64, 100, 4096):
        ld = native.spread_stride(width)
        assert ld >= width and ld % 64 == 0 and (ld // 64) % 2 == 1
    x = torch.randn(m, 4096) * 2
    u, s = native.quantize_rows(x, 127, 4096)
    u, s = u.clone(), s.clone()
    us, ss = native.quantize_rows(x, 127, 4096, spread=True)
    assert us.shape == (m, 4096) and us.stride(0) == native.spread_stride(4096)
    assert torch.equal(us, u) and torch.equal(ss, s)
    long = torch.randn(m, 70001) * 5
    long[0, 123] = float("inf")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(threads, 2))
        ul, sl = native.quantize_rows(long, 63, 70016)
    finally:
        torch.set_num_threads(threads)
    q, want = eager_quantized(long, 63)
    assert torch.equal(sl.nan_to_num(-1.0), want.nan_to_num(-1.0))
    ok = torch.isfinite(want)
    assert torch.equal(ul[ok, :70001].int() - 128, q[ok].int()) and bool((ul[0] == 128).all())
    assert bool((ul[:, 70001:] == 128).all())


def cpu_int8_bsr_dense(v, crow, col, n, k):
    from accel.formats import bsr_to_dense

    return bsr_to_dense(v.double(), crow, col, (n, k))


@pytest.mark.parametrize("strategy", INT8_NATIVE)
def test_thread_counts_agree(strategy):
    v, ws, crow, col, bias = make(200, 300, 32, 0.4, (2,))
    x = torch.randn(37, 300)
    threads = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(cpu_int8_bsr.int8_bsr_linear_cpu(x, v, ws, crow, col, 200, bias, "none", 127, strategy))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_bad_operands_raise_before_the_kernel_reads_them():
    v, ws, crow, col, bias = make(64, 96, 32, 0.5)
    w = native.pack(v, crow, col)
    u, scale = native.quantize_rows(torch.randn(3, 96), 127, 96)
    with pytest.raises(ValueError, match=r"expected int8/uint8 u \[M, >= 96\]"):
        native.int8_bsr_linear(u[:, :64], w, scale, ws, bias, 64)
    with pytest.raises(ValueError, match="w_scale torch.float32 \\(10,\\)"):
        native.int8_bsr_linear(u, w, scale, ws[:10], bias, 64)
    with pytest.raises(ValueError, match="n 65"):
        native.int8_bsr_linear(u, w, scale, torch.ones(65), None, 65)
    with pytest.raises(ValueError, match="u torch.float32"):
        native.int8_bsr_linear(u.float(), w, scale, ws, bias, 64)
    with pytest.raises(ValueError, match="x torch.float64"):
        native.quantize_rows(torch.randn(3, 96).double(), 127, 96)
    with pytest.raises(ValueError, match="width 90"):
        native.quantize_rows(torch.randn(3, 96), 127, 90)
    with pytest.raises(ValueError, match="strides \\(1, 3\\)"):
        native.quantize_rows(torch.randn(96, 3).t(), 127, 96)
    bad = crow.clone()
    bad[-1] += 1
    with pytest.raises(ValueError, match="not a BSR int8 weight"):
        native.pack(v, bad, col)
    with pytest.raises(ValueError, match="not a BSR int8 weight"):
        native.pack(v.float(), crow, col)


def test_offered_only_where_allowed(accel_env):
    """ISA caps below VNNI and ACCEL_COMPILE=0 take the strategy away (the op then runs the others); below AMX, the
    AMX product."""
    assert "vnni" in cpu_int8_bsr.strategies(127) and cpu_int8_bsr.default_strategy(127, 16) == "vnni"
    if native.int8_amx_available():
        accel_env(ACCEL_CPU_ISA="avx512_vnni")
        assert native.int8_available() and not native.int8_amx_available()
        assert "vnni" in cpu_int8_bsr.strategies(127) and "vnni_amx" not in cpu_int8_bsr.strategies(127)
        u, scale = native.quantize_rows(torch.randn(2, 64), 127, 64)
        v, ws, crow, col, _ = make(32, 64, 32, 1.0)
        with pytest.raises(RuntimeError, match="AMX product is not available"):
            native.int8_bsr_linear(u, native.pack(v, crow, col), scale, ws, None, 32, amx=True)
        accel_env(ACCEL_CPU_ISA=None)
    for env in ({"ACCEL_CPU_ISA": "avx512"}, {"ACCEL_COMPILE": "0"}):
        accel_env(**env)
        assert not native.int8_available() and "vnni" not in cpu_int8_bsr.strategies(127), env
        assert native._allowed()
        accel_env(ACCEL_CPU_ISA=None, ACCEL_COMPILE=None)
    assert native.int8_available()


def test_a_failing_compiler_is_one_warning_and_no_strategy(accel_env, monkeypatch, tmp_path, accel_log):
    try:
        monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
        accel_env(ACCEL_CACHE_DIR=str(tmp_path))
        assert not native.int8_available() and "vnni" not in cpu_int8_bsr.strategies(127)
        assert len([m for m in accel_log if "native kernel int8_bsr_vnni is off" in m]) == 1
        v, ws, crow, col, bias = make(64, 96, 32, 0.5)
        with pytest.raises(RuntimeError, match="int8_bsr_vnni is not available here"):
            native.int8_bsr_linear(torch.zeros(2, 96, dtype=torch.uint8), native.pack(v, crow, col), torch.ones(2), ws,
                                   bias, 64)
    finally:
        monkeypatch.delenv("CXX")
        accel_env(ACCEL_CACHE_DIR=None)
    assert native.int8_available()


def test_the_library_is_built_once_into_the_cache(accel_env, tmp_path):
    accel_env(ACCEL_CACHE_DIR=str(tmp_path))
    assert native.int8_available()
    built = sorted((tmp_path / "native").glob("*.so"))
    assert len(built) == 1 and (tmp_path / "native" / (built[0].name + ".sha1")).exists()
    mtime = built[0].stat().st_mtime_ns
    native._library.cache_clear()
    native._LOADED.clear()  # (a new process: the file on disk is loaded, not rebuilt)
    assert native.int8_available() and built[0].stat().st_mtime_ns == mtime
    # a damaged file (a truncated copy) is rebuilt, not loaded (loading it would kill the process with SIGBUS)
    data = built[0].read_bytes()
    damaged = tmp_path / "damaged.so"
    damaged.write_bytes(data[:1000])
    os.replace(damaged, built[0])  # (a new file: truncating the one this process has mapped would kill it)
    native._library.cache_clear()
    native._LOADED.clear()
    assert native.int8_available() and built[0].read_bytes() != data[:1000]


def test_a_cpu_without_the_instructions_is_not_offered_them(accel_env, monkeypatch):
    monkeypatch.setattr(engines, "_cpu_flags", lambda: {"avx2", "avx512f", "avx512bw"})
    accel_env()
    assert not native.int8_available() and "lacks ['avx512vl', 'avx512_vnni', 'f16c']" in native._allowed()
    assert "vnni" not in cpu_int8_bsr.strategies(127)


# ------------------------------------------------------------------------------------------------ float kernels
from accel.formats import bsr_to_dense  # noqa: E402
from accel.ops import bsr_conv as ops_conv  # noqa: E402
from accel.ops.bsr_linear import bsr_linear  # noqa: E402

FLOAT_DTYPES = [d for d in (torch.float32, torch.bfloat16) if native.float_available(d)]


def float_weight(o, k, block, density, empty_rows=(), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mask = random_block_mask(math.ceil(o / block), math.ceil(k / block), density, empty_rows, seed)
    v, crow, col = bsr_from_mask(torch.randn(o, k, generator=g).to(dtype), block, mask)
    return v, crow, col


def conv_reference(x, v, crow, col, weight_shape, bias, stride, padding, dilation):
    o, c, kh, kw = weight_shape
    nbr, nbc = crow.numel() - 1, math.ceil(kh * kw * c / v.shape[1])
    dense = bsr_to_dense(v.double(), crow, col, (nbr * v.shape[1], nbc * v.shape[1]))[:o, :kh * kw * c]
    w = dense.reshape(o, kh, kw, c).permute(0, 3, 1, 2)
    return torch.nn.functional.conv2d(x.double(), w, None if bias is None else bias.double(), stride, padding, dilation)


def rel_err(y, ref):
    return float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("geometry", [
    # (C, O, H, W, KH, KW, stride, padding, dilation, block, N)
    (32, 45, 9, 7, 3, 3, (1, 1), (1, 1), (1, 1), 16, 2),
    (64, 64, 8, 8, 3, 3, (2, 2), (1, 1), (1, 1), 32, 1),
    (64, 96, 11, 6, 5, 1, (1, 2), (2, 0), (1, 1), 32, 3),
    (128, 70, 7, 7, 1, 1, (1, 1), (0, 0), (1, 1), 64, 2),
    (128, 128, 9, 9, 3, 3, (1, 1), (2, 2), (2, 2), 128, 1),
    (32, 32, 4, 4, 3, 3, (1, 1), (3, 3), (1, 1), 32, 1),  # padding past the kernel: rows of bias only
])
def test_native_conv_matches_pytorchs_conv(dtype, geometry):
    c, o, h, w, kh, kw, stride, padding, dilation, bs, n = geometry
    v, crow, col = float_weight(o, kh * kw * c, bs, 0.4, (1,) if o > bs else (), dtype=dtype)
    bias = torch.randn(o).to(dtype)
    x = torch.randn(n, c, h, w).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for xin in (x, x.contiguous(memory_format=torch.channels_last)):
        for b in (bias, None):
            y = ops_conv.run_cpu("native", xin, v, crow, col, (o, c, kh, kw), b, stride, padding, dilation)
            ref = conv_reference(x, v, crow, col, (o, c, kh, kw), b, stride, padding, dilation)
            fmt = torch.contiguous_format if xin is x else torch.channels_last  # (nn.Conv2d's: NCHW stored natively)
            assert y.shape == ref.shape and y.dtype == dtype and y.is_contiguous(memory_format=fmt)
            assert rel_err(y, ref) < tol


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 7, 8, 9, 100])
def test_native_linear_matches_dense(dtype, m):
    n, k, bs = 200, 256, 32
    v, crow, col = float_weight(n, k, bs, 0.3, (2,), dtype=dtype)
    bias = torch.randn(n).to(dtype)
    x = torch.randn(m, k).to(dtype)
    with engines.force(bsr_linear="native"):
        y = bsr_linear(x, v, crow, col, (n, k), bias)
    ref = torch.nn.functional.linear(x.double(), bsr_to_dense(v.double(), crow, col, (n, k)), bias.double())
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.skipif(torch.bfloat16 not in FLOAT_DTYPES, reason="no AVX512_BF16 here")
def test_bf16_outputs_round_like_pytorch():
    """Identity blocks: the fp32 sum is the input itself, so the output is ``(x + bias)`` rounded to bf16 once, which
    must be PyTorch's conversion bit for bit (round to nearest even over 67 decades, NaN). (No infinities: inf * 0
    in a pair of products is NaN; vdpbf16ps reads denormal inputs as zeros.)"""
    bs, k = 32, 64
    eye = torch.eye(bs).repeat(2, 1, 1)
    crow, col = torch.tensor([0, 1, 2]), torch.tensor([0, 1])
    x = (torch.randn(50, k) * torch.logspace(-30, 37, 50)[:, None]).bfloat16()
    x[3, 5] = float("nan")
    bias = torch.randn(k) * 1e-3
    w = native.pack_float(eye, crow, col, 2, torch.bfloat16)
    y = native.bsr_linear(x, w, bias, k)
    want = (x.float() + bias).bfloat16()
    want[3] = float("nan")  # NaN * 0 in the identity block, and the whole row: as in a dense product
    assert torch.equal(y.view(torch.int16), want.view(torch.int16))


def test_float_kernels_offered_only_where_they_run(accel_env, monkeypatch):
    assert not native.float_available(torch.float16) and not native.float_available(torch.float64)
    assert "native" not in ops_conv.cpu_engines(48, 32, torch.float32, False)  # C % B != 0
    assert "native" in ops_conv.cpu_engines(64, 32, torch.float32, False)
    accel_env(ACCEL_CPU_ISA="avx2")
    assert not native.float_available(torch.float32) and "native" not in ops_conv.cpu_engines(64, 32, torch.float32,
                                                                                               False)
    accel_env(ACCEL_CPU_ISA=None)
    flags = engines._cpu_flags() - {"avx512_bf16"}
    monkeypatch.setattr(engines, "_cpu_flags", lambda: flags)
    accel_env()
    assert native.float_available(torch.float32) and not native.float_available(torch.bfloat16)


def test_float_operands_are_checked(monkeypatch):
    v, crow, col = float_weight(64, 96, 32, 0.5)
    with pytest.raises(ValueError, match="padding"):
        native.bsr_conv2d(torch.randn(1, 32, 5, 5), native.pack_float(*float_weight(32, 288, 32, 0.5), 9, torch.float32),
                          (32, 32, 3, 3), None, (1, 1), (-1, 0), (1, 1))
    wb = native.pack_float(v, crow, col, 3, torch.bfloat16)
    monkeypatch.setattr(engines, "_cpu_flags", lambda: set())  # a CPU without AVX512_BF16: an error, not SIGILL
    with pytest.raises(ValueError, match="needs AVX512_BF16"):
        native.bsr_linear(torch.randn(2, 96).bfloat16(), wb, None, 64)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="not a BSR weight"):
        native.pack_float(v, crow, col, 2, torch.float32)  # a column index past 2 block columns
    w = native.pack_float(v, crow, col, 3, torch.float32)
    with pytest.raises(ValueError, match="x torch.bfloat16"):
        native.bsr_linear(torch.randn(2, 96).bfloat16(), w, None, 64)
    with pytest.raises(ValueError, match="out_features 65"):
        native.bsr_linear(torch.randn(2, 96), w, None, 65)
    with pytest.raises(ValueError, match="bias"):
        native.bsr_linear(torch.randn(2, 96), w, torch.randn(64).double(), 64)
    wc = native.pack_float(*float_weight(32, 288, 32, 0.5), 9, torch.float32)
    run = native.conv_runner(wc, (32, 32, 3, 3), None, (1, 1), (1, 1), (1, 1), torch.randn(1, 32, 5, 5), "native")
    for bad, what in ((torch.randn(1, 64, 5, 5), r"x torch.float32 \(1, 64, 5, 5\)"),
                      (torch.randn(1, 32, 5, 5).double(), "x torch.float64"), (torch.randn(32, 5, 5), r"\(32, 5, 5\)")):
        with pytest.raises(ValueError, match=what):
            run(bad)
    with pytest.raises(ValueError, match="smaller than the dilated 3x3 kernel"):
        native.conv_runner(wc, (32, 32, 3, 3), None, (2, 2), (0, 0), (1, 1), torch.randn(1, 32, 5, 5), "native")(
            torch.randn(1, 32, 2, 5))  # (one row short: a floor division would give an empty output)
    with pytest.raises(ValueError, match="unknown engine 'amx'"):
        native.conv_runner(wc, (32, 32, 3, 3), None, (1, 1), (1, 1), (1, 1), torch.randn(1, 32, 5, 5), "amx")
    with pytest.raises(ValueError, match="must be bfloat16"):
        native.conv_runner(wc, (32, 32, 3, 3), None, (1, 1), (1, 1), (1, 1), torch.randn(1, 32, 5, 5), "native_amx")


def test_nonfinite_inputs_poison_like_the_dense_conv():
    c, o, bs = 32, 32, 32
    v, crow, col = float_weight(o, 9 * c, bs, 0.3)
    x = torch.randn(1, c, 6, 6)
    x[0, 3, 2, 2] = float("nan")
    y = ops_conv.run_cpu("native", x, v, crow, col, (o, c, 3, 3), None, (1, 1), (1, 1), (1, 1))
    ref = torch.nn.functional.conv2d(x, bsr_to_dense(v, crow, col, (o, 9 * c)).view(o, 3, 3, c).permute(0, 3, 1, 2),
                                     None, 1, 1)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_conv_finds_every_nonfinite_pixel_its_windows_read(threads):
    """The float kernel scans the input rows as it reads them (each thread its own): a NaN/inf anywhere a window reads
    (first or last row, any image, a thread's first or last pixels) poisons exactly the dense conv's outputs; one in a
    row no window reads (stride 2) poisons none."""
    c, o, bs = 32, 40, 32
    v, crow, col = float_weight(o, 9 * c, bs, 0.3)
    w = bsr_to_dense(v, crow, col, (2 * bs, 9 * c))[:o].view(o, 3, 3, c).permute(0, 3, 1, 2)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, hw, stride, padding, at in ((3, 9, 1, 1, (0, 0, 0)), (3, 9, 1, 1, (2, 8, 8)), (3, 9, 1, 0, (1, 4, 0)),
                                           (2, 12, 2, 0, (1, 11, 5)), (2, 12, 2, 0, (0, 6, 3)), (4, 5, 1, 1, (3, 2, 4))):
            x = torch.randn(n, c, hw, hw)
            x[at[0], 7, at[1], at[2]] = float("inf") if at[1] % 2 else float("nan")
            ref = torch.nn.functional.conv2d(x, w, None, stride, padding)
            for xin in (x, x.contiguous(memory_format=torch.channels_last)):
                y = ops_conv.run_cpu("native", xin, v, crow, col, (o, c, 3, 3), None, (stride, stride),
                                     (padding, padding), (1, 1))
                assert torch.equal(~y.isfinite(), ~ref.isfinite()), (n, hw, stride, padding, at)
    finally:
        torch.set_num_threads(old)


# ------------------------------------------------------------------------------------------------ AMX kernel
AMX = native.amx_available()


@pytest.mark.skipif(not AMX, reason="no AMX bf16 kernel here")
@pytest.mark.parametrize("geometry", [
    # (C, O, H, W, KH, KW, stride, padding, dilation, block, N)
    (32, 45, 9, 7, 3, 3, (1, 1), (1, 1), (1, 1), 16, 2),
    (64, 64, 8, 40, 3, 3, (2, 2), (1, 1), (1, 1), 32, 1),
    (64, 96, 11, 17, 5, 1, (1, 2), (2, 0), (1, 1), 32, 3),
    (128, 70, 7, 33, 1, 1, (1, 1), (0, 0), (1, 1), 64, 2),
    (64, 128, 9, 9, 3, 3, (1, 1), (2, 2), (2, 2), 64, 1),
    (32, 32, 4, 4, 3, 3, (1, 1), (3, 3), (1, 1), 32, 1),  # padding past the kernel: rows of bias only
    # windows reaching into the left and right padding (a 12-pixel row: one group), all of a group, and a 50-pixel
    # row whose second chunk has its first group read in place and its second staged
    (16, 20, 5, 35, 3, 5, (1, 3), (1, 4), (1, 2), 16, 2),
    (32, 24, 4, 50, 3, 3, (1, 1), (1, 1), (1, 1), 32, 1),
    (128, 64, 3, 20, 3, 3, (2, 1), (2, 9), (1, 3), 128, 1),
    (64, 32, 6, 3, 3, 3, (1, 1), (1, 20), (1, 1), 64, 2),
])
def test_amx_conv_matches_pytorchs_conv(geometry):
    """Both AMX engines (x read in place, its padding never stored; and on a padded copy) against PyTorch's conv, and
    bit for bit against each other (the padding's products are exact zeros)."""
    c, o, h, w, kh, kw, stride, padding, dilation, bs, n = geometry
    v, crow, col = float_weight(o, kh * kw * c, bs, 0.4, (1,) if o > bs else (), dtype=torch.bfloat16)
    bias = torch.randn(o).bfloat16()
    x = torch.randn(n, c, h, w).bfloat16()
    for xin in (x, x.contiguous(memory_format=torch.channels_last)):
        for b in (bias, None):
            ref = conv_reference(x, v, crow, col, (o, c, kh, kw), b, stride, padding, dilation)
            ys = [ops_conv.run_cpu(e, xin, v, crow, col, (o, c, kh, kw), b, stride, padding, dilation)
                  for e in ("native_amx", "native_amx_padded")]
            for y in ys:
                assert y.shape == ref.shape and y.dtype == torch.bfloat16
                assert y.is_contiguous(memory_format=torch.channels_last) and rel_err(y, ref) < 1e-2
            assert torch.equal(ys[0].view(torch.int16), ys[1].view(torch.int16))


@pytest.mark.skipif(not AMX, reason="no AMX bf16 kernel here")
@pytest.mark.parametrize("m", [1, 15, 16, 17, 33, 100])
def test_amx_linear_matches_dense(m):
    n, k, bs = 200, 256, 32
    v, crow, col = float_weight(n, k, bs, 0.3, (2,), dtype=torch.bfloat16)
    bias = torch.randn(n).bfloat16()
    x = torch.randn(m, k).bfloat16()
    with engines.force(bsr_linear="native_amx"):
        y = bsr_linear(x, v, crow, col, (n, k), bias)
    ref = torch.nn.functional.linear(x.double(), bsr_to_dense(v.double(), crow, col, (n, k)), bias.double())
    assert y.dtype == torch.bfloat16 and y.shape == (m, n) and rel_err(y, ref) < 1e-2


@pytest.mark.skipif(not AMX, reason="no AMX bf16 kernel here")
@pytest.mark.parametrize("bs", [16, 32])
def test_amx_rounds_outputs_as_pytorch(bs):
    """The AMX kernel's bf16 outputs are PyTorch's rounding of the fp32 sum + bias, bit for bit, also where its one-
    instruction rounding would differ: denormal results (sum and bias nearly cancelling) in the first 16 outputs of
    each 32 (block 32: rows of 32 outputs converted together, so the normal half takes the exact path too), and a
    last block row of 16 outputs."""
    n, k = 80, 2 * bs
    tiny = torch.finfo(torch.float32).tiny
    low = torch.arange(n) % 32 < 16
    w = torch.zeros(n, k)
    w[:, 0] = torch.linspace(1, 3, n) * torch.where(low, tiny, 1.0)  # x[:, 0] = 1: the fp32 sum is w[:, 0]
    w[:, 1] = torch.linspace(-2, 2, n)
    w = w.bfloat16()
    bias = torch.where(low, -(w[:, 0].float() * torch.linspace(0.5, 1.0, n)), 0.5).bfloat16()  # low: denormal sums
    nbr = -(-n // bs)
    wp = torch.zeros(nbr * bs, k, dtype=torch.bfloat16)
    wp[:n] = w
    crow = torch.arange(nbr + 1) * 2
    col = torch.tensor([0, 1] * nbr)
    values = torch.stack([wp[r * bs:(r + 1) * bs, c * bs:(c + 1) * bs] for r in range(nbr) for c in range(2)])
    x = torch.zeros(20, k)
    x[:10, 0] = 1  # rows of denormal outputs
    x[10:, 1] = torch.linspace(-3, 3, 10) * (1 + 2 ** -7)  # rows of normal ones (products of 16 significant bits)
    x = x.bfloat16()
    run = native.linear_runner(native.pack_float(values, crow, col, 2, torch.bfloat16), bias.float(), n, x, amx=True)
    want = (x.float() @ w.float().T + bias.float()).bfloat16()  # (each fp32 sum exact: at most two products)
    got = run(x)
    assert ((want.float().abs() < tiny) & (want != 0)).sum() > 100  # (denormals reached)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.skipif(not AMX, reason="no AMX bf16 kernel here")
def test_amx_offered_only_for_bf16_on_amx(accel_env):
    assert {"native_amx", "native_amx_padded"} <= set(ops_conv.cpu_engines(64, 32, torch.bfloat16, False))
    assert "native_amx" not in ops_conv.cpu_engines(64, 32, torch.float32, False)
    assert ops_linear_strategies(torch.zeros(2, 64, dtype=torch.bfloat16), 32)[-1] == "native_amx"
    accel_env(ACCEL_CPU_ISA="avx512_vnni")
    assert not native.amx_available() and not {"native_amx", "native_amx_padded"} & set(
        ops_conv.cpu_engines(64, 32, torch.bfloat16, False))
    assert native.float_available(torch.bfloat16)  # (the AVX-512 kernel stays)
    with pytest.raises(ValueError, match="x must be bfloat16"):
        native.bsr_linear(torch.zeros(2, 64), native.pack_float(*float_weight(64, 64, 32, 0.5), 2, torch.float32),
                          None, 64, amx=True)


def ops_linear_strategies(x, bs):
    import importlib

    return importlib.import_module("accel.ops.bsr_linear").native_strategies(x, bs)


TILE_ENGINES = [e for e, amx in cpu_int8.TILE_ENGINES.items() if not amx or native.int8_amx_available()]


@pytest.mark.parametrize("engine", TILE_ENGINES)
def test_tile_dense_int8_engines(engine, accel_env):
    """The dense int8 Linear engines ``amx_tiles`` and ``vnni_tiles`` (the weight as dense 64 x 64 blocks for the
    native kernel): the same integers as the reference for odd shapes, bf16 in and out, dynamic and static scales, the
    other engines' epilogue order (the same bits); gone below their ISA."""
    from accel.quant import quantize_weight

    for m, n, k in ((1, 70, 33), (17, 64, 300), (40, 130, 128)):
        x, w, bias = torch.randn(m, k) * 3, torch.randn(n, k), torch.randn(n)
        wq, ws = quantize_weight(w)
        for static in (None, torch.tensor([0.03])):
            want = cpu_int8.linear_int8_reference(x, wq, ws, bias, "relu", static, 127)
            y = cpu_int8.linear_int8_cpu(x, wq, ws, bias, "relu", static, 127, engine)
            torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
        yb = cpu_int8.linear_int8_cpu(x.bfloat16(), wq, ws, bias, "none", None, 127, engine)
        assert yb.dtype == torch.bfloat16
        want = cpu_int8.linear_int8_reference(x.bfloat16(), wq, ws, bias, "none", None, 127)
        torch.testing.assert_close(yb.float(), want.bfloat16().float(), rtol=1e-2, atol=1e-2 * float(want.abs().max()))
        for act in ("relu", "gelu"):  # (bf16 stored by the kernel only without an activation)
            yb = cpu_int8.linear_int8_cpu(x.bfloat16(), wq, ws, bias, act, None, 127, engine)
            want = cpu_int8.linear_int8_cpu(x.bfloat16().float(), wq, ws, bias, act, None, 127, engine)
            assert_same_bf16(yb, want.bfloat16())
        if "int_mm" in cpu_int8.exact_engines(127, k):  # the dense engines' epilogue order: the same bits
            for static in (None, torch.tensor([1e30])):  # (a huge scale: no fp64 rows in this order)
                y = cpu_int8.linear_int8_cpu(x, wq, ws, bias, "none", static, 127, engine)
                assert torch.equal(y, cpu_int8.linear_int8_cpu(x, wq, ws, bias, "none", static, 127, "int_mm"))
    accel_env(ACCEL_CPU_ISA="avx512_vnni" if engine == "amx_tiles" else "avx2")
    assert engine not in cpu_int8.exact_engines(127)
    with pytest.raises(ValueError, match="not exact"):
        cpu_int8.linear_int8_cpu(torch.randn(2, 64), *quantize_weight(torch.randn(8, 64)), engine=engine)


@pytest.mark.skipif(not AMX, reason="no AMX kernels here")
@pytest.mark.parametrize("geometry", [
    # (C, O, H, W, K, stride, padding, dilation, N)
    (16, 20, 7, 9, 3, (1, 1), (1, 1), (1, 1), 2),
    (32, 64, 9, 40, 3, (2, 1), (1, 2), (1, 1), 1),
    (64, 70, 8, 8, 1, (1, 1), (0, 0), (1, 1), 3),
    (128, 32, 6, 17, 3, (1, 2), (2, 2), (2, 2), 1),
    # the padding (never stored) past the kernel: windows all zero point, pixel groups of 33-pixel rows reaching in
    (32, 40, 3, 20, 3, (1, 1), (3, 9), (1, 1), 2),
    (64, 16, 5, 33, 3, (2, 1), (1, 1), (1, 1), 1),
])
def test_amx_tiles_int8_conv_equals_the_eager_engine(geometry):
    """The same integers and the same epilogue order as the eager im2col engine: equal bit for bit (fp32), for
    dynamic and static scales, channels_last and NCHW inputs; bf16 inputs rounded once."""
    from accel.quant import quantize_weight

    c, o, h, w, k, stride, padding, dilation, n = geometry
    wq, ws = quantize_weight(torch.randn(o, c, k, k))
    bias = torch.randn(o)
    x = torch.randn(n, c, h, w) * 2
    eager = "im2col" if "im2col" in cpu_int8.conv_engines(127) else "im2col_split"  # (a oneDNN cap: 2 x 7 bits)
    for xin in (x, x.contiguous(memory_format=torch.channels_last)):
        for static in (None, torch.tensor([0.02])):
            args = (wq, ws, bias, stride, padding, dilation, "relu", static, 127)
            y = cpu_int8.conv2d_int8_cpu(xin, *args, engine="amx_tiles")
            want = cpu_int8.conv2d_int8_cpu(xin, *args, engine=eager)
            assert y.is_contiguous(memory_format=torch.channels_last)
            if eager == "im2col":
                assert torch.equal(y, want)
            else:  # (two 7-bit passes, summed: another fp32 rounding)
                torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
    yb = cpu_int8.conv2d_int8_cpu(x.bfloat16(), wq, ws, bias, stride, padding, dilation, "none", None, 127,
                                  engine="amx_tiles")
    wb = cpu_int8.conv2d_int8_cpu(x.bfloat16(), wq, ws, bias, stride, padding, dilation, "none", None, 127,
                                  engine=eager)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), wb.float(), rtol=1e-2 if eager != "im2col" else 0, atol=0 if eager == "im2col"
                               else 1e-2 * float(wb.abs().max()))
    for act in ("none", "relu"):  # bf16 stored by the kernel (none) or after the fp32 activation: the fp32 bits
        xb = x.bfloat16()
        xb[0, 0, 0, 0] = float("nan")
        yb = cpu_int8.conv2d_int8_cpu(xb, wq, ws, bias, stride, padding, dilation, act, None, 127, engine="amx_tiles")
        want = cpu_int8.conv2d_int8_cpu(xb.float(), wq, ws, bias, stride, padding, dilation, act, None, 127,
                                        engine="amx_tiles")
        assert yb.is_contiguous(memory_format=torch.channels_last) and bool(torch.isnan(yb[0]).all())
        assert_same_bf16(yb, want.bfloat16())


@pytest.mark.skipif(not AMX, reason="no AMX kernels here")
def test_amx_tiles_int8_conv_needs_whole_channel_blocks():
    from accel.quant import quantize_weight

    wq, ws = quantize_weight(torch.randn(8, 24, 3, 3))
    with pytest.raises(ValueError, match="whole blocks of 16, got C=24"):
        cpu_int8.conv2d_int8_cpu(torch.randn(1, 24, 5, 5), wq, ws, engine="amx_tiles")
    assert not cpu_int8.amx_conv_ok(24) and cpu_int8.amx_conv_ok(48)


@pytest.mark.skipif(not native.scan_available(), reason="no native float library here")
def test_nchw_copy_of_channels_last_outputs():
    """The native NHWC -> NCHW copy (and back) gives Tensor.contiguous's bits (fp32, bf16, fp16) for odd sizes (pixel
    and channel tails, NaN/inf); small tensors and other layouts are not its; as_conv_output takes it for a large
    plain output in an eager call, and keeps PyTorch's copy for one with autograd history (the gradient), under
    tracing (the traced function's values), forward-mode AD (the tangent) and for a subclass (its type)."""
    from accel.ops._dispatch import as_conv_output

    for shape in ((2, 40, 60, 60), (1, 17, 123, 131), (3, 16, 6000, 1), (1, 300, 30, 30)):
        for dtype, bits in ((torch.float32, torch.int32), (torch.bfloat16, torch.int16), (torch.float16, torch.int16)):
            y = torch.randn(*shape).to(dtype).contiguous(memory_format=torch.channels_last)
            y[0, -1, -1, -1], y[-1, 0, 0, 0] = float("nan"), float("-inf")
            z = native.to_nchw(y)
            assert z.dtype == dtype and z.is_contiguous(), (shape, dtype)
            assert torch.equal(z.view(bits), y.contiguous().view(bits)), (shape, dtype)
            back = native.to_nhwc(z)  # (the other direction)
            assert back.is_contiguous(memory_format=torch.channels_last) and torch.equal(back.view(bits), y.view(bits))
    assert native.to_nchw(torch.randn(1, 3, 4, 4).contiguous(memory_format=torch.channels_last)) is None
    with pytest.raises(ValueError, match="to_nchw"):
        native.to_nchw(torch.randn(2, 40, 60, 60))
    with pytest.raises(ValueError, match="to_nhwc"):
        native.to_nhwc(torch.randn(2, 40, 60, 60).contiguous(memory_format=torch.channels_last))
    x = torch.randn(2, 8, 60, 60)  # an NCHW input: an NCHW output
    y = torch.randn(2, 40, 60, 60).contiguous(memory_format=torch.channels_last)
    out = as_conv_output(y, x)
    assert out.is_contiguous() and torch.equal(out, y)
    yg = y.clone().requires_grad_()
    out = as_conv_output(yg * 2, x)
    assert out.is_contiguous() and out.grad_fn is not None
    out.sum().backward()
    assert torch.equal(yg.grad, torch.full_like(y, 2.0))
    # not under tracing (the trace would keep the empty output, not the native write), forward-mode AD or a subclass
    y2 = torch.randn_like(y)
    with torch.no_grad():
        traced = torch.jit.trace(lambda v: as_conv_output(v * 1.0, x), (y,), check_trace=False)
    assert torch.equal(traced(y2), y2.contiguous())
    import torch.autograd.forward_ad as fwad

    with torch.no_grad(), fwad.dual_level():
        out = as_conv_output(fwad.make_dual(y, torch.ones_like(y)), x)
        tangent = fwad.unpack_dual(out).tangent
        assert tangent is not None and torch.equal(tangent, torch.ones(y.shape)) and torch.equal(out, y)

    class Sub(torch.Tensor):
        pass

    out = as_conv_output(y.as_subclass(Sub), x)
    assert type(out) is Sub and out.is_contiguous() and torch.equal(out.as_subclass(torch.Tensor), y)


@pytest.mark.skipif(not native.scan_available(), reason="no native float library here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nonfinite_scan_and_rows_like_dense(dtype):
    """The scan finds a NaN/inf anywhere (vector body and tail, first and last row) and nothing in finite extremes;
    the native linear makes every finite output of such a row NaN, as the dense layer does."""
    for m, k in ((1, 4096), (3, 17), (70, 1000)):
        x = torch.randn(m, k).to(dtype)
        assert not native.any_nonfinite(x) and not native.any_nonfinite(torch.full((m, k), 3e38).to(dtype))
        for v in (float("nan"), float("inf"), float("-inf")):
            for pos in ((0, 0), (m - 1, k - 1), (m // 2, k // 2)):
                y = x.clone()
                y[pos] = v
                assert native.any_nonfinite(y), (m, k, v, pos)
                assert native.any_nonfinite(y[:, :k])  # (rows of unit stride, not contiguous: the same)
    with pytest.raises(ValueError, match="any_nonfinite"):
        native.any_nonfinite(torch.randn(4, 8).t())
    bs, n, k = 32, 70, 96
    keep = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 1, 1]], dtype=torch.bool)
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), keep.sum(1).cumsum(0)])
    col = keep.nonzero()[:, 1].contiguous()
    values = torch.randn(col.numel(), bs, bs)
    w = native.pack_float(values, crow, col, 3, dtype)
    x = torch.randn(5, k).to(dtype)
    x[1, 40] = float("inf")  # a column only pruned blocks read: the sparse product alone would miss it
    x[3, 2] = float("nan")
    from accel.formats import bsr_to_dense
    dense = bsr_to_dense(values.to(dtype).float(), crow, col, (96, k))[:n]
    want = x.float() @ dense.t()
    run = native.linear_runner(w, None, n, x, amx=False)
    y = run(x)
    assert not bool(torch.isfinite(y[[1, 3]]).any()) and bool(torch.isfinite(y[[0, 2, 4]]).all())
    assert torch.equal(torch.isnan(y[1]), torch.isnan(want[1]))  # (inf where the dense sum is inf, NaN elsewhere)
    ok = want[[0, 2, 4]]
    torch.testing.assert_close(y[[0, 2, 4]].float(), ok, rtol=2e-2, atol=2e-2 * float(ok.abs().max()))
    with pytest.raises(ValueError, match="bsr_linear"):
        run(torch.randn(5, k + 1).to(dtype))
    with pytest.raises(ValueError, match="bsr_linear"):
        run(torch.randn(5, k, dtype=torch.float16))


@pytest.mark.skipif(not AMX, reason="no AMX kernels here")
@pytest.mark.parametrize("padded", [False, True])
def test_amx_conv_reports_nonfinite_inputs(padded):
    """The AMX conv says whether x holds NaN/inf (any pixel, any channel, first and last image; channels_last or not,
    padded or not), and its output does not depend on the input's layout."""
    bs, c, o = 32, 64, 40
    keep = torch.rand(2, 9 * c // bs) < 0.5
    keep[:, 0] = True
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), keep.sum(1).cumsum(0)])
    col = keep.nonzero()[:, 1].contiguous()
    w_values = torch.randn(col.numel(), bs, bs).bfloat16()
    w = native.pack_float(w_values, crow, col, 9 * c // bs, torch.bfloat16)
    x = torch.randn(3, c, 7, 5).bfloat16().contiguous(memory_format=torch.channels_last)
    for padding in ((1, 1), (2, 0), (0, 3), (0, 0)):
        y, bad = native.bsr_conv2d_amx_scanned(x, w, (o, c, 3, 3), None, (1, 1), padding, (1, 1), padded)
        assert bad is False
        assert torch.equal(y, native.bsr_conv2d_amx(x.contiguous(), w, (o, c, 3, 3), None, (1, 1), padding, (1, 1),
                                                    padded))
        for pos in ((0, 0, 0, 0), (2, c - 1, 6, 4), (1, 17, 3, 2)):
            xb = x.clone()
            xb[pos] = float("inf") if pos[0] == 1 else float("nan")
            for xin in (xb, xb.contiguous()):
                assert native.bsr_conv2d_amx_scanned(xin, w, (o, c, 3, 3), None, (1, 1), padding, (1, 1),
                                                     padded)[1] is True
    # a NaN in the last row, which no window of stride 3 reads (the padded copy scans all of x): no output changes
    xb = x.clone()
    xb[1, 5, 6, 2] = float("nan")
    y, bad = native.bsr_conv2d_amx_scanned(xb, w, (o, c, 3, 3), None, (3, 1), (0, 1), (1, 1), padded)
    assert bad is padded
    assert torch.equal(y, native.bsr_conv2d_amx(x, w, (o, c, 3, 3), None, (3, 1), (0, 1), (1, 1)))
    assert torch.equal(y, ops_conv.run_cpu("native_amx_padded" if padded else "native_amx", xb, w_values, crow, col,
                                           (o, c, 3, 3), None, (3, 1), (0, 1), (1, 1)))
