import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from accel import SparseLinear, engines
from accel.formats import expand_block_mask
from accel.ops import bsr_linear
from tests.helpers import interpret_mode


def _linear(k=100, n=70, bias=True, dtype=torch.float32):
    return nn.Linear(k, n, bias=bias, dtype=dtype)


def _masked_reference(sl: SparseLinear, x):
    return F.linear(x.double(), sl.dense_weight().double(), None if sl.bias is None else sl.bias.double())


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("block", [16, 32])
def test_from_dense_sparsity(sparsity, block):
    lin = _linear()
    sl = SparseLinear.from_dense(lin, sparsity=sparsity, block=block, mode="sparse")
    nb = (-(-70 // block)) * (-(-100 // block))
    assert sl.values.shape[0] == round((1 - sparsity) * nb)
    x = torch.randn(7, 100)
    torch.testing.assert_close(sl(x).double(), _masked_reference(sl, x), atol=1e-4, rtol=1e-4)
    # kept blocks hold the original weights
    mask = expand_block_mask(sl.bsr().block_mask(), block, (70, 100))
    assert torch.equal(sl.dense_weight()[mask], lin.weight.detach()[mask])


def test_keeps_highest_norm_blocks():
    lin = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        lin.weight.fill_(0.01)
        lin.weight[:16, 16:32] = 5.0  # one block dominates
    sl = SparseLinear.from_dense(lin, sparsity=0.875, block=16, mode="sparse")  # keep 1 of 8 blocks
    assert sl.bsr().block_mask().nonzero().tolist() == [[0, 1]]


def test_from_elementwise_mask_and_block_mask():
    lin = _linear()
    mask = torch.rand(70, 100) > 0.5
    sl = SparseLinear.from_dense(lin, mask=mask, block=32, mode="sparse")
    torch.testing.assert_close(sl.dense_weight(), lin.weight.detach() * mask)
    bmask = torch.zeros(3, 4, dtype=torch.bool)
    bmask[1, 2] = True
    sl2 = SparseLinear.from_dense(lin, mask=bmask, block=32, mode="sparse")
    assert sl2.values.shape[0] == 1
    assert torch.equal(sl2.dense_weight()[32:64, 64:96], lin.weight.detach()[32:64, 64:96])


@pytest.mark.parametrize("engine", ["gather_bmm", "gather_bmm_t", "panels", "rows", "dense"])
def test_auto_mode_runs_every_engine(engine):
    """mode "auto" keeps the blocks and may run any strategy or the densified weight; all agree."""
    lin = nn.Linear(256, 200)
    sl = SparseLinear.from_dense(lin, sparsity=0.5, block=32)
    assert sl.mode == "auto" and sl.storage == "sparse"
    x = torch.randn(37, 256)
    with torch.no_grad(), engines.force(bsr_linear=engine):
        torch.testing.assert_close(sl(x).double(), _masked_reference(sl, x), atol=1e-4, rtol=1e-4)
    sparse_only = SparseLinear.from_dense(lin, sparsity=0.5, block=32, mode="sparse")
    if engine == "dense":
        with torch.no_grad(), engines.force(bsr_linear=engine), pytest.raises(ValueError, match="cannot run this call"):
            sparse_only(x)


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_gradients_match_masked_dense(mode):
    lin = _linear()
    sl = SparseLinear.from_dense(lin, sparsity=0.5, block=16, mode=mode)
    x = torch.randn(9, 100, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    mask = expand_block_mask(sl.bsr().block_mask(), 16, (70, 100)).float()
    w_ref = sl.dense_weight().clone().requires_grad_()
    b_ref = sl.bias.detach().clone().requires_grad_()
    dy = torch.randn(9, 70)
    (sl(x) * dy).sum().backward()
    (F.linear(x_ref, w_ref * mask, b_ref) * dy).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sl.bias.grad, b_ref.grad)
    if mode == "sparse":
        grad_w = SparseLinear.from_dense(_as_linear(w_ref.grad), mask=sl.bsr().block_mask(), block=16, mode="sparse")
        torch.testing.assert_close(sl.values.grad, grad_w.values, atol=1e-4, rtol=1e-4)
    else:
        torch.testing.assert_close(sl.weight.grad, w_ref.grad * mask, atol=1e-4, rtol=1e-4)


def _as_linear(w):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    return lin


def test_gradcheck_fp64():
    lin = nn.Linear(40, 36, dtype=torch.float64)
    sl = SparseLinear.from_dense(lin, sparsity=0.5, block=16, mode="sparse")
    x = torch.randn(5, 40, dtype=torch.float64, requires_grad=True)
    fn = lambda x, v, b: bsr_linear(x, v, sl.crow_indices, sl.col_indices, (36, 40), b)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, sl.values.detach().clone().requires_grad_(), sl.bias.detach().clone()
                                         .requires_grad_()))


