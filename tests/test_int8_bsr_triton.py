"""The Triton int8 block-sparse matmul against the exact PyTorch reference.

Runs in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set by conftest.py), or on a GPU
with ``ACCEL_TEST_NO_INTERPRET=1``. In the interpreter the autotuner holds one config, so
``test_every_config`` forces each entry of the GPU tables in turn. Outputs are NaN-poisoned
(``poison_empty``), so an unwritten tile fails.
"""

import math

import pytest
import torch
import triton

from tests.helpers import interpret_mode, kernel_device
from tests.sparse_refs import bsr_from_mask, int8_bsr_mm_ref, random_block_mask

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("poison_empty")]

if not interpret_mode() and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)

from accel.kernels import int8_bsr_matmul as I  # noqa: E402

DEV = kernel_device()


def make_weight(n, k, block, density, empty_rows=(), seed=0):
    """A random int8 ``[n, k]`` weight in BSR: (values_q, crow, col) on the kernel device."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    mask = random_block_mask(math.ceil(n / block), math.ceil(k / block), density, empty_rows, seed)
    return bsr_from_mask(w, block, mask)


def randint8(*shape):
    return torch.randint(-128, 128, shape, dtype=torch.int8)


def run(x_q, x_scale, v, w_scale, crow, col, n, bias=None, **kw):
    dev = [None if t is None else t.to(DEV) for t in (x_q, x_scale, v, w_scale, crow, col, bias)]
    return I.int8_bsr_mm(*dev[:6], n, dev[6], **kw).cpu()


CASES = [
    # (M, N, K, block, density, empty block rows)
    (1, 64, 64, 16, 0.5, ()),
    (7, 100, 70, 32, 0.5, (0,)),
    (129, 96, 130, 32, 0.7, (2,)),
    (33, 17, 70, 16, 1.0, ()),  # 0% sparsity, N and K not multiples of B
    (5, 130, 200, 64, 0.5, (1,)),
    (3, 40, 300, 128, 1.0, ()),
    (16, 64, 96, 32, 0.0, ()),  # 100% sparsity: bias / zeros only
    (0, 64, 64, 32, 0.5, ()),
    (20, 0, 64, 32, 0.5, ()),
    (5, 40, 0, 32, 0.5, ()),  # K = 0: no block columns, the bias alone
]


def _id(c):
    return "M{}-N{}-K{}-B{}-d{}-e{}".format(*c[:5], len(c[5]))


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_int32_output_is_exact(case):
    m, n, k, block, density, empty = case
    v, crow, col = make_weight(n, k, block, density, empty)
    x = randint8(m, k)
    y = run(x, None, v, None, crow, col, n, out_dtype=torch.int32)
    assert y.dtype == torch.int32 and y.shape == (m, n)
    assert torch.equal(y, int8_bsr_mm_ref(x, None, v, None, crow, col, n, out_dtype=torch.int32))


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_fused_epilogue_matches_reference(case):
    m, n, k, block, density, empty = case
    v, crow, col = make_weight(n, k, block, density, empty)
    x = randint8(m, k)
    xs, ws, bias = torch.rand(m) * 0.02 + 1e-3, torch.rand(n) * 0.02 + 1e-3, torch.randn(n)
    y = run(x, xs, v, ws, crow, col, n, bias, activation="relu")
    ref = int8_bsr_mm_ref(x, xs, v, ws, crow, col, n, bias, activation="relu")
    # same fp32 operations in the same order on the exact integer accumulator: bit-equal in the interpreter;
    # a GPU build contracts the epilogue's multiply-add into an FMA (one rounding fewer than eager torch),
    # seen on an H200 as up to 2 ulp of the largest output
    if interpret_mode():
        torch.testing.assert_close(y, ref, atol=0, rtol=0)
    else:
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=4 * torch.finfo(torch.float32).eps * ref.abs().max().item())


@pytest.mark.parametrize("block", I.SUPPORTED_BLOCK_SIZES)
def test_every_config(block):
    """Each config of the block size's GPU table (and the interpreter's), forced, on ragged shapes: M
    below and above 16, several block rows (split over programs when BLOCK_N < B; ROWS > 1 tiles per
    program), an empty block row, rows whose block count is not a multiple of the K step's blocks."""
    n, k = 2 * block + 5, 5 * block - 3
    v, crow, col = make_weight(n, k, block, 0.6, empty_rows=(1,), seed=block)
    xs_all = [randint8(m, k) for m in (7, 37)]
    ws, bias = torch.rand(n) * 0.01, torch.randn(n)
    configs = I.configs_for_block(block) + [I._config(*I.INTERPRET_CONFIG)]
    for x in xs_all:
        ref_i = int8_bsr_mm_ref(x, None, v, None, crow, col, n, out_dtype=torch.int32)
        xs = torch.rand(x.shape[0]) * 0.01
        ref_f = int8_bsr_mm_ref(x, xs, v, ws, crow, col, n, bias, activation="gelu")
        for cfg in configs:
            y = run(x, None, v, None, crow, col, n, out_dtype=torch.int32, config=cfg)
            assert torch.equal(y, ref_i), cfg
            y = run(x, xs, v, ws, crow, col, n, bias, activation="gelu", config=cfg)
            torch.testing.assert_close(y, ref_f, atol=1e-5, rtol=1e-5, msg=str(cfg))


