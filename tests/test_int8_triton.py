"""The Triton int8 kernels (row quantizer, int8 GEMM, implicit-GEMM conv) against the PyTorch references.

Interpreter on CPU by default (conftest.py), CUDA with ACCEL_TEST_NO_INTERPRET=1.
"""

import pytest
import torch
import torch.nn.functional as F

from accel.quant import (
    int8_conv2d_ref,
    int8_linear_ref,
    quantize_per_image_ref,
    quantize_rows_ref,
    quantize_weight,
    sqnr,
    weight_only_linear_ref,
)
from tests.helpers import interpret_mode, kernel_device

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("poison_empty")]

if not interpret_mode() and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)

from accel.kernels import int8_conv as C  # noqa: E402
from accel.kernels import int8_matmul as Q  # noqa: E402

DEV = kernel_device()
MM_SHAPES = [(1, 1, 1), (1, 17, 33), (33, 17, 70), (129, 65, 300), (7, 130, 257), (64, 64, 64), (0, 16, 32), (5, 7, 0)]


def _ids(s):
    return "M{}-N{}-K{}".format(*s)


def _randint8(*shape, lo=-127, hi=127):
    return torch.randint(lo, hi + 1, shape, dtype=torch.int8)


# ------------------------------------------------------------------------------------ quantize_rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("qmax", [127, 63])
@pytest.mark.parametrize("shape", [(1, 1), (3, 70), (5, 300), (2, 1030)], ids=str)
def test_quantize_rows_matches_reference_exactly(shape, qmax, dtype):
    x = (torch.randn(shape) * 3).to(dtype)
    q, s = Q.quantize_rows(x.to(DEV), qmax)
    q_ref, s_ref = quantize_rows_ref(x, qmax)
    assert torch.equal(q.cpu(), q_ref)
    assert torch.equal(s.cpu(), s_ref)


def test_quantize_rows_special_rows():
    x = torch.randn(6, 40)
    x[1] = 0.0  # all zero: scale 0, q 0, never NaN
    x[2, 3] = float("nan")
    x[3, 5] = float("inf")
    x[4, 0] = float("-inf")
    q, s = Q.quantize_rows(x.to(DEV))
    q, s = q.cpu(), s.cpu()
    assert s[1] == 0 and torch.equal(q[1], torch.zeros(40, dtype=torch.int8))
    assert torch.isnan(s[2:5]).all() and not q[2:5].any()
    assert torch.isfinite(s[[0, 5]]).all()
    q_ref, s_ref = quantize_rows_ref(x)
    assert torch.equal(q, q_ref) and torch.equal(s.isnan(), s_ref.isnan())


def test_quantize_rows_ties_round_to_even_and_saturate():
    # absmax 127 -> inv = 1, so x * inv is x itself
    x = torch.tensor([[127.0, 2.5, -2.5, 1.5, -1.5, 0.5, -0.5, 3.5, 126.5]])
    q, _ = Q.quantize_rows(x.to(DEV))
    assert q.cpu().tolist() == [[127, 2, -2, 2, -2, 0, 0, 4, 126]]
    # static scale: values beyond +-127 * scale saturate
    q, s = Q.quantize_rows(torch.tensor([[1000.0, -1000.0, 0.26, -0.26]]).to(DEV), 127,
                           torch.tensor([0.5]).to(DEV))
    assert q.cpu().tolist() == [[127, -127, 1, -1]] and s.cpu().tolist() == [0.5]


def test_quantize_rows_every_config():
    x = torch.randn(3, 1500)
    q_ref, s_ref = quantize_rows_ref(x)
    for cfg in Q.gpu_quant_configs():
        q, s = Q.quantize_rows(x.to(DEV), config=cfg, one_pass=False)
        assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref), cfg