def test_training_keeps_pruned_blocks_zero():
    lin = _linear()
    for mode in ("sparse", "dense"):
        sl = SparseLinear.from_dense(lin, sparsity=0.5, block=16, mode=mode)
        before = sl.bsr().block_mask()
        opt = torch.optim.SGD(sl.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            sl(torch.randn(8, 100)).pow(2).mean().backward()
            opt.step()
        w = sl.dense_weight()
        assert torch.equal(w[~expand_block_mask(before, 16, (70, 100))], torch.zeros(int((~expand_block_mask(
            before, 16, (70, 100))).sum())))


def test_batched_input_and_no_bias():
    sl = SparseLinear.from_dense(_linear(bias=False), sparsity=0.5, block=32, mode="sparse")
    x = torch.randn(2, 3, 5, 100)
    y = sl(x)
    assert y.shape == (2, 3, 5, 70)
    torch.testing.assert_close(y.double(), _masked_reference(sl, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_state_dict_round_trip_with_other_nnz(mode):
    src = SparseLinear.from_dense(_linear(), sparsity=0.3, block=16, mode=mode)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    dst = SparseLinear.from_dense(_linear(), sparsity=0.8, block=16, mode="sparse")  # other nnz and mode
    dst.load_state_dict(sd)
    assert dst.mode == mode
    x = torch.randn(4, 100)
    torch.testing.assert_close(dst(x), src(x))
    fresh = SparseLinear(100, 70, block_size=16)
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh(x), src(x))


def test_load_rejects_other_shape():
    sd = SparseLinear.from_dense(_linear(), sparsity=0.5, block=16).state_dict()
    dst = SparseLinear.from_dense(_linear(), sparsity=0.5, block=32)
    before = {k: v.clone() for k, v in dst.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(RuntimeError, match=r"state is for \(block, in, out\) = \(16, 100, 70\), this module is \(32, "):
        dst.load_state_dict(sd)
    after = dst.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # unchanged


def test_deepcopy_and_to():
    sl = SparseLinear.from_dense(_linear(), sparsity=0.5, block=16, mode="sparse")
    cp = copy.deepcopy(sl)
    x = torch.randn(3, 100)
    torch.testing.assert_close(cp(x), sl(x))
    cp.values.data.zero_()
    assert sl.values.abs().sum() > 0
    d = copy.deepcopy(sl).to(torch.float64)
    assert d.values.dtype == torch.float64 and d.crow_indices.dtype == torch.int64
    torch.testing.assert_close(d(x.double()), sl(x).double(), atol=1e-5, rtol=1e-5)
    assert sl.to("cpu") is sl


def test_to_linear_round_trip():
    sl = SparseLinear.from_dense(_linear(), sparsity=0.5, block=16, mode="sparse")
    lin = sl.to_linear()
    x = torch.randn(3, 100)
    torch.testing.assert_close(lin(x), sl(x), atol=1e-5, rtol=1e-5)


def test_extra_repr():
    sl = SparseLinear.from_dense(nn.Linear(64, 64), sparsity=0.5, block=16, mode="sparse")
    assert "block_size=16" in repr(sl) and "density=0.500" in repr(sl) and "mode=sparse" in repr(sl)


def test_errors_name_the_values():
    sl = SparseLinear.from_dense(_linear(), sparsity=0.5, block=16, mode="sparse")
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 100\], got \(3, 99\)"):
        sl(torch.randn(3, 99))
    with pytest.raises(TypeError, match="x dtype torch.float64 must equal weight dtype torch.float32"):
        sl(torch.randn(3, 100, dtype=torch.float64))
    with pytest.raises(TypeError, match="expects nn.Linear, got Conv2d"):
        SparseLinear.from_dense(nn.Conv2d(3, 3, 3), sparsity=0.5)
    with pytest.raises(ValueError, match=r"block_size must be an int in .* got 48"):
        SparseLinear(100, 70, block_size=48)
    with pytest.raises(ValueError, match="either sparsity or mask"):
        SparseLinear.from_dense(_linear(), sparsity=0.5, mask=torch.ones(70, 100))
    with pytest.raises(ValueError, match="mode must be one of"):
        SparseLinear.from_dense(_linear(), sparsity=0.5, mode="fast")


# ---------------------------------------------------------------- torch.compile and op registration
def _opcheck_args():
    sl = SparseLinear.from_dense(_linear(), sparsity=0.5, block=16, mode="sparse")
    x = torch.randn(5, 100, requires_grad=True)
    return sl, x


def test_eager_training_skips_the_custom_op_with_the_same_gradients(monkeypatch):
    """Eager training runs an autograd.Function with the custom op's body and formula (the op dispatch costs
    ~0.1 ms a call on a CPU); its gradients are the op's, and its backward calls the bodies, not the ops."""
    import importlib

    ops = importlib.import_module("accel.ops.bsr_linear")  # (accel.ops.bsr_linear is also a function's name)
    sl, x = _opcheck_args()
    y = sl(x)
    # (under a view) the layer's own path; the functional bsr_linear records the op's body
    assert type(y.grad_fn.next_functions[0][0]).__name__ == "_ModuleBsrLinearFunctionBackward"
    y_fn = bsr_linear(x, sl.values, sl.crow_indices, sl.col_indices, (70, 100), sl.bias)
    assert type(y_fn.grad_fn.next_functions[0][0]).__name__ == "_BsrLinearFunctionBackward"
    assert torch.equal(y, y_fn)
    g = torch.randn_like(y)
    gx, gv, gb = torch.autograd.grad(y, (x, sl.values, sl.bias), g)
    y_op = torch.ops.accel.bsr_linear(x, sl.values, sl.crow_indices, sl.col_indices, 70, sl.bias, False)
    for a, b in zip((gx, gv, gb), torch.autograd.grad(y_op, (x, sl.values, sl.bias), g)):
        assert torch.equal(a, b)
    calls = []
    for name in ("_bsr_linear_dx_op", "_bsr_sddmm_op"):
        monkeypatch.setattr(ops, name, lambda *a, name=name: calls.append(name))
    torch.autograd.grad(sl(x), (x, sl.values), g)
    assert not calls


def test_vmap_and_batched_gradients_of_a_trainable_layer():
    """torch.func.vmap over a layer whose parameters require grad, and batched backward passes
    (``is_grads_batched``, vectorized jacobians), go through the custom ops (PyTorch batches them): the
    results equal a loop over the batch."""
    sl, _ = _opcheck_args()
    xs = torch.randn(3, 5, 100)
    torch.testing.assert_close(torch.func.vmap(sl)(xs), torch.stack([sl(x) for x in xs]), rtol=0, atol=0)
    x = torch.randn(3, 100, requires_grad=True)
    y = sl(x)
    gs = torch.randn(4, *y.shape)
    batched = torch.autograd.grad(y, (x, sl.values), gs, is_grads_batched=True, retain_graph=True)
    for i, g in enumerate(gs):
        for a, b in zip(batched, torch.autograd.grad(y, (x, sl.values), g, retain_graph=True)):
            torch.testing.assert_close(a[i], b, rtol=1e-6, atol=1e-6)


def test_opcheck():
    from accel.formats import bsr_row_indices  # noqa: F401  (ops registered on import)

    sl, x = _opcheck_args()
    v = sl.values.detach().clone().requires_grad_()
    torch.library.opcheck(torch.ops.accel.bsr_linear.default,
                          (x, v, sl.crow_indices, sl.col_indices, 70, sl.bias.detach(), False))
    dy = torch.randn(5, 70)
    torch.library.opcheck(torch.ops.accel.bsr_linear_dx.default, (dy, v.detach(), sl.crow_indices, sl.col_indices,
                                                                  100, False))
    torch.library.opcheck(torch.ops.accel.bsr_sddmm.default, (dy, x.detach(), sl.crow_indices, sl.col_indices, 16,
                                                              False))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(backend, dynamic):
    torch.compiler.reset()
    sl, _ = _opcheck_args()
    model = nn.Sequential(sl, nn.ReLU())
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=dynamic)
    for m in (4, 9):
        x = torch.randn(m, 100, requires_grad=True)
        y = compiled(x)
        torch.testing.assert_close(y, model(x), atol=1e-5, rtol=1e-5)
        y.sum().backward()
        gx = x.grad.clone()
        x.grad = None
        model(x).sum().backward()
        torch.testing.assert_close(gx, x.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.interpreter
@pytest.mark.skipif(not interpret_mode(), reason="routes CPU tensors through the interpreted Triton kernels")
def test_triton_path_end_to_end(accel_env):
    """Forward and backward of SparseLinear through the (interpreted) Triton kernels equal the CPU path."""
    sl = SparseLinear.from_dense(_linear(), sparsity=0.5, block=16, mode="sparse")
    x = torch.randn(9, 100)
    dy = torch.randn(9, 70)

    def run():
        sl.zero_grad()
        xx = x.clone().requires_grad_()
        (sl(xx) * dy).sum().backward()
        return sl(x).detach(), xx.grad, sl.values.grad.clone(), sl.bias.grad.clone()

    cpu = run()
    accel_env(ACCEL_FORCE_TRITON="1")
    tri = run()
    for a, b in zip(cpu, tri):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
