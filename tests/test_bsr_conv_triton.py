"""The Triton block-sparse Conv2d kernels (forward, dX, dW) against F.conv2d / torch.nn.grad in float64.

Runs in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set by conftest.py), or on a GPU
with ``ACCEL_TEST_NO_INTERPRET=1``. The interpreter's autotuner holds one config, so
``test_every_config`` forces each entry of the GPU tables. Outputs are NaN-poisoned (``poison_empty``).
bf16 is skipped in the interpreter (it computes bf16 garbage, triton-lang/triton#11584).
"""

import math

import pytest
import torch
import triton

from tests.helpers import interpret_mode, kernel_device
from tests.sparse_refs import (
    block_rows,
    bsr_dense,
    conv_block_mask,
    conv_dw_ref,
    conv_dx_ref,
    conv_ref,
    conv_weight_from_bsr,
    random_conv_bsr,
)

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("poison_empty")]

if not interpret_mode() and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)

from accel.kernels import bsr_conv as BC  # noqa: E402

DEV = kernel_device()

CASES = [
    # (N, C, H, W, O, KH, KW, stride, padding, dilation, B, density, empty block rows)
    (2, 32, 6, 7, 40, 3, 3, 1, 1, 1, 16, 0.6, (0,)),  # 3x3, O not a multiple of B, an empty block row
    (1, 20, 5, 6, 33, 3, 2, (2, 1), (1, 0), (1, 2), 16, 0.7, ()),  # asymmetric kernel/geometry, C % B != 0
    (2, 64, 5, 5, 64, 1, 1, 1, 0, 1, 32, 1.0, ()),  # 1x1, 0% sparsity
    (1, 48, 6, 5, 70, 3, 3, 2, 1, 1, 32, 0.5, (1,)),  # C % B != 0 but C % 16 == 0, stride 2
    (1, 64, 4, 4, 130, 3, 3, 1, 2, 2, 64, 0.5, ()),  # dilation 2, padding 2
    (1, 40, 5, 4, 70, 1, 3, 1, (0, 1), 1, 64, 0.8, ()),  # 1x3, C < B
    (1, 3, 7, 7, 20, 3, 3, 2, 1, 1, 16, 1.0, ()),  # a first layer: C = 3
    (2, 32, 4, 4, 32, 3, 3, 1, 1, 1, 32, 0.0, ()),  # 100% sparsity
    (0, 32, 5, 5, 32, 3, 3, 1, 1, 1, 32, 0.5, ()),  # batch 0
]


def _id(c):
    n, ch, h, w, o, kh, kw, st, pd, dl, b, d, e = c
    return f"N{n}-C{ch}-{h}x{w}-O{o}-k{kh}x{kw}-s{st}-p{pd}-d{dl}-B{b}-dens{d}-e{len(e)}".replace(" ", "")


def setup(case, dtype=torch.float32, seed=0):
    n, c, h, w, o, kh, kw, st, pd, dl, b, density, empty = case
    ws = (o, c, kh, kw)
    v, crow, col = random_conv_bsr(ws, b, density, empty, seed=seed, dtype=dtype)
    x = torch.randn(n, c, h, w).to(dtype).to(memory_format=torch.channels_last)
    return ws, (st, pd, dl), x, v, crow, col


def dev(*ts):
    return [None if t is None else t.to(DEV) for t in ts]