@pytest.mark.parametrize("k", [1, 70, 300, 1030])
def test_quantize_rows_one_and_two_passes_agree(k):
    """The single-pass kernel (rows up to ONE_PASS_MAX_K, held in registers) and the two-pass one give
    the reference bit for bit, special rows included."""
    x = torch.randn(6, k) * 5
    x[1] = 0.0
    x[2, k // 2] = float("nan")
    x[4, 0] = float("inf")
    q_ref, s_ref = quantize_rows_ref(x)
    for one_pass in (True, False):
        q, s = Q.quantize_rows(x.to(DEV), one_pass=one_pass)
        assert torch.equal(q.cpu(), q_ref), one_pass
        assert torch.equal(s.cpu().isnan(), s_ref.isnan()) and torch.equal(s.cpu().nan_to_num(), s_ref.nan_to_num())
    assert Q.one_pass_config(k).kwargs["BLOCK_K"] >= k
    with pytest.raises(ValueError, match="one-pass kernel needs BLOCK_K >= K"):
        Q.quantize_rows(torch.randn(2, 300).to(DEV), one_pass=True, config=Q.one_pass_config(100))


# ------------------------------------------------------------------------------------ int8_mm
@pytest.mark.parametrize("shape", MM_SHAPES, ids=_ids)
def test_int32_accumulator_is_exact(shape):
    m, n, k = shape
    a, b = _randint8(m, k), _randint8(n, k)
    c = Q.int8_mm(a.to(DEV), b.to(DEV), out_dtype=torch.int32)
    assert c.dtype == torch.int32 and c.shape == (m, n)
    assert torch.equal(c.cpu(), (a.long() @ b.long().t()).int())


def test_int32_extremes_and_layouts():
    k = 300
    a = torch.full((5, k), -128, dtype=torch.int8)
    b = torch.full((9, k), -128, dtype=torch.int8)
    c = Q.int8_mm(a.to(DEV), b.to(DEV), out_dtype=torch.int32)
    assert (c.cpu() == 16384 * k).all()
    # transposed / sliced operands give the same result as contiguous ones
    a2, b2 = _randint8(70, 40).t(), _randint8(70, 180).t()[::2]  # [40, 70] and [90, 70], both strided
    c2 = Q.int8_mm(a2.to(DEV), b2.to(DEV), out_dtype=torch.int32)
    assert torch.equal(c2.cpu(), (a2.long() @ b2.long().t()).int())


@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dequant_epilogue(activation, out_dtype):
    m, n, k = 37, 45, 100
    a, b = _randint8(m, k), _randint8(n, k)
    sa, sb = torch.rand(m) * 0.01, torch.rand(n) * 0.01
    sb[3] = 0.0  # an all-zero weight channel: output is just the bias
    sa[4] = float("nan")  # a poisoned token: its whole output row is NaN
    bias = torch.randn(n)
    y = Q.int8_mm(a.to(DEV), b.to(DEV), sa.to(DEV), sb.to(DEV), bias.to(DEV), activation=activation,
                  out_dtype=out_dtype).cpu()
    ref = int8_linear_ref(a, sa, b, sb, bias, activation)
    assert y.dtype == out_dtype
    assert torch.isnan(y[4]).all()
    keep = torch.arange(m) != 4
    tol = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-3), torch.bfloat16: (5e-2, 1e-2)}[out_dtype]
    torch.testing.assert_close(y[keep].float(), ref[keep], atol=tol[0], rtol=tol[1])
    expected_col3 = ref[keep][:, 3]
    torch.testing.assert_close(y[keep][:, 3].float(), expected_col3, atol=tol[0], rtol=tol[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 17, 33), (33, 40, 70), (65, 24, 129)], ids=_ids)
def test_weight_only(shape, dtype):
    m, n, k = shape
    x = torch.randn(m, k).to(dtype)
    b, sb, bias = _randint8(n, k), torch.rand(n) * 0.01, torch.randn(n)
    y = Q.int8_mm(x.to(DEV), b.to(DEV), None, sb.to(DEV), bias.to(DEV), activation="gelu").cpu()
    assert y.dtype == dtype
    ref = weight_only_linear_ref(x, b, sb, bias, "gelu")
    tol = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 1e-2), torch.bfloat16: (1e-1, 2e-2)}[dtype]
    torch.testing.assert_close(y.float(), ref, atol=tol[0], rtol=tol[1])


def _mm_config_id(c):
    kw = c.kwargs
    return (f"M{kw['BLOCK_M']}-N{kw['BLOCK_N']}-K{kw['BLOCK_K']}-split{kw['SPLIT_K']}-swap{kw['SWAP_AB']}"
            f"-w{c.num_warps}-s{c.num_stages}")


