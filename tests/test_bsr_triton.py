"""The Triton block-sparse kernels against the float64 reference.

Runs in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set by conftest.py), or on a
GPU with ``ACCEL_TEST_NO_INTERPRET=1``. In the interpreter the autotuner holds one config, so
``test_every_config`` forces each entry of the GPU tables in turn.
"""

import math

import pytest
import torch
import triton

from accel.formats import bsr_row_indices, bsr_transpose_structure
from tests.helpers import assert_close_dtype, interpret_mode, kernel_device, random_bsr, reference_linear

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("poison_empty")]

if not interpret_mode() and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)

from accel.kernels import bsr_matmul as K  # noqa: E402

DEV = kernel_device()

CASES = [
    # (M, N, K, block, sparsity, empty block rows)
    (1, 64, 64, 16, 0.5, ()),
    (7, 100, 70, 32, 0.5, (0,)),
    (129, 96, 130, 32, 0.3, (2,)),
    (33, 17, 70, 16, 0.0, ()),
    (5, 130, 200, 64, 0.5, (1,)),
    (3, 40, 40, 128, 0.0, ()),
    (16, 64, 96, 32, 1.0, ()),
    (0, 64, 64, 32, 0.5, ()),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _id(c):
    return "M{}-N{}-K{}-B{}-s{}-e{}".format(*c[:5], len(c[5]))


def _to(bsr, dtype):
    return bsr.values.to(DEV, dtype), bsr.crow_indices.to(DEV), bsr.col_indices.to(DEV)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward(case):
    m, n, k, block, sparsity, empty = case
    bsr = random_bsr(n, k, block, sparsity, empty_rows=empty)
    x, bias = torch.randn(m, k), torch.randn(n)
    y = K.bsr_dense_mm(x.to(DEV), *_to(bsr, torch.float32), n, bias.to(DEV))
    assert y.shape == (m, n)
    assert_close_dtype(y.cpu(), reference_linear(x, bsr, bias), torch.float32, k)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_dtypes(dtype):
    n, k = 96, 80
    bsr = random_bsr(n, k, 32, 0.5)
    x = torch.randn(20, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    y = K.bsr_dense_mm(x.to(DEV), *_to(bsr, dtype), n, bias.to(DEV))
    assert y.dtype == dtype
    ref = reference_linear(x, bsr_cast(bsr, dtype), bias)
    assert_close_dtype(y.cpu(), ref, dtype, k)


def bsr_cast(bsr, dtype):
    """The weight as the kernel sees it after rounding to ``dtype``."""
    from accel.formats import BSRMatrix

    return BSRMatrix(bsr.values.to(dtype), bsr.crow_indices, bsr.col_indices, bsr.shape, bsr.block_size)


def test_noncontiguous_x_and_int32_indices():
    bsr = random_bsr(64, 48, 16, 0.5)
    x = torch.randn(48, 30).t()[::2]  # [15, 48], strides (2, 30)
    v, crow, col = _to(bsr, torch.float32)
    y = K.bsr_dense_mm(x.to(DEV), v, crow.int(), col.int(), 64)
    assert_close_dtype(y.cpu(), reference_linear(x, bsr), torch.float32, 48)


@pytest.mark.parametrize("block", [16, 32, 64, 128])
def test_every_config(block):
    """Each forward and SDDMM config of the GPU tables, forced, on a ragged shape."""
    m, n, k = 37, 2 * block + 5, 3 * block - 3
    bsr = random_bsr(n, k, block, 0.4)
    x, dy = torch.randn(m, k), torch.randn(m, n)
    ref = reference_linear(x, bsr)
    args = _to(bsr, torch.float32)
    for cfg in K.fwd_configs_for_block(block, K.gpu_fwd_configs()):
        y = K.bsr_dense_mm(x.to(DEV), *args, n, config=cfg)
        assert_close_dtype(y.cpu(), ref, torch.float32, k)
    rows = bsr_row_indices(bsr.crow_indices, bsr.col_indices)
    ref_dv = K_sddmm_reference(dy, x, rows, bsr.col_indices, block)
    for cfg in K.sddmm_configs_for_block(block, K.gpu_sddmm_configs()):
        dv = K.bsr_sddmm(dy.to(DEV), x.to(DEV), rows.to(DEV), bsr.col_indices.to(DEV), block, config=cfg)
        torch.testing.assert_close(dv.cpu().double(), ref_dv, atol=1e-4, rtol=1e-4)


def K_sddmm_reference(dy, x, rows, cols, block):
    m, n = dy.shape
    k = x.shape[1]
    nbr, nbc = math.ceil(n / block), math.ceil(k / block)
    full = torch.nn.functional.pad(dy.double().t() @ x.double(), (0, nbc * block - k, 0, nbr * block - n))
    return full.view(nbr, block, nbc, block).transpose(1, 2)[rows, cols]


def test_transposed_blocks_give_dx():
    n, k, block = 100, 70, 32
    bsr = random_bsr(n, k, block, 0.5, empty_rows=(1,))
    dy = torch.randn(9, n)
    crow_t, col_t, bidx = bsr_transpose_structure(bsr.crow_indices, bsr.col_indices, math.ceil(k / block))
    dx = K.bsr_dense_mm(dy.to(DEV), bsr.values.to(DEV), crow_t.to(DEV), col_t.to(DEV), k,
                        blocks_transposed=True, block_index=bidx.to(DEV))
    assert_close_dtype(dx.cpu(), dy.double() @ bsr.to_dense().double(), torch.float32, n)


@pytest.mark.parametrize("m", [1, 40, 0])
def test_sddmm(m):
    n, k, block = 100, 70, 32
    bsr = random_bsr(n, k, block, 0.5)
    dy, x = torch.randn(m, n), torch.randn(m, k)
    rows = bsr_row_indices(bsr.crow_indices, bsr.col_indices)
    dv = K.bsr_sddmm(dy.to(DEV), x.to(DEV), rows.to(DEV), bsr.col_indices.to(DEV), block)
    torch.testing.assert_close(dv.cpu().double(), K_sddmm_reference(dy, x, rows, bsr.col_indices, block),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_sddmm_groups_of_a_row(group):
    """SDDMM programs take up to ``group`` consecutive blocks of one row and share its dY tile: every
    block is covered once, in any block order, and the work list needs no host synchronisation."""
    n, k, block = 150, 130, 16
    bsr = random_bsr(n, k, block, 0.4, empty_rows=(1, 3))
    rows = bsr_row_indices(bsr.crow_indices, bsr.col_indices)
    start, grow, count = K.sddmm_groups(rows, math.ceil(n / block), group, sorted_rows=True)
    covered = torch.cat([torch.arange(s, s + c) for s, c in zip(start.tolist(), count.tolist()) if c > 0])
    assert torch.equal(covered, torch.arange(rows.numel())) and int(count.max()) <= group
    assert all(bool((rows[s:s + c] == r).all()) for s, r, c in zip(start.tolist(), grow.tolist(), count.tolist()) if c)
    dy, x = torch.randn(37, n), torch.randn(37, k)
    perm = torch.randperm(rows.numel())  # blocks in any order: runs of equal rows are grouped
    dv = K.bsr_sddmm(dy.to(DEV), x.to(DEV), rows[perm].to(DEV), bsr.col_indices[perm].to(DEV), block, group=group)
    torch.testing.assert_close(dv.cpu().double(), K_sddmm_reference(dy, x, rows[perm], bsr.col_indices[perm], block),
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="group must be 1, 2 or 4"):
        K.bsr_sddmm(dy.to(DEV), x.to(DEV), rows.to(DEV), bsr.col_indices.to(DEV), block, group=3)


def test_fp32_is_ieee_unless_tf32_allowed():
    """Without allow_tf32 the fp32 result is IEEE-accurate (tf32 would be off by ~1e-3 relative)."""
    bsr = random_bsr(64, 256, 32, 0.0)
    x = torch.randn(16, 256)
    y = K.bsr_dense_mm(x.to(DEV), *_to(bsr, torch.float32), 64)
    torch.testing.assert_close(y.cpu().double(), reference_linear(x, bsr), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("swap", [0, 1])
def test_rows_longer_than_a_column_chunk(swap):
    """Block rows of more than COL_CHUNK blocks: the column indices arrive in several vector loads."""
    k = 16 * (2 * K.COL_CHUNK + 11)
    bsr = random_bsr(50, k, 16, 0.05, empty_rows=(1,))
    assert (bsr.crow_indices[1:] - bsr.crow_indices[:-1]).max() > K.COL_CHUNK
    x = torch.randn(9, k)
    for cfg in K.fwd_configs_for_block(16, m_bucket=8 if swap else 4096)[:3]:
        y = K.bsr_dense_mm(x.to(DEV), *_to(bsr, torch.float32), 50, config=cfg)
        assert_close_dtype(y.cpu(), reference_linear(x, bsr), torch.float32, k)


def test_split_rows_are_deterministic():
    """SPLIT > 1 writes per-split fp32 partial sums that a second kernel adds in a fixed order: two runs
    are bitwise equal, and equal the reference."""
    bsr = random_bsr(96, 640, 32, 0.3, empty_rows=(0,))
    x, bias = torch.randn(3, 640), torch.randn(96)
    for cfg in (c for c in K.fwd_configs_for_block(32, m_bucket=4) if c.kwargs["SPLIT"] > 1):
        y1 = K.bsr_dense_mm(x.to(DEV), *_to(bsr, torch.float32), 96, bias.to(DEV), config=cfg)
        y2 = K.bsr_dense_mm(x.to(DEV), *_to(bsr, torch.float32), 96, bias.to(DEV), config=cfg)
        assert torch.equal(y1, y2), cfg
        assert_close_dtype(y1.cpu(), reference_linear(x, bsr, bias), torch.float32, 640)


@pytest.mark.parametrize("panel_rows", [64, 128])
def test_panels_forward_dx_and_dw(panel_rows):
    """bsr_to_panels re-blocks 32-row block rows into taller panels (zero-filled where a block row had
    no block); the kernels take the [P, 32] blocks: forward, transposed (dX) and rectangular SDDMM."""
    n, k = 200, 160
    bsr = random_bsr(n, k, 32, 0.5, empty_rows=(2,))
    v, crow, col, fill = K.bsr_to_panels(bsr.values, bsr.crow_indices, bsr.col_indices, panel_rows)
    assert v.shape[1:] == (panel_rows, 32) and crow.numel() == math.ceil(n / panel_rows) + 1 and fill >= 1.0
    x, dy = torch.randn(9, k), torch.randn(9, n)
    y = K.bsr_dense_mm(x.to(DEV), v.to(DEV), crow.to(DEV), col.to(DEV), n)
    assert_close_dtype(y.cpu(), reference_linear(x, bsr), torch.float32, k)
    crow_t, col_t, bidx = bsr_transpose_structure(crow, col, math.ceil(k / 32))
    dx = K.bsr_dense_mm(dy.to(DEV), v.to(DEV), crow_t.to(DEV), col_t.to(DEV), k, blocks_transposed=True,
                        block_index=bidx.to(DEV))
    assert_close_dtype(dx.cpu(), dy.double() @ bsr.to_dense().double(), torch.float32, n)
    rows = bsr_row_indices(crow, col)
    dv = K.bsr_sddmm(dy.to(DEV), x.to(DEV), rows.to(DEV), col.to(DEV), (panel_rows, 32)).cpu().double()
    n_panels, nbc = crow.numel() - 1, math.ceil(k / 32)
    full = torch.nn.functional.pad(dy.double().t() @ x.double(), (0, nbc * 32 - k, 0, n_panels * panel_rows - n))
    ref = full.view(n_panels, panel_rows, nbc, 32).transpose(1, 2)[rows, col]
    torch.testing.assert_close(dv, ref, atol=1e-4, rtol=1e-4)


def test_density_and_m_buckets_key_the_autotuner():
    from accel.kernels._triton import density_bucket

    assert [density_bucket(d) for d in (1.0, 0.5, 0.25, 0.1, 0.05, 0.0)] == [0, 0, 1, 2, 3, 3]
    keys = K._bsr_dense_mm_kernel.keys
    assert "DENSITY_BUCKET" in keys and "M_BUCKET" in keys and "M" not in keys
    small = K.fwd_configs_for_block(32, m_bucket=16)
    assert small and all(c.kwargs["SWAP"] == 1 for c in small) and any(c.kwargs["SPLIT"] > 1 for c in small)
    large = K.fwd_configs_for_block(32, m_bucket=4096)
    assert large and all(c.kwargs["SWAP"] == 0 for c in large) and any(c.kwargs["BLOCK_M"] == 256 for c in large)


def test_deterministic():
    bsr = random_bsr(96, 130, 32, 0.3)
    x = torch.randn(50, 130).to(DEV)
    args = _to(bsr, torch.float32)
    assert torch.equal(K.bsr_dense_mm(x, *args, 96), K.bsr_dense_mm(x, *args, 96))


def test_errors_name_the_values():
    bsr = random_bsr(64, 64, 32, 0.5)
    v, crow, col = _to(bsr, torch.float32)
    x = torch.randn(4, 64, device=DEV)
    with pytest.raises(TypeError, match="got torch.int8"):
        K.bsr_dense_mm(x.to(torch.int8), v, crow, col, 64)
    with pytest.raises(TypeError, match="values dtype torch.float16 must equal x dtype torch.float32"):
        K.bsr_dense_mm(x, v.half(), crow, col, 64)
    with pytest.raises(ValueError, match=r"x must be 2-D \[M, K\], got shape \(1, 4, 64\)"):
        K.bsr_dense_mm(x[None], v, crow, col, 64)
    with pytest.raises(ValueError, match="block size must be one of .* got 8"):
        K.bsr_dense_mm(x, torch.randn(2, 8, 8, device=DEV), crow, col, 64)
    with pytest.raises(ValueError, match=r"crow_indices has 2 block rows, expected ceil\(100/32\)"):
        K.bsr_dense_mm(x, v, crow, col, 100)
    with pytest.raises(ValueError, match=r"bias must be \[64\] torch.float32, got \(63,\)"):
        K.bsr_dense_mm(x, v, crow, col, 64, torch.randn(63, device=DEV))
    with pytest.raises(ValueError, match="BLOCK_K=64 must divide the block size 32"):
        K.bsr_dense_mm(x, v, crow, col, 64, config=triton.Config({"BLOCK_M": 16, "BLOCK_K": 64}))
    with pytest.raises(ValueError, match="needs CUDA tensors .* got device meta"):
        K.bsr_dense_mm(x.to("meta"), v.to("meta"), crow.to("meta"), col.to("meta"), 64)
    with pytest.raises(ValueError, match="dy and x must share|equal M"):
        K.bsr_sddmm(torch.randn(3, 64, device=DEV), torch.randn(4, 64, device=DEV), crow[:1], col[:1], 32)