def tol(k: int, dtype=torch.float32):
    base = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 1e-2), torch.bfloat16: (1.5e-1, 2e-2)}[dtype]
    return dict(atol=base[0] * max(1.0, k ** 0.5 / 8), rtol=base[1])


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward(case):
    ws, geo, x, v, crow, col = setup(case)
    bias = torch.randn(ws[0])
    y = BC.bsr_conv2d(*dev(x, v, crow, col), ws, bias.to(DEV), *geo)
    ref = conv_ref(x, v, crow, col, ws, bias, *geo)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.cpu().double(), ref, **tol(ws[1] * ws[2] * ws[3]))


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_input_gradient(case):
    ws, geo, x, v, crow, col = setup(case)
    dy = torch.randn(conv_ref(x, v, crow, col, ws, None, *geo).shape).to(memory_format=torch.channels_last)
    dx = BC.bsr_conv2d_dx(*dev(dy, v, crow, col), ws, x.shape, *geo)
    assert dx.shape == x.shape and dx.is_contiguous(memory_format=torch.channels_last)
    ref = conv_dx_ref(dy, v, crow, col, ws, x.shape, *geo)
    torch.testing.assert_close(dx.cpu().double(), ref, **tol(ws[0] * ws[2] * ws[3]))


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_weight_gradient(case):
    ws, geo, x, v, crow, col = setup(case)
    dy = torch.randn(conv_ref(x, v, crow, col, ws, None, *geo).shape).to(memory_format=torch.channels_last)
    rows = BC.block_row_indices(crow, col.numel())
    dv = BC.bsr_conv2d_dw(*dev(dy, x, rows, col), case[10], ws, *geo)
    assert dv.shape == v.shape and dv.dtype == x.dtype
    ref = conv_dw_ref(dy, x, crow, col, case[10], ws, *geo)
    torch.testing.assert_close(dv.cpu().double(), ref, **tol(dy.numel() // max(ws[0], 1)))


EVERY_CONFIG_CASES = [
    # per block size: C % B == 0, and C % B != 0 (the dX kernel's straddling path)
    (1, 32, 5, 6, 37, 3, 3, 1, 1, 1, 16, 0.6, (1,)),
    (1, 24, 5, 6, 37, 2, 3, 1, 1, 1, 16, 0.6, ()),
    (1, 64, 5, 5, 70, 3, 3, 2, 1, 1, 32, 0.6, (1,)),
    (1, 48, 5, 5, 70, 3, 3, 1, 1, 2, 32, 0.6, ()),
    (1, 64, 4, 5, 70, 3, 2, 1, 1, 1, 64, 0.7, (1,)),
    (1, 80, 4, 4, 70, 3, 3, 1, 1, 1, 64, 0.7, ()),
]


@pytest.mark.parametrize("case", EVERY_CONFIG_CASES, ids=_id)
def test_every_config(case):
    """Each forward, dX and dW config of the block size's GPU table (and the interpreter's), forced."""
    ws, geo, x, v, crow, col = setup(case, seed=3)
    bs = case[10]
    bias = torch.randn(ws[0])
    ref = conv_ref(x, v, crow, col, ws, bias, *geo)
    dy = torch.randn(ref.shape).to(memory_format=torch.channels_last)
    ref_dx = conv_dx_ref(dy, v, crow, col, ws, x.shape, *geo)
    ref_dv = conv_dw_ref(dy, x, crow, col, bs, ws, *geo)
    rows = BC.block_row_indices(crow, col.numel())
    k = ws[1] * ws[2] * ws[3]
    interp = BC._mk_config(*BC.FWD_INTERPRET_CONFIG)
    both = (True, False)  # the aligned and the ragged tables: any config must be correct on any shape
    for cfg in [c for al in both for c in BC.fwd_configs_for_block(bs, al)] + [interp]:
        y = BC.bsr_conv2d(*dev(x, v, crow, col), ws, bias.to(DEV), *geo, config=cfg)
        torch.testing.assert_close(y.cpu().double(), ref, **tol(k), msg=f"fwd {cfg}")
    for cfg in [c for al in both for c in BC.dx_configs_for_block(bs, al)] + [interp]:
        dx = BC.bsr_conv2d_dx(*dev(dy, v, crow, col), ws, x.shape, *geo, config=cfg)
        torch.testing.assert_close(dx.cpu().double(), ref_dx, **tol(ws[0] * 9), msg=f"dx {cfg}")
    for cfg in [c for al in both for c in BC.dw_configs_for_block(bs, al)] + [BC._dw_config(*BC.DW_INTERPRET_CONFIG)]:
        dv = BC.bsr_conv2d_dw(*dev(dy, x, rows, col), bs, ws, *geo, config=cfg)
        torch.testing.assert_close(dv.cpu().double(), ref_dv, **tol(dy.numel() // ws[0]), msg=f"dw {cfg}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_dtypes(dtype):
    if dtype == torch.bfloat16 and interpret_mode():
        pytest.skip("the Triton interpreter computes garbage for bf16 (triton-lang/triton#11584)")
    case = (2, 32, 5, 5, 40, 3, 3, 1, 1, 1, 16, 0.6, ())
    ws, geo, x, v, crow, col = setup(case, dtype)
    bias = torch.randn(ws[0]).to(dtype)
    y = BC.bsr_conv2d(*dev(x, v, crow, col), ws, bias.to(DEV), *geo)
    assert y.dtype == dtype
    torch.testing.assert_close(y.cpu().double(), conv_ref(x, v, crow, col, ws, bias, *geo), **tol(288, dtype))
    dy = torch.randn(y.shape).to(dtype).to(memory_format=torch.channels_last)
    dx = BC.bsr_conv2d_dx(*dev(dy, v, crow, col), ws, x.shape, *geo)
    torch.testing.assert_close(dx.cpu().double(), conv_dx_ref(dy, v, crow, col, ws, x.shape, *geo), **tol(360, dtype))
    rows = BC.block_row_indices(crow, col.numel())
    dv = BC.bsr_conv2d_dw(*dev(dy, x, rows, col), 16, ws, *geo)
    torch.testing.assert_close(dv.cpu().double(), conv_dw_ref(dy, x, crow, col, 16, ws, *geo), **tol(50, dtype))


def test_any_strides_give_the_same_result():
    """NCHW-contiguous and sliced (non-contiguous) activations and gradients, int32 indices."""
    case = (2, 32, 6, 6, 40, 3, 3, 1, 1, 1, 16, 0.6, ())
    ws, geo, x, v, crow, col = setup(case)
    big = torch.randn(2, 64, 6, 12)
    x_views = [x.contiguous(), big[:, ::2, :, ::2], big.permute(0, 2, 3, 1)[:, :, ::2, :32].permute(0, 3, 1, 2)]
    for xv in x_views:
        assert not xv.is_contiguous(memory_format=torch.channels_last)
        ref = conv_ref(xv, v, crow, col, ws, None, *geo)
        y = BC.bsr_conv2d(*dev(xv, v, crow.int(), col.int()), ws, None, *geo)
        torch.testing.assert_close(y.cpu().double(), ref, **tol(288))
    dy = torch.randn(ref.shape)
    ref_dx = conv_dx_ref(dy, v, crow, col, ws, x.shape, *geo)
    dx = BC.bsr_conv2d_dx(*dev(dy, v, crow.int(), col.int()), ws, x.shape, *geo)  # NCHW dy
    torch.testing.assert_close(dx.cpu().double(), ref_dx, **tol(360))
    rows = BC.block_row_indices(crow, col.numel())
    ref_dv = conv_dw_ref(dy, x_views[2], crow, col, 16, ws, *geo)
    dv = BC.bsr_conv2d_dw(*dev(dy, x_views[2], rows.int(), col.int()), 16, ws, *geo)
    torch.testing.assert_close(dv.cpu().double(), ref_dv, **tol(72))


def test_dw_split_over_pixels_is_deterministic_and_exact():
    """M = 2*18*18 = 648 output pixels in 3 slices of 256: fp32 partials summed afterwards."""
    case = (2, 16, 18, 18, 20, 3, 3, 1, 1, 1, 16, 1.0, ())
    ws, geo, x, v, crow, col = setup(case)
    dy = torch.randn(2, 20, 18, 18)
    rows = BC.block_row_indices(crow, col.numel())
    args = dev(dy, x, rows, col)
    ref = conv_dw_ref(dy, x, crow, col, 16, ws, *geo)
    one = BC.bsr_conv2d_dw(*args, 16, ws, *geo, split_m=1)
    three = BC.bsr_conv2d_dw(*args, 16, ws, *geo, split_m=3)
    torch.testing.assert_close(one.cpu().double(), ref, **tol(648))
    torch.testing.assert_close(three.cpu().double(), ref, **tol(648))
    assert torch.equal(three, BC.bsr_conv2d_dw(*args, 16, ws, *geo, split_m=3))


def test_dx_with_precomputed_transposed_structure_and_determinism():
    case = (1, 48, 5, 5, 70, 3, 3, 1, 1, 2, 32, 0.6, ())
    ws, geo, x, v, crow, col = setup(case)
    dy = torch.randn(conv_ref(x, v, crow, col, ws, None, *geo).shape)
    t = BC.transpose_structure(crow, col, math.ceil(48 * 9 / 32))
    a = BC.bsr_conv2d_dx(*dev(dy, v, crow, col), ws, x.shape, *geo, crow_t=t[0].to(DEV), col_t=t[1].to(DEV),
                         block_index=t[2].to(DEV))
    b = BC.bsr_conv2d_dx(*dev(dy, v, crow, col), ws, x.shape, *geo)
    assert torch.equal(a, b)
    torch.testing.assert_close(a.cpu().double(), conv_dx_ref(dy, v, crow, col, ws, x.shape, *geo), **tol(630))


def test_fp32_is_ieee_unless_tf32_allowed():
    case = (1, 64, 4, 4, 32, 3, 3, 1, 1, 1, 32, 1.0, ())
    ws, geo, x, v, crow, col = setup(case)
    y = BC.bsr_conv2d(*dev(x, v, crow, col), ws, None, *geo)
    torch.testing.assert_close(y.cpu().double(), conv_ref(x, v, crow, col, ws, None, *geo), atol=3e-5, rtol=1e-5)


def test_autotune_tables_follow_alignment():
    """The autotuner's prune hook picks the aligned table when C and O are multiples of 16, else the
    ragged one, for the launch's block size."""
    kernels = [(BC.FWD_TABLES, BC._mk_config, BC.fwd_configs_for_block),
               (BC.DX_TABLES, BC._mk_config, BC.dx_configs_for_block),
               (BC.DW_TABLES, BC._dw_config, BC.dw_configs_for_block)]
    for tables, make, table_for in kernels:
        hook, union = BC._pruner(tables), BC._union(tables, make)
        for bs in BC.SUPPORTED_BLOCK_SIZES:
            for (c, o), aligned in (((64, 128), True), ((3, 64), False), ((64, 70), False)):
                got = hook(union, {"C": c, "OC": o}, BS=bs)
                assert sorted(map(BC._key, got)) == sorted(map(BC._key, table_for(bs, aligned))), (bs, c, o)
    assert BC.is_aligned(32, 48) and not BC.is_aligned(24, 32)


# ------------------------------------------------------------------------------------ layout helpers
@pytest.mark.parametrize("shape,block", [((40, 32, 3, 3), 16), ((33, 20, 3, 2), 16), ((70, 48, 1, 1), 32),
                                         ((20, 3, 3, 3), 64)], ids=str)
def test_layout_helpers_round_trip(shape, block):
    o, c, kh, kw = shape
    w = torch.randn(shape)
    mask = conv_block_mask(shape, block, 0.5, seed=1)
    v, crow, col = BC.conv_weight_to_bsr(w, block, mask)
    assert v.shape == (int(mask.sum()), block, block) and crow.dtype == col.dtype == torch.int64
    assert torch.equal(crow, torch.cat([torch.zeros(1, dtype=torch.int64), mask.sum(1).cumsum(0)]))
    # the kept blocks, in (kh, kw, c) order: the reference rebuild equals w masked block-wise
    w2 = w.permute(0, 2, 3, 1).reshape(o, -1)
    keep = mask.repeat_interleave(block, 0).repeat_interleave(block, 1)[:o, :kh * kw * c]
    masked = (w2 * keep).reshape(o, kh, kw, c).permute(0, 3, 1, 2)
    assert torch.equal(conv_weight_from_bsr(v, crow, col, shape), masked)
    back = BC.bsr_to_conv_weight(v, crow, col, shape)
    assert back.shape == shape and torch.equal(back, masked)
    # default mask: the nonzero blocks; a masked weight round-trips exactly
    v2, crow2, col2 = BC.conv_weight_to_bsr(masked, block)
    assert torch.equal(BC.bsr_to_conv_weight(v2, crow2, col2, shape), masked)
    assert v2.shape[0] == int(((v.abs().sum((1, 2))) > 0).sum())
    assert torch.equal(BC.block_row_indices(crow, col.numel()), block_rows(crow))
    # padding past O and K is zero in the stored blocks
    nbr, nbc = mask.shape
    padded = bsr_dense(v, crow, col, (nbr * block, nbc * block))
    assert not padded[o:].any() and not padded[:, kh * kw * c:].any()


def test_transpose_structure_lists_each_block_under_its_column():
    shape, block = (70, 48, 3, 3), 32
    v, crow, col = random_conv_bsr(shape, block, 0.5, (1,))
    nkb = math.ceil(48 * 9 / block)
    crow_t, col_t, bidx = BC.transpose_structure(crow, col, nkb)
    rows = block_rows(crow)
    assert torch.equal(torch.sort(bidx).values, torch.arange(col.numel()))
    for kb in range(nkb):
        q = slice(int(crow_t[kb]), int(crow_t[kb + 1]))
        assert (col[bidx[q]] == kb).all() and torch.equal(col_t[q], rows[bidx[q]])
        assert (col_t[q][1:] > col_t[q][:-1]).all()


def test_layout_helper_errors():
    w = torch.randn(40, 32, 3, 3)
    with pytest.raises(ValueError, match=r"block_mask must be \[3, 18\]"):
        BC.conv_weight_to_bsr(w, 16, torch.ones(3, 17, dtype=torch.bool))
    with pytest.raises(ValueError, match="block size must be one of"):
        BC.conv_weight_to_bsr(w, 128)
    with pytest.raises(ValueError, match=r"weight must be \[O, C, KH, KW\]"):
        BC.conv_weight_to_bsr(w[0], 16)


# ------------------------------------------------------------------------------------------- errors
def test_errors_name_the_values():
    ws = (40, 32, 3, 3)
    v, crow, col = dev(*random_conv_bsr(ws, 16, 0.5))
    x = torch.randn(1, 32, 5, 5, device=DEV)
    with pytest.raises(TypeError, match="x dtype must be one of .* got torch.int8"):
        BC.bsr_conv2d(x.to(torch.int8), v, crow, col, ws)
    with pytest.raises(TypeError, match="values dtype torch.float16 must equal the activation dtype torch.float32"):
        BC.bsr_conv2d(x, v.half(), crow, col, ws)
    with pytest.raises(ValueError, match=r"x must be 4-D \[N, C, H, W\], got shape \(32, 5, 5\)"):
        BC.bsr_conv2d(x[0], v, crow, col, ws)
    with pytest.raises(ValueError, match="expects 32 input channels, x of shape .* has 31"):
        BC.bsr_conv2d(x[:, :31], v, crow, col, ws)
    with pytest.raises(ValueError, match="block size must be one of .* got 128"):
        BC.bsr_conv2d(x, torch.zeros(1, 128, 128, device=DEV), crow, col, ws)
    with pytest.raises(ValueError, match=r"crow_indices has 3 block rows, expected ceil\(70/16\)"):
        BC.bsr_conv2d(x, v, crow, col, (70, 32, 3, 3))
    with pytest.raises(TypeError, match="crow_indices must be int32 or int64, got torch.float32"):
        BC.bsr_conv2d(x, v, crow.float(), col, ws)
    with pytest.raises(ValueError, match="weight_shape must be"):
        BC.bsr_conv2d(x, v, crow, col, (40, 32, 3))
    with pytest.raises(ValueError, match="too small for kernel 3x3"):
        BC.bsr_conv2d(x[:, :, :2, :2], v, crow, col, ws)
    with pytest.raises(ValueError, match="need stride >= 1"):
        BC.bsr_conv2d(x, v, crow, col, ws, stride=0)
    with pytest.raises(ValueError, match=r"bias must be a float \[40\]"):
        BC.bsr_conv2d(x, v, crow, col, ws, torch.randn(39, device=DEV))
    with pytest.raises(ValueError, match="BLOCK_K=8 must be a power of two >= 16"):
        BC.bsr_conv2d(x, v, crow, col, ws, config=triton.Config({"BLOCK_M": 32, "BLOCK_K": 8}))
    with pytest.raises(ValueError, match="needs CUDA tensors .* got device meta"):
        BC.bsr_conv2d(*(t.to("meta") for t in (x, v, crow, col)), ws)
    dy = torch.randn(1, 40, 5, 5, device=DEV)
    with pytest.raises(ValueError, match=r"dy must be \(1, 40, 3, 3\)"):
        BC.bsr_conv2d_dx(dy, v, crow, col, ws, x.shape)
    with pytest.raises(ValueError, match="pass all of crow_t, col_t, block_index or none"):
        BC.bsr_conv2d_dx(dy, v, crow, col, ws, x.shape, padding=1, crow_t=crow)
    with pytest.raises(ValueError, match="transposed structure must be"):
        BC.bsr_conv2d_dx(dy, v, crow, col, ws, x.shape, padding=1, crow_t=crow, col_t=col, block_index=col)
    with pytest.raises(ValueError, match="x_shape .* has 16 channels"):
        BC.bsr_conv2d_dx(dy, v, crow, col, ws, (1, 16, 5, 5), padding=1)
    rows = BC.block_row_indices(crow.cpu(), col.numel()).to(DEV)
    with pytest.raises(TypeError, match="x dtype torch.float16 must equal torch.float32"):
        BC.bsr_conv2d_dw(dy, x.half(), rows, col, 16, ws, padding=1)
    with pytest.raises(ValueError, match="differ in length"):
        BC.bsr_conv2d_dw(dy, x, rows[:-1], col, 16, ws, padding=1)
    with pytest.raises(ValueError, match="block size must be one of .* got 8"):
        BC.bsr_conv2d_dw(dy, x, rows, col, 8, ws, padding=1)
    with pytest.raises(ValueError, match="split_m must be >= 1"):
        BC.bsr_conv2d_dw(dy, x, rows, col, 16, ws, padding=1, split_m=0)
    with pytest.raises(ValueError, match=r"dy must be \(1, 40, 3, 3\)"):
        BC.bsr_conv2d_dw(dy, x, rows, col, 16, ws)