@pytest.mark.parametrize("cfg", Q.gpu_mm_configs(), ids=_mm_config_id)
def test_every_mm_config(cfg):
    """Each pointer-kernel config (large-M, weight-only swap-AB, small-M split-K, unaligned), forced, on
    shapes ragged against every tile: int32 exact, scaled epilogue and weight-only to the reference."""
    m, n, k = 37, 90, 200
    a, b, x = _randint8(m, k), _randint8(n, k), torch.randn(m, k)
    sa, sb, bias = torch.rand(m) * 0.01, torch.rand(n) * 0.01, torch.randn(n)
    exact = (a.long() @ b.long().t()).int()
    c = Q.int8_mm(a.to(DEV), b.to(DEV), out_dtype=torch.int32, config=cfg, impl="ptr")
    assert torch.equal(c.cpu(), exact)
    y = Q.int8_mm(a.to(DEV), b.to(DEV), sa.to(DEV), sb.to(DEV), bias.to(DEV), activation="relu", config=cfg, impl="ptr")
    torch.testing.assert_close(y.cpu(), int8_linear_ref(a, sa, b, sb, bias, "relu"), atol=1e-5, rtol=1e-5)
    w = Q.int8_mm(x.to(DEV), b.to(DEV), None, sb.to(DEV), config=cfg, impl="ptr")
    torch.testing.assert_close(w.cpu().double(), weight_only_linear_ref(x, b, sb).double(), atol=1e-4, rtol=1e-5)


NO_TMA = not interpret_mode() and torch.cuda.get_device_capability()[0] < 9


@pytest.mark.skipif(NO_TMA, reason="TMA needs sm_90+")
@pytest.mark.parametrize("cfg", Q.gpu_mm_tma_configs(), ids=_mm_config_id)
def test_every_tma_config(cfg):
    """The persistent TMA kernel (device-side tensor descriptors; out-of-bounds tiles read as zero)
    with each of its configs: same results as the pointer kernel, int32 bit for bit."""
    m, n, k = 37, 90, 208  # K a multiple of 16: TMA needs 16-byte aligned rows
    a, b, x = _randint8(m, k), _randint8(n, k), torch.randn(m, k)
    sa, sb, bias = torch.rand(m) * 0.01, torch.rand(n) * 0.01, torch.randn(n)
    c = Q.int8_mm(a.to(DEV), b.to(DEV), out_dtype=torch.int32, config=cfg, impl="tma")
    assert torch.equal(c.cpu(), (a.long() @ b.long().t()).int())
    y = Q.int8_mm(a.to(DEV), b.to(DEV), sa.to(DEV), sb.to(DEV), bias.to(DEV), activation="gelu", config=cfg, impl="tma")
    torch.testing.assert_close(y.cpu(), int8_linear_ref(a, sa, b, sb, bias, "gelu"), atol=1e-5, rtol=1e-5)
    w = Q.int8_mm(x.to(DEV), b.to(DEV), None, sb.to(DEV), bias.to(DEV), config=cfg, impl="tma")
    torch.testing.assert_close(w.cpu().double(), weight_only_linear_ref(x, b, sb, bias).double(), atol=1e-4, rtol=1e-5)


def test_tma_requires_aligned_operands():
    a, b = _randint8(4, 200), _randint8(8, 200)  # 200 bytes per row: not 16-byte aligned rows
    with pytest.raises(ValueError, match="impl='tma' needs"):
        Q.int8_mm(a.to(DEV), b.to(DEV), out_dtype=torch.int32, impl="tma")
    with pytest.raises(ValueError, match="impl must be one of"):
        Q.int8_mm(a.to(DEV), b.to(DEV), impl="cutlass")


@pytest.mark.parametrize("m", [1, 7, 16])
def test_split_k_small_m_exact_and_deterministic(m):
    """Split-K partial sums go through a workspace and a fixed-order reduction: int32 stays exact,
    float (weight-only) results are bitwise repeatable, for every split of the small-M table."""
    n, k = 70, 1000  # K ragged against the tiles: the last split is partial, some splits may be empty
    a, b, x = _randint8(m, k), _randint8(n, k), torch.randn(m, k)
    sb = torch.rand(n) * 0.01
    exact = (a.long() @ b.long().t()).int()
    ref_w = weight_only_linear_ref(x, b, sb).double()
    for cfg in (c for c in Q.gpu_mm_configs() if c.kwargs["SPLIT_K"] > 1):
        assert torch.equal(Q.int8_mm(a.to(DEV), b.to(DEV), out_dtype=torch.int32, config=cfg).cpu(), exact), cfg
        y1 = Q.int8_mm(x.to(DEV), b.to(DEV), None, sb.to(DEV), config=cfg)
        y2 = Q.int8_mm(x.to(DEV), b.to(DEV), None, sb.to(DEV), config=cfg)
        assert torch.equal(y1, y2), cfg
        torch.testing.assert_close(y1.cpu().double(), ref_w, atol=1e-4, rtol=1e-5)