@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_out_dtypes_and_activations(out_dtype, activation):
    n, k, m = 96, 160, 9
    v, crow, col = make_weight(n, k, 32, 0.5)
    x = randint8(m, k)
    xs, ws = torch.rand(m) * 0.01, torch.rand(n) * 0.01
    bias = torch.randn(n).to(torch.float16)  # any float bias dtype, added in fp32
    y = run(x, xs, v, ws, crow, col, n, bias, activation=activation, out_dtype=out_dtype)
    assert y.dtype == out_dtype
    ref = int8_bsr_mm_ref(x, xs, v, ws, crow, col, n, bias, activation=activation)
    tol = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-3), torch.bfloat16: (5e-2, 1e-2)}[out_dtype]
    torch.testing.assert_close(y.float(), ref, atol=tol[0], rtol=tol[1])


@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
def test_nan_scale_rows_give_nan_rows(activation):
    n, k, m = 64, 96, 6
    v, crow, col = make_weight(n, k, 32, 0.5)
    x = randint8(m, k)
    xs = torch.rand(m) * 0.01
    xs[[1, 4]] = float("nan")
    ws = torch.rand(n) * 0.01
    ws[3] = 0.0  # a pruned-to-zero channel scales to 0, not NaN
    bias = torch.randn(n)
    y = run(x, xs, v, ws, crow, col, n, bias, activation=activation)
    ref = int8_bsr_mm_ref(x, xs, v, ws, crow, col, n, bias, activation)
    assert torch.isnan(y[[1, 4]]).all() and torch.isnan(ref[[1, 4]]).all()
    keep = [0, 2, 3, 5]
    assert torch.isfinite(y[keep]).all()
    torch.testing.assert_close(y[keep], ref[keep], atol=1e-5, rtol=1e-5)
    assert torch.equal(y[keep][:, 3], bias[3].expand(4) if activation == "none" else ref[keep][:, 3])


