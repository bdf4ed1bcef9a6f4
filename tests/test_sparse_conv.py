"""SparseConv2d and ``accel::bsr_conv2d``: every CPU engine against ``F.conv2d`` in float64, gradients
against dense autograd, the module's state handling, ``sparsify_`` on a CNN, bad inputs, the Triton
path under the interpreter, and a derandomized hypothesis fuzz of the geometry."""

import copy
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import accel
from accel import SparseConv2d, engines
from accel.cpu.packcache import clear_cache
from accel.formats import block_norms, expand_block_mask, topk_block_mask
from accel.ops.bsr_conv import BLOCK_SIZES, bsr_conv2d, cpu_engines, run_cpu
from accel.prune import apply_masks_, block_masks
from tests.helpers import interpret_mode
from tests.sparse_refs import conv_dw_ref, conv_ref, conv_weight_from_bsr, random_conv_bsr

FUZZ = settings(max_examples=int(os.environ.get("ACCEL_FUZZ_EXAMPLES", "40")), deadline=None,
                derandomize=os.environ.get("ACCEL_FUZZ_RANDOM") != "1",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# (N, C, H, W, O, KH, KW, stride, padding, dilation, B, density, empty block rows)
CASES = [
    (2, 32, 6, 7, 40, 3, 3, 1, 1, 1, 16, 0.6, (0,)),  # 3x3, O % B != 0, an empty block row
    (1, 20, 5, 6, 33, 3, 2, (2, 1), (1, 0), (1, 2), 16, 0.7, ()),  # asymmetric geometry, C % B != 0
    (2, 64, 5, 5, 64, 1, 1, 1, 0, 1, 32, 1.0, ()),  # 1x1, all blocks
    (1, 48, 6, 5, 70, 3, 3, 2, 1, 1, 32, 0.5, (1,)),  # C % B != 0, stride 2
    (1, 64, 4, 4, 130, 3, 3, 1, 2, 2, 64, 0.5, ()),  # dilation 2, padding 2
    (3, 32, 9, 9, 32, 5, 5, 3, 2, 1, 32, 0.3, ()),  # 5x5 stride 3
    (1, 3, 7, 7, 20, 3, 3, 2, 1, 1, 16, 1.0, ()),  # a first layer: C = 3
    (2, 32, 4, 4, 32, 3, 3, 1, 1, 1, 32, 0.0, ()),  # no block at all
    (1, 32, 1, 1, 16, 1, 1, 1, 0, 1, 16, 1.0, ()),  # one pixel
    (0, 32, 5, 5, 32, 3, 3, 1, 1, 1, 32, 0.5, ()),  # batch 0
]


def _id(c):
    n, ch, h, w, o, kh, kw, st_, pd, dl, b, d, e = c
    return f"N{n}-C{ch}-{h}x{w}-O{o}-k{kh}x{kw}-s{st_}-p{pd}-d{dl}-B{b}-dens{d}-e{len(e)}".replace(" ", "")


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _setup(case, dtype=torch.float32, seed=0):
    n, c, h, w, o, kh, kw, st_, pd, dl, b, density, empty = case
    ws = (o, c, kh, kw)
    v, crow, col = random_conv_bsr(ws, b, density, empty, seed=seed, dtype=dtype)
    x = torch.randn(n, c, h, w).to(dtype)
    bias = torch.randn(o).to(dtype)
    return ws, (_pair(st_), _pair(pd), _pair(dl)), x, v, crow, col, bias


def _tol(dtype, k):
    atol, rtol = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (1.5e-1, 3e-2), torch.float16: (2e-2, 1e-2),
                  torch.float64: (1e-10, 1e-10)}[dtype]
    return dict(atol=atol * max(1.0, k ** 0.5 / 8), rtol=rtol)


# ------------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_cpu_engine_matches_dense_conv(case, dtype):
    ws, geo, x, v, crow, col, bias = _setup(case, dtype)
    ref = conv_ref(x, v, crow, col, ws, bias, *geo)
    for engine in cpu_engines(ws[1], v.shape[1], dtype, allow_dense=True, nchw=True):
        for layout in (torch.contiguous_format, torch.channels_last):
            xx = x.contiguous(memory_format=layout)
            for b in (bias, None):
                y = run_cpu(engine, xx, v, crow, col, ws, b, *geo)
                want = ref if b is not None else ref - bias.double().view(1, -1, 1, 1)
                assert y.shape == ref.shape and y.dtype == dtype, engine
                # (the native float kernel stores an NCHW result itself)
                fmt = layout if engine in ("native", "native_nchw") else torch.channels_last
                assert y.is_contiguous(memory_format=fmt), engine
                torch.testing.assert_close(y.double(), want, **_tol(dtype, ws[1] * ws[2] * ws[3]), msg=engine)