def test_plan_and_config_pools():
    """Which kernel and which tile table a call gets: swap-AB/split-K configs for M <= SMALL_M, the TMA
    kernel on sm_90 with aligned operands, the narrow unaligned table otherwise; M buckets to powers of two."""
    from accel.kernels._triton import pow2_bucket

    assert [pow2_bucket(m) for m in (0, 1, 2, 3, 16, 17, 4096, 4097)] == [0, 1, 2, 4, 16, 32, 4096, 8192]
    assert Q.plan_mm(1, 4096, True, 80).kernel == "ptr"
    assert Q.plan_mm(1, 4096, True, 90).kernel == "tma"
    assert Q.plan_mm(4096, 4096, False, 90, impl="ptr").kernel == "ptr"
    assert Q.plan_mm(4096, 4100, True, 90).kernel == "ptr"  # K not a multiple of 16: no TMA
    assert not Q.plan_mm(4096, 4100, True, 90).aligned
    small = Q.mm_configs_for("ptr", 16, True, 90)
    assert small and all(c.kwargs["SWAP_AB"] == 1 and c.kwargs["BLOCK_M"] <= Q.SMALL_M for c in small)
    assert any(c.kwargs["SPLIT_K"] > 1 for c in small)
    large = Q.mm_configs_for("ptr", 4096, True, 80)
    assert large and all(c.kwargs["SWAP_AB"] == 0 and c.kwargs["SPLIT_K"] == 1 for c in large)
    assert all(c.kwargs["BLOCK_N"] < 256 for c in large)  # 128x256 spills on sm_80: sm_90 only
    assert any(c.kwargs["BLOCK_N"] == 256 for c in Q.mm_configs_for("ptr", 4096, True, 90))
    assert all(c.kwargs["SWAP_AB"] == 1 for c in Q.mm_configs_for("ptr", 4096, False, 80))
    assert Q.mm_configs_for("tma", 4096, True, 80) == []
    assert {Q._row_of(c) for c in Q.mm_configs_for("ptr", 4096, True, 90, aligned=False)} <= \
        {tuple(r[:8]) for r in Q.MM_UNALIGNED_TABLE}


def test_m_bucket_keys_the_autotuner():
    """Calls whose M falls in the same power-of-two bucket reuse one autotune entry (no retuning per
    token count); the key holds M_BUCKET, never M."""
    assert "M" not in Q._int8_mm_kernel.keys and "M_BUCKET" in Q._int8_mm_kernel.keys
    assert "M" not in Q._int8_mm_tma_kernel.keys and "M_BUCKET" in Q._int8_mm_tma_kernel.keys


def test_sqnr_of_dynamic_int8_linear_on_gaussian_data():
    x, w = torch.randn(64, 512), torch.randn(256, 512)
    wq, ws = quantize_weight(w)
    q, s = Q.quantize_rows(x.to(DEV))
    y = Q.int8_mm(q, wq.to(DEV), s, ws.to(DEV)).cpu()
    assert sqnr(x.double() @ w.double().t(), y) >= 35.0


def test_deterministic():
    a, b = torch.randn(50, 130), _randint8(70, 130)
    q, s = Q.quantize_rows(a.to(DEV))
    args = (q, b.to(DEV), s, torch.rand(70).to(DEV))
    assert torch.equal(Q.int8_mm(*args), Q.int8_mm(*args))


