import pytest
import torch

from accel.formats import (
    BLOCK_SIZES,
    BSRMatrix,
    as_block_mask,
    block_norms,
    bsr_row_indices,
    bsr_transpose_structure,
    expand_block_mask,
    topk_block_mask,
)
from tests.helpers import random_bsr

SHAPES = [(64, 64), (100, 70), (33, 17), (1, 1), (256, 130)]


@pytest.mark.parametrize("block", BLOCK_SIZES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_round_trip_with_mask(shape, block):
    w = torch.randn(shape)
    nbr, nbc = -(-shape[0] // block), -(-shape[1] // block)
    mask = torch.rand(nbr, nbc) < 0.5
    bsr = BSRMatrix.from_dense(w, block, mask)
    expected = w * expand_block_mask(mask, block, shape)
    assert torch.equal(bsr.to_dense(), expected)
    assert bsr.values.shape == (int(mask.sum()), block, block)
    assert bsr.crow_indices.shape == (nbr + 1,)
    assert torch.equal(bsr.block_mask(), mask)
    assert bsr.density == pytest.approx(mask.float().mean().item())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_default_mask_keeps_nonzero_blocks(shape):
    block = 16
    w = torch.randn(shape)
    w[: min(16, shape[0]), :] = 0  # first block row all zero
    bsr = BSRMatrix.from_dense(w, block)
    assert torch.equal(bsr.to_dense(), w)
    assert bsr.crow_indices[1] == 0  # the zero block row stores nothing


def test_padding_is_zero_and_blocks_are_out_by_in():
    w = torch.arange(20 * 20, dtype=torch.float32).view(20, 20) + 1
    bsr = BSRMatrix.from_dense(w, 16)
    # block (0, 1) holds w[0:16, 16:20] on its left and zero padding on its right
    b01 = bsr.values[1]
    assert torch.equal(b01[:, :4], w[:16, 16:20])
    assert torch.equal(b01[:, 4:], torch.zeros(16, 12))
    # block (1, 0): rows 16..19 real, 20..31 padding
    b10 = bsr.values[2]
    assert torch.equal(b10[:4], w[16:20, :16])
    assert torch.equal(b10[4:], torch.zeros(12, 16))


def test_matches_torch_sparse_bsr():
    bsr = random_bsr(96, 64, 32, 0.5)
    ref = bsr.to_dense().to_sparse_bsr((32, 32))
    assert torch.equal(bsr.crow_indices, ref.crow_indices())
    assert torch.equal(bsr.col_indices, ref.col_indices())
    assert torch.equal(bsr.values, ref.values())
    assert torch.equal(bsr.to_torch_sparse().to_dense(), bsr.to_dense())


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_topk_block_mask_count_and_order(sparsity):
    scores = torch.rand(7, 9)
    mask = topk_block_mask(scores, sparsity)
    keep = round((1 - sparsity) * 63)
    assert int(mask.sum()) == keep
    if 0 < keep < 63:
        assert scores[mask].min() >= scores[~mask].max()


def test_block_norms_l1_l2():
    w = torch.zeros(32, 48)
    w[:16, :16] = 1.0
    w[16:, 16:32] = -2.0
    l1 = block_norms(w, 16, p=1)
    l2 = block_norms(w, 16, p=2)
    assert l1.shape == (2, 3)
    assert l1[0, 0] == 256 and l1[1, 1] == 512 and l1[0, 1] == 0
    assert l2[0, 0] == pytest.approx(16.0) and l2[1, 1] == pytest.approx(32.0)


def test_as_block_mask_elementwise_and_errors():
    m = torch.zeros(40, 20, dtype=torch.bool)
    m[35, 3] = True
    assert torch.equal(as_block_mask(m, (40, 20), 16), torch.tensor([[False, False], [False, False], [True, False]]))
    with pytest.raises(ValueError, match=r"got shape \(5, 5\)"):
        as_block_mask(torch.ones(5, 5), (40, 20), 16)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"block size must be an int in .* got 24"):
        BSRMatrix.from_dense(torch.randn(48, 48), 24)
    with pytest.raises(ValueError, match=r"2-D, got shape \(2, 3, 4\)"):
        BSRMatrix.from_dense(torch.randn(2, 3, 4), 16)
    with pytest.raises(ValueError, match="sparsity must be in"):
        topk_block_mask(torch.rand(3, 3), 1.5)
    with pytest.raises(ValueError, match="norm order must be 1 or 2, got 3"):
        block_norms(torch.randn(16, 16), 16, p=3)


@pytest.mark.parametrize("shape", [(100, 70), (64, 160)], ids=str)
def test_transpose_structure(shape):
    bsr = random_bsr(*shape, 32, 0.5, empty_rows=(1,))
    nbc = -(-shape[1] // 32)
    crow_t, col_t, block_index = bsr_transpose_structure(bsr.crow_indices, bsr.col_indices, nbc)
    vt = bsr.values[block_index].transpose(1, 2)
    wt = BSRMatrix(vt.contiguous(), crow_t, col_t, (shape[1], shape[0]), 32).to_dense()
    assert torch.equal(wt, bsr.to_dense().t())


def test_row_indices():
    crow = torch.tensor([0, 2, 2, 5, 6])
    assert bsr_row_indices(crow, torch.zeros(6, dtype=torch.int64)).tolist() == [0, 0, 2, 2, 2, 3]