def test_engines_offered():
    assert cpu_engines(64, 32, torch.float32, False)[0] == "gather"
    assert "gather" not in cpu_engines(48, 32, torch.float32, True)  # K blocks straddle taps
    assert "im2col_mkl" not in cpu_engines(64, 32, torch.bfloat16, True)  # MKL BSR is fp32/fp64 only
    assert cpu_engines(64, 32, torch.float32, True)[-1] == "dense"
    assert "dense" not in cpu_engines(64, 32, torch.float32, False)


def test_block_sizes_match_the_kernels():
    pytest.importorskip("triton")
    from accel.kernels.bsr_conv import SUPPORTED_BLOCK_SIZES

    assert BLOCK_SIZES == SUPPORTED_BLOCK_SIZES


@pytest.mark.parametrize("engine", ["gather", "im2col_rows", "im2col_gather_bmm", "dense"])
def test_forced_engine_through_the_public_op(engine):
    ws, geo, x, v, crow, col, bias = _setup(CASES[0])
    with torch.no_grad(), engines.force(bsr_conv2d=engine):
        y = bsr_conv2d(x, v, crow, col, ws, bias, *geo, allow_dense=engine == "dense")
    torch.testing.assert_close(y.double(), conv_ref(x, v, crow, col, ws, bias, *geo), **_tol(torch.float32, 288))
    if engine == "dense":  # only auto layers may densify: forcing it on a sparse-only call is an error
        with torch.no_grad(), engines.force(bsr_conv2d="dense"), pytest.raises(ValueError, match="cannot run this call"):
            bsr_conv2d(x, v, crow, col, ws, bias, *geo)


def test_forcing_gather_where_it_cannot_run_raises():
    ws, geo, x, v, crow, col, bias = _setup(CASES[1])  # C = 20, B = 16
    with engines.force(bsr_conv2d="gather"), pytest.raises(ValueError, match="cannot run this call"):
        bsr_conv2d(x, v, crow, col, ws, bias, *geo)


def test_measured_choice_is_recorded(accel_env, monkeypatch):
    accel_env(ACCEL_ENGINE_MEASURE="1")
    monkeypatch.setattr(engines, "BUDGET_S", 0.01)
    monkeypatch.setattr(engines, "MIN_ROUNDS", 2)
    monkeypatch.setattr(engines, "_contended", lambda mark=None: False)  # a busy machine would decide nothing
    engines.clear()
    ws, geo, x, v, crow, col, bias = _setup(CASES[0])
    with torch.no_grad():
        y = bsr_conv2d(x, v, crow, col, ws, bias, *geo, allow_dense=True)
    dec = engines.decision(engines.last_key("bsr_conv2d"))
    offered = cpu_engines(32, 16, torch.float32, True, nchw=x.is_contiguous())  # (measured for NCHW inputs)
    assert dec is not None and dec.measured and dec.engine in offered
    assert set(dec.times_ms) | set(dec.rejected) == set(offered)
    torch.testing.assert_close(y.double(), conv_ref(x, v, crow, col, ws, bias, *geo), **_tol(torch.float32, 288))
    engines.clear()


def test_unbatched_input():
    ws, geo, x, v, crow, col, bias = _setup(CASES[0])
    y = bsr_conv2d(x[0], v, crow, col, ws, bias, *geo)
    torch.testing.assert_close(y.double(), conv_ref(x[:1], v, crow, col, ws, bias, *geo)[0], **_tol(torch.float32, 288))


@pytest.mark.parametrize("case", [CASES[3], CASES[0]], ids=_id)
def test_a_nan_poisons_its_window_in_every_engine(case):
    """A NaN input pixel makes NaN every output whose window holds it, in every engine: the dense conv does
    (the pruned zeros times NaN), and the block-sparse engines, which reach it only through stored blocks,
    are made to agree (an ``auto`` layer picks dense or sparse by timing: its output must not depend on it)."""
    ws, geo, x, v, crow, col, bias = _setup(case)
    x[0, 5, 2, 2] = float("nan")
    hit = torch.zeros_like(x)
    hit[0, 5, 2, 2] = 1
    stored = conv_weight_from_bsr(torch.ones_like(v), crow, col, ws)
    readers = F.conv2d(hit, stored, None, *geo) > 0
    window = F.conv2d(hit, torch.ones(ws), None, *geo) > 0
    assert readers.any() and (window & ~readers).any()
    for engine in cpu_engines(ws[1], v.shape[1], torch.float32, True, nchw=True):
        y = run_cpu(engine, x, v, crow, col, ws, bias, *geo)
        assert torch.equal(torch.isnan(y), window), engine