def test_mm_errors_name_the_values():
    a, b = _randint8(4, 64).to(DEV), _randint8(8, 64).to(DEV)
    with pytest.raises(TypeError, match="weight b must be int8, got torch.float32"):
        Q.int8_mm(a, b.float())
    with pytest.raises(TypeError, match="a must be int8 or one of .* got torch.int32"):
        Q.int8_mm(a.int(), b)
    with pytest.raises(ValueError, match=r"expected a \[M, K\] and b \[N, K\], got \(4, 64\) and \(8, 63\)"):
        Q.int8_mm(a, b[:, :63])
    with pytest.raises(ValueError, match=rf"K={Q.MAX_K + 1} exceeds {Q.MAX_K}"):
        Q.int8_mm(torch.zeros(1, Q.MAX_K + 1, dtype=torch.int8, device=DEV), torch.zeros(1, Q.MAX_K + 1,
                                                                                          dtype=torch.int8, device=DEV))
    with pytest.raises(ValueError, match="out_dtype=torch.int32 returns the raw"):
        Q.int8_mm(a, b, torch.ones(4, device=DEV), out_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"a_scale must be \[4\] float32, got \(3,\)"):
        Q.int8_mm(a, b, torch.ones(3, device=DEV))
    with pytest.raises(ValueError, match="activation must be one of"):
        Q.int8_mm(a, b, activation="silu")
    with pytest.raises(ValueError, match="a_scale applies to int8 a"):
        Q.int8_mm(a.float(), b, torch.ones(4, device=DEV))
    with pytest.raises(TypeError, match="x dtype must be one of .* got torch.int8"):
        Q.quantize_rows(a)
    with pytest.raises(ValueError, match="qmax must be in"):
        Q.quantize_rows(a.float(), 200)


# ------------------------------------------------------------------------------------ int8 conv
CONV_CASES = [
    # (B, C, H, W, O, k, stride, padding, dilation)
    (2, 5, 9, 7, 6, 3, 2, 1, 1),
    (1, 3, 8, 8, 32, 3, 1, 1, 1),  # Conv2d(3, 32): 3 input channels
    (2, 40, 6, 5, 33, 1, 1, 0, 1),
    (1, 8, 11, 11, 16, 3, 1, 2, 2),  # dilation
    (3, 16, 7, 7, 8, 5, 3, 2, 1),
]


def _conv_id(c):
    return "B{}-C{}-{}x{}-O{}-k{}-s{}-p{}-d{}".format(*c)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_id)
def test_conv_int32_exact(case, channels_last):
    b, c, h, w, o, k, s, p, d = case
    x, wt = _randint8(b, c, h, w), _randint8(o, c, k, k)
    xx = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    y = C.int8_conv2d(xx.to(DEV), wt.to(DEV), stride=s, padding=p, dilation=d, out_dtype=torch.int32).cpu()
    ref = F.conv2d(x.double(), wt.double(), stride=s, padding=p, dilation=d)
    assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y.double(), ref)


