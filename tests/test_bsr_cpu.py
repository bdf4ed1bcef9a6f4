"""The CPU block-sparse path (accel.cpu.bsr) against a float64 dense reference."""

import math

import pytest
import torch

from accel.cpu.bsr import STRATEGIES, bsr_dense_mm_cpu, bsr_sddmm_cpu, pick_strategy, strategies_for
from accel.formats import bsr_row_indices, bsr_transpose_structure
from tests.helpers import assert_close_dtype, random_bsr, reference_linear

CASES = [
    # (M, N, K, block, sparsity)
    (1, 64, 64, 16, 0.5),
    (7, 100, 70, 32, 0.5),  # N, K not multiples of the block
    (129, 96, 130, 32, 0.3),
    (33, 17, 70, 16, 0.0),  # dense
    (5, 130, 257, 64, 0.7),
    (3, 40, 40, 128, 0.0),  # one padded block
    (16, 64, 96, 32, 1.0),  # everything pruned
    (0, 64, 64, 32, 0.5),  # empty batch
]


def _id(c):
    return "M{}-N{}-K{}-B{}-s{}".format(*c)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward_matches_reference(case, strategy):
    m, n, k, block, sparsity = case
    bsr = random_bsr(n, k, block, sparsity, empty_rows=(0,) if sparsity > 0 else ())
    x = torch.randn(m, k)
    bias = torch.randn(n)
    y = bsr_dense_mm_cpu(x, bsr.values, bsr.crow_indices, bsr.col_indices, n, bias, strategy=strategy)
    assert y.shape == (m, n) and y.is_contiguous()
    assert_close_dtype(y, reference_linear(x, bsr, bias), torch.float32, k)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dtypes(dtype, strategy):
    bsr = random_bsr(96, 80, 32, 0.5, dtype=dtype)
    x = torch.randn(20, 80, dtype=dtype)
    if strategy not in strategies_for(dtype):
        with pytest.raises(ValueError, match="supports"):
            bsr_dense_mm_cpu(x, bsr.values, bsr.crow_indices, bsr.col_indices, 96, strategy=strategy)
        return
    y = bsr_dense_mm_cpu(x, bsr.values, bsr.crow_indices, bsr.col_indices, 96, strategy=strategy)
    assert y.dtype == dtype
    assert_close_dtype(y, reference_linear(x, bsr), dtype, 80)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_noncontiguous_x(strategy):
    bsr = random_bsr(64, 48, 16, 0.5)
    base = torch.randn(48, 30)
    x = base.t()[::2]  # [15, 48], strides (2, 30)
    assert not x.is_contiguous()
    y = bsr_dense_mm_cpu(x, bsr.values, bsr.crow_indices, bsr.col_indices, 64, strategy=strategy)
    torch.testing.assert_close(y, bsr_dense_mm_cpu(x.contiguous(), bsr.values, bsr.crow_indices, bsr.col_indices, 64,
                                                   strategy=strategy))
    assert_close_dtype(y, reference_linear(x, bsr), torch.float32, 48)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_transposed_blocks_give_dx(strategy):
    """``dX = dY @ W`` through the transposed structure, the way the backward calls it."""
    n, k, block = 100, 70, 32
    bsr = random_bsr(n, k, block, 0.5, empty_rows=(1,))
    dy = torch.randn(9, n)
    crow_t, col_t, bidx = bsr_transpose_structure(bsr.crow_indices, bsr.col_indices, math.ceil(k / block))
    if strategy == "mkl":  # torch's BSR serves the forward structure only; the backward uses the others
        with pytest.raises(ValueError, match="forward structure only"):
            bsr_dense_mm_cpu(dy, bsr.values, crow_t, col_t, k, blocks_transposed=True, block_index=bidx, strategy="mkl")
        return
    dx = bsr_dense_mm_cpu(dy, bsr.values, crow_t, col_t, k, blocks_transposed=True, block_index=bidx,
                          strategy=strategy)
    assert_close_dtype(dx, dy.double() @ bsr.to_dense().double(), torch.float32, n)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_nan_propagates_through_stored_blocks_only(strategy):
    """A NaN in x poisons the outputs whose stored blocks read that input feature, and nothing else
    (a pruned block is absent, not a multiplication by zero)."""
    bsr = random_bsr(64, 64, 16, 0.5)
    x = torch.randn(3, 64)
    x[1, 5] = float("nan")
    y = bsr_dense_mm_cpu(x, bsr.values, bsr.crow_indices, bsr.col_indices, 64, strategy=strategy)
    readers = bsr.block_mask()[:, 0].repeat_interleave(16)  # block column 0 holds feature 5
    assert torch.isnan(y[1, readers]).all()
    assert not torch.isnan(y[1, ~readers]).any()
    assert not torch.isnan(y[[0, 2]]).any()