# ------------------------------------------------------------------------------------------------ backward
@pytest.mark.parametrize("case", [c for c in CASES if c[0] > 0], ids=_id)
def test_gradients_match_dense_autograd(case):
    ws, geo, x, v, crow, col, bias = _setup(case)
    x = x.to(memory_format=torch.channels_last).requires_grad_()
    v = v.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    y = bsr_conv2d(x, v, crow, col, ws, b, *geo)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    xd = x.detach().double().requires_grad_()
    w = conv_weight_from_bsr(v.detach().double(), crow, col, ws)
    (F.conv2d(xd, w, None, *geo) * dy.double()).sum().backward()
    k = ws[1] * ws[2] * ws[3]
    torch.testing.assert_close(x.grad.double(), xd.grad, **_tol(torch.float32, k))
    m = dy.shape[0] * dy.shape[2] * dy.shape[3]
    torch.testing.assert_close(v.grad.double(), conv_dw_ref(dy, x.detach(), crow, col, v.shape[1], ws, *geo),
                               **_tol(torch.float32, m))
    torch.testing.assert_close(b.grad.double(), dy.double().sum((0, 2, 3)), **_tol(torch.float32, m))


def test_gradcheck_fp64():
    ws, geo, x, v, crow, col, bias = _setup((1, 16, 4, 3, 20, 2, 2, (2, 1), 1, (1, 2), 16, 0.7, ()), torch.float64)
    x.requires_grad_()
    v.requires_grad_()
    bias.requires_grad_()

    def fn(a, b, c):
        # gradcheck perturbs inputs through ``.data``, which the derived-weight cache cannot see (its documented
        # limit): forget the laid-out blocks before every evaluation
        clear_cache()
        return bsr_conv2d(a, b, crow, col, ws, c, *geo)

    for engine in ("gather", "im2col_rows"):  # the backward is shared by every engine
        with engines.force(bsr_conv2d=engine):
            assert torch.autograd.gradcheck(fn, (x, v, bias)), engine


def test_eager_training_skips_the_custom_op_with_the_same_gradients(monkeypatch):
    """Eager training runs an autograd.Function with the custom op's body and formula; its gradients are the
    op's, and its backward calls the bodies (dX, dW), not the ops."""
    import importlib

    ops = importlib.import_module("accel.ops.bsr_conv")
    ws, geo, x, v, crow, col, bias = _setup(CASES[0])
    x, v, bias = x.requires_grad_(), v.requires_grad_(), bias.requires_grad_()
    y = bsr_conv2d(x, v, crow, col, ws, bias, *geo)
    assert type(y.grad_fn).__name__ == "_BsrConv2dFunctionBackward"
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, v, bias), g)
    y_op = torch.ops.accel.bsr_conv2d(x, v, crow, col, list(ws), bias, *[list(t) for t in geo], False)
    for a, b in zip(grads, torch.autograd.grad(y_op, (x, v, bias), g)):
        assert torch.equal(a, b)
    calls = []
    for name in ("_bsr_conv2d_dx_op", "_bsr_conv2d_dw_op"):
        monkeypatch.setattr(ops, name, lambda *a, name=name: calls.append(name))
    torch.autograd.grad(bsr_conv2d(x, v, crow, col, ws, bias, *geo), (x, v), g)
    assert not calls