def test_int32_accumulator_extremes():
    """-128 * -128 everywhere: 16384 * K, exact (K = 1024 here; int32 holds it up to MAX_K)."""
    n, k = 32, 1024
    v = torch.full((k // 32, 32, 32), -128, dtype=torch.int8)
    crow = torch.tensor([0, k // 32])
    col = torch.arange(k // 32)
    x = torch.full((3, k), -128, dtype=torch.int8)
    y = run(x, None, v, None, crow, col, n, out_dtype=torch.int32)
    assert torch.equal(y, torch.full((3, n), 16384 * k, dtype=torch.int32))
    assert I.MAX_K * 16384 < 2**31


def test_noncontiguous_x_int32_indices_and_unsorted_columns():
    n, k, block = 64, 96, 32
    v, crow, col = make_weight(n, k, block, 1.0)
    # reverse the block order inside each row: the kernel must not assume sorted columns
    order = torch.cat([torch.arange(int(crow[r + 1]) - 1, int(crow[r]) - 1, -1) for r in range(crow.numel() - 1)])
    v, col = v[order].contiguous(), col[order]
    x = randint8(k, 40).t()[::3]  # [14, 96], strides (3, 40)
    ref = int8_bsr_mm_ref(x, None, v, None, crow, col, n, out_dtype=torch.int32)
    y = run(x, None, v, None, crow.int(), col.int(), n, out_dtype=torch.int32)
    assert torch.equal(y, ref)


def test_deterministic():
    v, crow, col = make_weight(96, 130, 32, 0.5)
    x, xs, ws = randint8(50, 130), torch.rand(50), torch.rand(96)
    assert torch.equal(run(x, xs, v, ws, crow, col, 96), run(x, xs, v, ws, crow, col, 96))


def test_autotune_key_is_bucketed_and_pruned():
    assert [I.m_bucket(m) for m in (0, 1, 16, 17, 100, 129, 4096)] == [16, 16, 16, 32, 128, 256, 4096]
    for bs in I.SUPPORTED_BLOCK_SIZES:
        table = I.configs_for_block(bs)
        small = I.prune_for(bs, 16, I.gpu_configs())
        assert small and all(c.kwargs["BLOCK_M"] <= 16 and c.kwargs["SWAP"] for c in small)
        big = I.prune_for(bs, 4096, I.gpu_configs())
        assert {I._key(c) for c in big} == {I._key(c) for c in table if not c.kwargs["SWAP"]}
        assert I.prune_for(bs, 64, I.gpu_configs())  # never empty
        # the autotuner's hook reads BS from the keyword constexprs and M_BUCKET from the positional sizes
        assert I._prune(I.gpu_configs(), {"M_BUCKET": 16}, BS=bs) == small


def _errors_args():
    v, crow, col = make_weight(64, 64, 32, 0.5)
    x = randint8(4, 64)
    return [t.to(DEV) for t in (x, torch.rand(4), v, torch.rand(64), crow, col)]


def test_errors_name_the_values():
    x, xs, v, ws, crow, col = _errors_args()
    with pytest.raises(TypeError, match="x_q must be int8, got torch.float32"):
        I.int8_bsr_mm(x.float(), xs, v, ws, crow, col, 64)
    with pytest.raises(TypeError, match="values_q must be int8, got torch.float16"):
        I.int8_bsr_mm(x, xs, v.half(), ws, crow, col, 64)
    with pytest.raises(TypeError, match="col_indices must be int32 or int64, got torch.float32"):
        I.int8_bsr_mm(x, xs, v, ws, crow, col.float(), 64)
    with pytest.raises(ValueError, match=r"x_q must be 2-D \[M, K\], got shape \(1, 4, 64\)"):
        I.int8_bsr_mm(x[None], xs, v, ws, crow, col, 64)
    with pytest.raises(ValueError, match="block size must be one of .* got 8"):
        I.int8_bsr_mm(x, xs, torch.zeros(2, 8, 8, dtype=torch.int8, device=DEV), ws, crow, col, 64)
    with pytest.raises(ValueError, match=r"values_q must be \[nnz, B, B\], got shape \(\d+, 32, 16\)"):
        I.int8_bsr_mm(x, xs, v[:, :, :16], ws, crow, col, 64)
    with pytest.raises(ValueError, match=r"crow_indices has 2 block rows, expected ceil\(100/32\)"):
        I.int8_bsr_mm(x, xs, v, torch.rand(100, device=DEV), crow, col, 100)
    with pytest.raises(ValueError, match="col_indices has .* entries but values_q holds"):
        I.int8_bsr_mm(x, xs, v, ws, crow, col[:-1], 64)
    with pytest.raises(ValueError, match=r"x_scale must be \[4\] float32, got \(3,\)"):
        I.int8_bsr_mm(x, xs[:3], v, ws, crow, col, 64)
    with pytest.raises(ValueError, match=r"w_scale must be \[64\] float32, got \(64,\) torch.float64"):
        I.int8_bsr_mm(x, xs, v, ws.double(), crow, col, 64)
    with pytest.raises(ValueError, match=r"bias must be a float \[64\], got \(63,\)"):
        I.int8_bsr_mm(x, xs, v, ws, crow, col, 64, torch.rand(63, device=DEV))
    with pytest.raises(ValueError, match="activation must be one of"):
        I.int8_bsr_mm(x, xs, v, ws, crow, col, 64, activation="silu")
    with pytest.raises(TypeError, match="out_dtype must be torch.int32 or one of"):
        I.int8_bsr_mm(x, xs, v, ws, crow, col, 64, out_dtype=torch.int64)
    with pytest.raises(ValueError, match="out_dtype=torch.int32 returns the raw int32 accumulator"):
        I.int8_bsr_mm(x, xs, v, ws, crow, col, 64, out_dtype=torch.int32)
    with pytest.raises(ValueError, match=f"K={I.MAX_K + 1} exceeds {I.MAX_K}"):
        I.int8_bsr_mm(torch.zeros(1, I.MAX_K + 1, dtype=torch.int8, device=DEV), None, v, None, crow, col, 64,
                      out_dtype=torch.int32)
    with pytest.raises(ValueError, match="BLOCK_K=16 is below 32"):
        I.int8_bsr_mm(x, xs, v, ws, crow, col, 64, config=I._config(16, 16, 16, 0, 1, 4, 1))
    with pytest.raises(ValueError, match="BLOCK_N=64 must not exceed the block size 32"):
        I.int8_bsr_mm(x, xs, v, ws, crow, col, 64, config=I._config(16, 64, 32, 0, 1, 4, 1))
    with pytest.raises(ValueError, match="BLOCK_M=24 must be a power of two"):
        I.int8_bsr_mm(x, xs, v, ws, crow, col, 64, config=I._config(24, 32, 32, 0, 1, 4, 1))
    with pytest.raises(ValueError, match="config lacks"):
        I.int8_bsr_mm(x, xs, v, ws, crow, col, 64, config=triton.Config({"BLOCK_M": 16}))
    with pytest.raises(ValueError, match="needs CUDA tensors .* got device meta"):
        I.int8_bsr_mm(*(t.to("meta") for t in (x, xs, v, ws, crow, col)), 64)