def test_inf_in_input_gives_inf_or_nan_like_dense():
    bsr = random_bsr(32, 32, 16, 0.0)
    x = torch.randn(2, 32)
    x[0, 0] = float("inf")
    y = bsr_dense_mm_cpu(x, bsr.values, bsr.crow_indices, bsr.col_indices, 32)
    ref = x @ bsr.to_dense().t()
    assert torch.equal(torch.isinf(y), torch.isinf(ref))
    assert torch.equal(torch.isnan(y), torch.isnan(ref))


@pytest.mark.parametrize("m", [1, 8, 9, 48, 49, 1000])
def test_pick_strategy_covers_every_m(m):
    assert pick_strategy(m) in STRATEGIES


def test_sddmm_matches_reference():
    n, k, block = 100, 70, 32
    bsr = random_bsr(n, k, block, 0.5)
    dy, x = torch.randn(13, n), torch.randn(13, k)
    rows = bsr_row_indices(bsr.crow_indices, bsr.col_indices)
    dv = bsr_sddmm_cpu(dy, x, rows, bsr.col_indices, block)
    full = torch.nn.functional.pad(dy.double().t() @ x.double(), (0, 96 - k, 0, 128 - n))  # padded dW
    blocks = full.view(4, block, 3, block).transpose(1, 2)
    torch.testing.assert_close(dv.double(), blocks[rows, bsr.col_indices], atol=1e-4, rtol=1e-5)


def test_errors_name_the_values():
    bsr = random_bsr(64, 64, 32, 0.5)
    args = (bsr.values, bsr.crow_indices, bsr.col_indices, 64)
    with pytest.raises(TypeError, match="torch.int32"):
        bsr_dense_mm_cpu(torch.ones(2, 64, dtype=torch.int32), *args)
    with pytest.raises(TypeError, match=r"values dtype torch.float32 must equal x dtype torch.float64"):
        bsr_dense_mm_cpu(torch.ones(2, 64, dtype=torch.float64), *args)
    with pytest.raises(ValueError, match=r"\(2, 3, 64\)"):
        bsr_dense_mm_cpu(torch.ones(2, 3, 64), *args)
    with pytest.raises(ValueError, match=r"crow_indices has 2 block rows, expected ceil\(100/32\)"):
        bsr_dense_mm_cpu(torch.ones(2, 64), bsr.values, bsr.crow_indices, bsr.col_indices, 100)
    with pytest.raises(ValueError, match="unknown CPU BSR strategy 'magic'"):
        bsr_dense_mm_cpu(torch.ones(2, 64), *args, strategy="magic")


def test_panels_follow_every_change_of_the_weight():
    """The panels strategy lays each weight's blocks out once (cached): an in-place edit, an optimizer step or a
    new structure must show in the next call."""
    import torch.nn as nn

    from accel import SparseLinear, engines

    torch.manual_seed(0)
    s = SparseLinear.from_dense(nn.Linear(96, 80), sparsity=0.5, block=16, mode="sparse")
    x = torch.randn(70, 96)
    opt = torch.optim.SGD(s.parameters(), lr=0.1)
    with engines.force(bsr_linear="panels"):
        for step in range(3):
            with torch.no_grad():
                assert torch.allclose(s(x), nn.functional.linear(x, s.dense_weight(), s.bias), atol=1e-5), step
            s(x).square().mean().backward()  # a training step changes the values in place
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            s.values.mul_(-2.0)
            assert torch.allclose(s(x), nn.functional.linear(x, s.dense_weight(), s.bias), atol=1e-5)