def test_trainable_layer_records_its_own_path_with_the_ops_gradients():
    """A trainable SparseConv2d's call is recorded as its module path (plans, engine decisions) under the op's
    autograd formula: the op's output and gradients, and an in-place update of the values (an optimizer
    step) reaches the next call."""
    sc = SparseConv2d.from_dense(nn.Conv2d(32, 48, 3, padding=1), sparsity=0.5, block=16, mode="sparse")
    x = torch.randn(2, 32, 6, 6, requires_grad=True)
    geo = [[1, 1], [1, 1], [1, 1]]
    for step in range(2):
        y = sc(x)
        assert type(y.grad_fn).__name__ == "_ModuleBsrConv2dFunctionBackward"
        y_op = torch.ops.accel.bsr_conv2d(x, sc.values, sc.crow_indices, sc.col_indices, list(sc.weight_shape), sc.bias,
                                          *geo, False)
        torch.testing.assert_close(y, y_op, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(y)
        for a, b in zip(torch.autograd.grad(y, (x, sc.values, sc.bias), g),
                        torch.autograd.grad(y_op, (x, sc.values, sc.bias), g)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            sc.values.mul_(0.5)  # what an optimizer step does


@pytest.mark.parametrize("batch", [4, 0])
def test_inplace_relu_after_a_trainable_layer(batch):
    """A trainable SparseConv2d's output (channels_last input: the kernels' permuted result) can be changed in
    place, as nn.ReLU(inplace=True) after a conv does, with the gradients of the dense conv."""
    conv = nn.Conv2d(64, 64, 3, padding=1)
    sc = SparseConv2d.from_dense(conv, sparsity=0.75, block=32, mode="sparse")
    dense = nn.Conv2d(64, 64, 3, padding=1)
    with torch.no_grad():
        dense.weight.copy_(sc.dense_weight())
        dense.bias.copy_(sc.bias)
    x = torch.randn(batch, 64, 8, 8).to(memory_format=torch.channels_last).requires_grad_()
    for layer in (sc, dense):
        x.grad = None
        nn.Sequential(layer, nn.ReLU(inplace=True))(x).square().sum().backward()
        grads = x.grad.clone()
    x.grad = None
    sc_out = nn.Sequential(sc, nn.ReLU(inplace=True))(x)
    sc_out.square().sum().backward()
    torch.testing.assert_close(x.grad, grads, rtol=1e-4, atol=1e-4)


def test_vmap_and_batched_gradients_of_a_trainable_layer():
    """vmap over a trainable SparseConv2d and ``is_grads_batched`` backward passes give a loop's results."""
    ws, geo, x, v, crow, col, bias = _setup(CASES[0])
    v, bias = v.requires_grad_(), bias.requires_grad_()

    def f(a):
        return bsr_conv2d(a, v, crow, col, ws, bias, *geo)

    xs = torch.randn(2, *x.shape)
    torch.testing.assert_close(torch.func.vmap(f)(xs), torch.stack([f(a) for a in xs]), rtol=1e-6, atol=1e-6)
    x = x.requires_grad_()
    y = f(x)
    gs = torch.randn(3, *y.shape)
    batched = torch.autograd.grad(y, (x, v), gs, is_grads_batched=True, retain_graph=True)
    for i, g in enumerate(gs):
        for a, b in zip(batched, torch.autograd.grad(y, (x, v), g, retain_graph=True)):
            torch.testing.assert_close(a[i], b, rtol=1e-5, atol=1e-5)


def test_opcheck():
    ws, geo, x, v, crow, col, bias = _setup(CASES[0])
    x.requires_grad_()
    v.requires_grad_()
    geo_l = [list(g) for g in geo]
    torch.library.opcheck(torch.ops.accel.bsr_conv2d.default, (x, v, crow, col, list(ws), bias, *geo_l, False))
    y = bsr_conv2d(x.detach(), v.detach(), crow, col, ws, bias, *geo)
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.accel.bsr_conv2d_dx.default, (dy, v.detach(), crow, col, list(ws), list(x.shape),
                                                                  *geo_l, False))
    torch.library.opcheck(torch.ops.accel.bsr_conv2d_dw.default, (dy, x.detach(), crow, col, 16, list(ws), *geo_l,
                                                                  False))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch.compiler.reset()
    sc = SparseConv2d.from_dense(nn.Conv2d(32, 40, 3, padding=1), sparsity=0.5, block=16, mode="sparse")
    model = nn.Sequential(sc, nn.ReLU())
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = torch.randn(2, 32, 6, 6, requires_grad=True)
    y = compiled(x)
    torch.testing.assert_close(y, model(x), atol=1e-5, rtol=1e-5)
    y.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    model(x).sum().backward()
    torch.testing.assert_close(gx, x.grad, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ errors
def test_errors_name_what_is_wrong():
    ws, geo, x, v, crow, col, bias = _setup(CASES[0])
    with pytest.raises(TypeError, match="x dtype torch.float64 must equal weight dtype torch.float32"):
        bsr_conv2d(x.double(), v, crow, col, ws)
    with pytest.raises(TypeError, match="x dtype must be one of"):
        bsr_conv2d(x.to(torch.int32), v.to(torch.int32), crow, col, ws)
    with pytest.raises(TypeError, match="bias dtype"):
        bsr_conv2d(x, v, crow, col, ws, bias.double())
    with pytest.raises(ValueError, match="bias must have shape"):
        bsr_conv2d(x, v, crow, col, ws, bias[:3])
    with pytest.raises(ValueError, match="stride must be >= 1"):
        bsr_conv2d(x, v, crow, col, ws, None, 0)
    with pytest.raises(ValueError, match="padding must be >= 0"):
        bsr_conv2d(x, v, crow, col, ws, None, 1, -1)
    with pytest.raises(ValueError, match="dilation must be >= 1"):
        bsr_conv2d(x, v, crow, col, ws, None, 1, 1, (1, 0))
    with pytest.raises(ValueError, match="stride must be an int or a pair"):
        bsr_conv2d(x, v, crow, col, ws, None, (1, 1, 1))
    with pytest.raises(ValueError, match="expects 32 input channels.*groups other than 1"):
        bsr_conv2d(x[:, :16], v, crow, col, ws)
    with pytest.raises(ValueError, match="x must be \\[N, C, H, W\\]"):
        bsr_conv2d(x[0, 0], v, crow, col, ws)
    with pytest.raises(ValueError, match="too small for kernel 3x3"):
        bsr_conv2d(x[:, :, :1, :1], v, crow, col, ws)
    with pytest.raises(ValueError, match="weight_shape must be"):
        bsr_conv2d(x, v, crow, col, (40, 32, 3))
    with pytest.raises(ValueError, match="block size"):
        bsr_conv2d(x, v[:, :8, :8], crow, col, ws)
    with pytest.raises(ValueError, match="crow_indices has 2 block rows"):
        bsr_conv2d(x, v, crow[:3], col, ws)
    bad = crow.clone()
    bad[1] = 10 ** 6
    with pytest.raises(ValueError, match="crow_indices"):
        bsr_conv2d(x, v, bad, col, ws)
    bad_col = col.clone()
    bad_col[0] = 10 ** 6
    with pytest.raises(ValueError, match="col_indices must lie in"):
        bsr_conv2d(x, v, crow, bad_col, ws)
    with pytest.raises(ValueError, match="different devices"):
        bsr_conv2d(x, v, crow, col, ws, bias.to("meta"))


# ------------------------------------------------------------------------------------------------ module
def _conv(c=32, o=40, k=3, **kw):
    torch.manual_seed(1)
    return nn.Conv2d(c, o, k, **kw)


@pytest.mark.parametrize("mode", SparseConv2d.MODES)
def test_module_matches_masked_dense_conv(mode):
    conv = _conv(stride=2, padding=1, dilation=1)
    sc = SparseConv2d.from_dense(conv, sparsity=0.75, block=16, mode=mode)
    assert sc.density == pytest.approx(0.25, abs=0.02) and sc.mode == mode
    dense = sc.to_dense()
    assert isinstance(dense, nn.Conv2d) and dense.stride == (2, 2)
    kept = expand_block_mask(sc.bsr().block_mask(), 16, (40, 288)).reshape(40, 3, 3, 32).permute(0, 3, 1, 2)
    assert torch.equal(dense.weight != 0, kept)  # exactly the stored blocks (Gaussian weights have no zeros)
    x = torch.randn(3, 32, 9, 8)
    with torch.no_grad():
        torch.testing.assert_close(sc(x), dense(x), atol=1e-4, rtol=1e-4)
        assert sc(x).is_contiguous()  # the input's layout, as nn.Conv2d
        assert sc(x.contiguous(memory_format=torch.channels_last)).is_contiguous(memory_format=torch.channels_last)


def test_from_dense_masks():
    conv = _conv()
    nbr, nbc = math.ceil(40 / 16), math.ceil(9 * 32 / 16)
    bm = torch.zeros(nbr, nbc, dtype=torch.bool)
    bm[0, 3] = bm[2, 17] = True
    sc = SparseConv2d.from_dense(conv, block=16, mask=bm)
    assert sc.values.shape[0] == 2 and sc.col_indices.tolist() == [3, 17]
    # block (0, 3) is channels 16..31 of tap (0, 1) (K ordered (kh, kw, c)) for outputs 0..15
    w = sc.dense_weight()
    assert torch.equal(w[:16, 16:32, 0, 1], conv.weight.detach()[:16, 16:32, 0, 1])
    assert int((w != 0).sum()) == 16 * 16 + 8 * 16  # block row 2 holds output channels 32..39 only
    elementwise = torch.zeros_like(conv.weight, dtype=torch.bool)
    elementwise[5, 7, 2, 2] = True  # K index (2*3 + 2)*32 + 7 = 263 -> block column 16
    sc = SparseConv2d.from_dense(conv, block=16, mask=elementwise)
    assert sc.col_indices.tolist() == [16] and int((sc.dense_weight() != 0).sum()) == 1
    with pytest.raises(ValueError, match="only 0 and 1"):
        SparseConv2d.from_dense(conv, block=16, mask=elementwise.float() * 0.5)
    with pytest.raises(ValueError, match="either sparsity or mask"):
        SparseConv2d.from_dense(conv, 0.5, 16, mask=bm)
    with pytest.raises(ValueError, match="block size must be an int in"):
        SparseConv2d.from_dense(conv, 0.5, 128)


def test_prune_block_masks_are_sparse_conv_blocks():
    model = nn.Sequential(_conv(), nn.ReLU(), nn.Conv2d(40, 24, 1))
    # the blocks are ranked in (kh, kw, c) order, SparseConv2d's layout
    ohwi = model[0].weight.detach().permute(0, 2, 3, 1).reshape(40, -1)
    want = topk_block_mask(block_norms(ohwi, 16), 0.6)
    masks = block_masks(model, 0.6, block=16, scope="layer", filter_fn=lambda m, n: True)
    assert masks["0"].shape == (3, 18) and torch.equal(masks["0"], want)
    apply_masks_(model, masks, 16)
    sc = SparseConv2d.from_dense(model[0], block=16, mask=masks["0"])
    assert torch.equal(sc.dense_weight(), model[0].weight.detach())  # apply_masks_ zeroed exactly the other blocks
    assert sc.values.shape[0] == int(masks["0"].sum()) and sc.density == pytest.approx(0.4, abs=0.02)


def test_unsupported_convs_raise():
    for conv, why in ((nn.Conv2d(32, 32, 3, groups=2), "groups=2"),
                      (nn.Conv2d(32, 32, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
                      (nn.Conv2d(32, 32, 2, padding="same"), "padding='same' with an even")):
        assert why in SparseConv2d.unsupported_reason(conv)
        with pytest.raises(ValueError, match="keep this layer dense"):
            SparseConv2d.from_dense(conv, 0.5)
    same = nn.Conv2d(32, 16, 3, padding="same", dilation=2)
    sc = SparseConv2d.from_dense(same, 0.5, 16)
    assert sc.padding == (2, 2)
    x = torch.randn(1, 32, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(sc(x), sc.to_dense()(x), atol=1e-5, rtol=1e-5)


def test_training_updates_only_stored_blocks():
    sc = SparseConv2d.from_dense(_conv(padding=1), 0.75, 16, mode="sparse")
    dense_mode = SparseConv2d.from_dense(_conv(padding=1), 0.75, 16, mode="dense")
    opt = torch.optim.SGD(list(sc.parameters()) + list(dense_mode.parameters()), lr=0.1)
    mask = sc.dense_weight() != 0
    x = torch.randn(2, 32, 6, 6)
    for _ in range(3):
        opt.zero_grad()
        (sc(x).pow(2).mean() + dense_mode(x).pow(2).mean()).backward()
        opt.step()
    torch.testing.assert_close(sc.dense_weight(), dense_mode.dense_weight(), atol=1e-5, rtol=1e-4)
    assert (sc.dense_weight()[~mask] == 0).all() and (dense_mode.weight.detach()[~mask] == 0).all()
    assert not torch.equal(sc.dense_weight()[mask], _conv(padding=1).weight.detach()[mask])


@pytest.mark.parametrize("mode", SparseConv2d.MODES)
def test_state_dict_round_trip_with_other_nnz(mode):
    src = SparseConv2d.from_dense(_conv(padding=1), 0.5, 16, mode=mode)
    dst = SparseConv2d.from_dense(_conv(padding=1), 0.9, 16, mode="sparse" if mode == "dense" else "dense")
    dst.load_state_dict(src.state_dict())
    assert dst.mode == mode and torch.equal(dst.dense_weight(), src.dense_weight())
    x = torch.randn(1, 32, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))


def test_failed_load_changes_nothing():
    src = SparseConv2d.from_dense(_conv(padding=1), 0.5, 16, mode="sparse")
    dst = SparseConv2d.from_dense(_conv(padding=1), 0.9, 16, mode="sparse")
    before = {k: v.clone() for k, v in dst.state_dict().items() if isinstance(v, torch.Tensor)}
    sd = src.state_dict()
    sd["crow_indices"] = sd["crow_indices"].clone()
    sd["crow_indices"][1] = 10 ** 6
    with pytest.raises(RuntimeError, match="crow_indices"):
        dst.load_state_dict(sd)
    other = SparseConv2d.from_dense(_conv(padding=2), 0.5, 16).state_dict()
    with pytest.raises(RuntimeError, match="this module is"):
        dst.load_state_dict(other)
    after = {k: v for k, v in dst.state_dict().items() if isinstance(v, torch.Tensor)}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_deepcopy_to_bf16_and_repr():
    sc = SparseConv2d.from_dense(_conv(padding=1), 0.5, 16)
    cp = copy.deepcopy(sc)
    assert cp.values.data_ptr() != sc.values.data_ptr() and torch.equal(cp.values, sc.values)
    half = cp.to(torch.bfloat16)
    x = torch.randn(2, 32, 6, 6)
    with torch.no_grad():
        y = half(x.bfloat16())
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), sc(x), atol=0.15, rtol=0.03)
    assert "block_size=16" in repr(sc) and "mode=auto" in repr(sc) and "kernel_size=(3, 3)" in repr(sc)


# ------------------------------------------------------------------------------------------------ api
class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.c3 = nn.Conv2d(64, 64, 1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        x = F.relu(self.c3(self.dw(x)))
        return self.fc(x.mean((2, 3)))


def test_sparsify_converts_convs_and_reports_unsupported(tmp_path):
    torch.manual_seed(0)
    model = _CNN()
    x = torch.randn(2, 3, 12, 12)
    ref_model = copy.deepcopy(model)
    rows = accel.sparsify_(model, accel.SparsityConfig(sparsity=0.5, block=16, scope="layer", convs=True))
    kinds = {n: type(model.get_submodule(n)).__name__ for n in ("c1", "c2", "dw", "c3", "fc")}
    assert kinds == {"c1": "SparseConv2d", "c2": "SparseConv2d", "dw": "Conv2d", "c3": "SparseConv2d",
                     "fc": "SparseLinear"}
    dw_row = next(r for r in rows if r["layer"] == "dw")
    assert dw_row["decision"] == "dense" and "groups=64" in dw_row["reason"]
    # the sparse model computes the pruned dense model
    for n in ("c1", "c2", "c3"):
        ref_model.get_submodule(n).weight.data.copy_(model.get_submodule(n).dense_weight())
    ref_model.fc.weight.data.copy_(model.fc.dense_weight())
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref_model(x), atol=1e-4, rtol=1e-4)
    path = str(tmp_path / "cnn.safetensors")
    accel.save(model, path)
    loaded = accel.load(_CNN(), path)
    assert isinstance(loaded.c2, SparseConv2d) and type(loaded.dw) is nn.Conv2d
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match="conv geometry"):
        other = _CNN()
        other.c2 = nn.Conv2d(32, 64, 3, stride=1, padding=1)
        accel.load(other, path)
    # without convs=True the convs stay (as before); linearize_kept_dense_ turns dense SparseConv2d back
    plain = _CNN()
    accel.sparsify_(plain, accel.SparsityConfig(sparsity=0.5, block=16))
    assert type(plain.c1) is nn.Conv2d and isinstance(plain.fc, accel.SparseLinear)
    assert accel.api.linearize_kept_dense_(model, [{"layer": "c1", "decision": "dense"},
                                                   {"layer": "dw", "decision": "dense"}]) == ["c1"]
    assert type(model.c1) is nn.Conv2d


def test_sparsify_with_masks_and_measurement(accel_env, monkeypatch):
    accel_env(ACCEL_ENGINE_MEASURE="1")
    monkeypatch.setattr(engines, "BUDGET_S", 0.01)
    monkeypatch.setattr(engines, "MIN_ROUNDS", 2)
    monkeypatch.setattr(engines, "_contended", lambda mark=None: False)  # a busy machine would decide nothing
    engines.clear()
    torch.manual_seed(0)
    model = _CNN()
    masks = block_masks(model, 0.75, block=16, filter_fn=lambda m, n: n in ("c2", "c3"))
    rows = accel.sparsify_(model, accel.SparsityConfig(block=16, budget_s=0.01, batch_sizes=(1, 4)), masks=masks,
                           example_inputs=(torch.randn(2, 3, 12, 12),))
    assert [(r["layer"], r["batch"]) for r in rows] == [("c2", 1), ("c2", 4), ("c3", 1), ("c3", 4)]
    for r in rows:
        assert r["ms_before"] > 0 and r["ms_after"] > 0
        if r["decision"] == "kept dense":  # the in-model check found the sparse conv slower inside the model
            assert "slower inside the model" in r["reason"] and type(model.get_submodule(r["layer"])) is nn.Conv2d
            continue
        assert r["decision"].split(": ")[1] in cpu_engines(64 if r["layer"] == "c3" else 32, 16, torch.float32, True,
                                                           nchw=True)  # (the inputs are NCHW)
    engines.clear()


# ------------------------------------------------------------------------------------------------ Triton path
@pytest.mark.interpreter
@pytest.mark.skipif(not interpret_mode(), reason="routes CPU tensors through the interpreted Triton kernels")
@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=_id)
def test_triton_path_end_to_end(accel_env, case):
    """Forward and backward through the (interpreted) Triton kernels equal the CPU path (fp32: bf16 is
    broken in the interpreter)."""
    ws, geo, x, v, crow, col, bias = _setup(case)
    dy = torch.randn(conv_ref(x, v, crow, col, ws, None, *geo).shape)

    def run():
        xx = x.clone().requires_grad_()
        vv = v.clone().requires_grad_()
        bb = bias.clone().requires_grad_()
        y = bsr_conv2d(xx, vv, crow, col, ws, bb, *geo)
        (y * dy).sum().backward()
        return y.detach(), xx.grad, vv.grad, bb.grad

    cpu = run()
    accel_env(ACCEL_FORCE_TRITON="1")
    tri = run()
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else \
        torch.contiguous_format
    assert tri[0].is_contiguous(memory_format=fmt)
    for a, b in zip(cpu, tri):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tri[0].double(), conv_ref(x, v, crow, col, ws, bias, *geo), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ fuzz