def test_conv_epilogue_and_per_image_scale():
    b, c, h, w, o = 3, 6, 8, 8, 10
    x, wt = _randint8(b, c, h, w), _randint8(o, c, 3, 3)
    sa, sw, bias = torch.rand(b) * 0.01, torch.rand(o) * 0.01, torch.randn(o)
    sa[1] = float("nan")
    y = C.int8_conv2d(x.to(DEV), wt.to(DEV), sa.to(DEV), sw.to(DEV), bias.to(DEV), 1, 1, activation="relu").cpu()
    ref = int8_conv2d_ref(x, sa, wt, sw, bias, 1, 1, activation="relu")
    assert torch.isnan(y[1]).all()
    torch.testing.assert_close(y[[0, 2]], ref[[0, 2]], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", C.gpu_conv_configs(), ids=lambda c: "M{BLOCK_M}-N{BLOCK_N}-K{BLOCK_K}".format(**c.kwargs))
def test_conv_every_config(cfg):
    """Each implicit-GEMM config, forced: channels ragged against BLOCK_K (40 = 32 + 8), padding taps,
    OHWI (channels_last) and OIHW weights."""
    x, wt = _randint8(2, 40, 9, 9), _randint8(70, 40, 3, 3)
    ref = F.conv2d(x.double(), wt.double(), padding=1, stride=(1, 2))
    for w_in in (wt, wt.contiguous(memory_format=torch.channels_last)):
        y = C.int8_conv2d(x.to(DEV).contiguous(memory_format=torch.channels_last), w_in.to(DEV), padding=1,
                          stride=(1, 2), out_dtype=torch.int32, config=cfg).cpu()
        assert torch.equal(y.double(), ref), cfg


@pytest.mark.parametrize("batch", [1, 3])
def test_conv_1x1_runs_as_a_gemm(batch):
    """A stride-1 unpadded 1x1 conv goes through int8_mm (per-image scales via A_SCALE_ROWS) and gives
    what the implicit-GEMM kernel gives; 1x1 with stride 2 stays on the conv kernel."""
    x, wt = _randint8(batch, 48, 5, 6), _randint8(20, 48, 1, 1)
    sa, sw, bias = torch.rand(batch) * 0.01, torch.rand(20) * 0.01, torch.randn(20)
    assert C.is_gemm_1x1(wt.shape, (1, 1), (0, 0)) and not C.is_gemm_1x1(wt.shape, (2, 2), (0, 0))
    args = [t.to(DEV) for t in (x, wt, sa, sw, bias)]
    y_gemm = C.int8_conv2d(*args, activation="relu", out_dtype=torch.float32).cpu()
    y_conv = C.int8_conv2d(*args, activation="relu", out_dtype=torch.float32, gemm_1x1=False).cpu()
    ref = int8_conv2d_ref(x, sa, wt, sw, bias, activation="relu")
    torch.testing.assert_close(y_gemm, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_gemm, y_conv, atol=1e-6, rtol=1e-6)
    exact = C.int8_conv2d(x.to(DEV), wt.to(DEV), out_dtype=torch.int32).cpu()
    assert torch.equal(exact.double(), F.conv2d(x.double(), wt.double()))
    y2 = C.int8_conv2d(x.to(DEV), wt.to(DEV), stride=2, out_dtype=torch.int32).cpu()
    assert torch.equal(y2.double(), F.conv2d(x.double(), wt.double(), stride=2))


def test_conv_weight_layouts_and_autotune_key():
    """The launcher reads the logical OIHW weight through its strides: channels_last (OHWI) and plain
    OIHW weights give the same exact result; the autotune key holds batch, stride and padding."""
    x, wt = _randint8(2, 32, 7, 7), _randint8(16, 32, 3, 3)
    ref = F.conv2d(x.double(), wt.double(), padding=1)
    for w_in in (wt, wt.contiguous(memory_format=torch.channels_last), wt.transpose(2, 3).contiguous().transpose(2, 3)):
        y = C.int8_conv2d(x.to(DEV), w_in.to(DEV), padding=1, out_dtype=torch.int32).cpu()
        assert torch.equal(y.double(), ref)
    for key in ("B", "SH", "SW", "PH", "PW"):
        assert key in C._int8_conv2d_kernel.keys
    assert {c.kwargs["BLOCK_K"] for c in C.conv_configs_for(3, 90)} == {32}  # C = 3 keeps the narrowest K tile
    assert all(c.kwargs["BLOCK_N"] < 256 for c in C.conv_configs_for(256, 80))


def test_conv_sqnr_on_gaussian_data():
    x, w = torch.randn(2, 16, 10, 10), torch.randn(24, 16, 3, 3)
    wq, ws = quantize_weight(w)
    xq, sx = quantize_per_image_ref(x)
    y = C.int8_conv2d(xq.to(DEV), wq.to(DEV), sx.to(DEV), ws.to(DEV), None, 1, 1).cpu()
    assert sqnr(F.conv2d(x.double(), w.double(), padding=1), y) >= 35.0


def test_conv_errors_name_the_values():
    x, wt = _randint8(1, 4, 8, 8).to(DEV), _randint8(6, 4, 3, 3).to(DEV)
    with pytest.raises(TypeError, match="must be int8, got torch.float32 and torch.int8"):
        C.int8_conv2d(x.float(), wt)
    with pytest.raises(ValueError, match=r"expects 4 input channels, x has 5 .*groups other than 1"):
        C.int8_conv2d(_randint8(1, 5, 8, 8).to(DEV), wt)
    with pytest.raises(ValueError, match=r"a_scale must be \[1\] float32 \(one per image\)"):
        C.int8_conv2d(x, wt, torch.ones(2, device=DEV))
    with pytest.raises(ValueError, match="too small for kernel 3x3"):
        C.int8_conv2d(_randint8(1, 4, 2, 2).to(DEV), wt)