@st.composite
def conv_cases(draw):
    b = draw(st.sampled_from(BLOCK_SIZES))
    c = draw(st.sampled_from([b, 2 * b, draw(st.integers(1, 40))]))
    o = draw(st.integers(1, 70))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    min_h = max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0])
    min_w = max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1])
    h, w = draw(st.integers(min_h, min_h + 8)), draw(st.integers(min_w, min_w + 8))
    n = draw(st.integers(0, 3))
    density = draw(st.sampled_from([0.0, 0.3, 1.0]))
    return (n, c, h, w, o, kh, kw, stride, padding, dilation, b, density, ()), draw(st.booleans()), draw(st.integers(0, 99))


@FUZZ
@given(conv_cases())
def test_fuzz_every_engine(drawn):
    case, channels_last, seed = drawn
    ws, geo, x, v, crow, col, bias = _setup(case, seed=seed)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ref = conv_ref(x, v, crow, col, ws, bias, *geo)
    for engine in cpu_engines(ws[1], v.shape[1], torch.float32, True, nchw=True):
        with torch.no_grad(), engines.force(bsr_conv2d=engine):
            y = bsr_conv2d(x, v, crow, col, ws, bias, *geo, allow_dense=True)
        torch.testing.assert_close(y.double(), ref, **_tol(torch.float32, ws[1] * ws[2] * ws[3]), msg=engine)


def test_the_engine_is_decided_per_input_layout(measuring):
    """NCHW and channels_last inputs run at other speeds (an NCHW input is copied to channels_last, or its output
    stored NCHW): each layout gets its own measured decision."""
    from accel import SparseConv2d, engines

    torch.manual_seed(0)
    s = SparseConv2d.from_dense(torch.nn.Conv2d(32, 32, 3, padding=1), sparsity=0.5, block=16, mode="auto")
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        s(torch.randn(2, 32, 8, 16)[..., ::2])  # strided 8x8: measured apart (native_nchw reads only a contiguous one)
        s(x)
        s(x.contiguous(memory_format=torch.channels_last))
    keys = sorted(k for k in engines.decisions() if k.startswith("bsr_conv2d|"))
    assert len(keys) == 3 and ["cl=0" in keys[0], "cl=1" in keys[1], "cl=2" in keys[2]] == [True] * 3, keys
    assert "native_nchw" in engines.decision(keys[0]).times_ms | engines.decision(keys[0]).rejected
