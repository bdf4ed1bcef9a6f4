"""Regression tests for the reliability defects found by probing as a new user would (issue 8): no silent
wrong results, no crashes, no state lost, errors that name the values and change nothing."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import accel
from accel import QuantConv2d, QuantLinear, SparseLinear
from accel.ops.int8 import int8_conv2d
from accel.quant import int8_conv2d_ref, quantize_per_image_ref, quantize_rows_ref, sqnr


def _exact_conv(q: QuantConv2d, x: torch.Tensor) -> torch.Tensor:
    qmax = q.act_qmax or accel.engines.native_act_qmax()
    xq, xs = quantize_per_image_ref(x, qmax)
    return int8_conv2d_ref(xq, xs, q.weight_q, q.weight_scale, q.bias, q.stride, q.padding, q.dilation)


# 1, 2: oneDNN's int8 conv is wrong for some geometries; accel must not return it
@pytest.mark.parametrize("conv, shape", [
    (nn.Conv2d(4, 4, 3, stride=3), (1, 4, 17, 5)),  # output width 1
    (nn.Conv2d(8, 8, 3, stride=2, padding=1), (1, 8, 11, 2)),  # tall and narrow
    (nn.Conv2d(8, 8, 3, stride=2, padding=1), (2, 8, 1, 9)),  # output height 1
    (nn.Conv2d(1, 21, (2, 5), stride=(3, 1), padding=(2, 0)), (1, 1, 5, 9)),  # one input channel
    (nn.Conv2d(4, 4, (3, 1), padding=(1, 0)), (1, 4, 4, 16)),  # class K (AMX)
    (nn.Conv2d(16, 16, (3, 1), padding=(1, 0)), (1, 16, 8, 32)),  # class K
    (nn.Conv2d(64, 6, (1, 3), stride=(3, 1), padding=(0, 3), dilation=(1, 2)), (1, 64, 37, 8)),  # class X
    (nn.Conv2d(8, 35, (5, 1), stride=(2, 4), padding=(0, 3), dilation=(1, 3)), (2, 8, 39, 1)),  # class P: SIGSEGV
    (nn.Conv2d(8, 8, 1, padding=1), (1, 8, 6, 6)),  # class P: the border reads only padding
], ids=["ow1", "narrow", "oh1", "c1", "K4", "K16", "X", "P-crash", "P-1x1"])
@pytest.mark.parametrize("engine", [None, "onednn", "im2col"])
def test_conv_geometries_oneDNN_gets_wrong(conv, shape, engine):
    torch.manual_seed(0)
    q = QuantConv2d.from_float(conv)
    x = torch.randn(shape)
    if engine == "onednn" and not accel.cpu.int8.onednn_conv_ok(shape[1], shape[2], shape[3], *q.kernel_size, q.stride,
                                                               q.padding, q.dilation):
        with accel.engines.force(int8_conv2d="onednn"), pytest.raises(ValueError, match="cannot run this call"):
            q(x)
        return
    ctx = accel.engines.force(int8_conv2d=engine) if engine else accel.engines.force()
    with ctx, torch.no_grad():
        y = q(x)
        torch.testing.assert_close(y, _exact_conv(q, x), atol=1e-4, rtol=1e-5)
        assert sqnr(conv(x), y) > 25


# 3: bad conv arguments are ValueErrors, never a crash
@pytest.mark.parametrize("kwargs, match", [
    ({"stride": 0}, r"stride >= 1.*stride \[0, 0\]"),
    ({"padding": -1}, r"padding >= 0.*padding \[-1, -1\]"),
    ({"dilation": 0}, r"dilation >= 1.*dilation \[0, 0\]"),
    ({"stride": (1, 0)}, r"stride \[1, 0\]"),
])
def test_bad_conv_geometry_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConv2d(3, 8, 3, **kwargs)
    q = QuantConv2d.from_float(nn.Conv2d(3, 8, 3))
    geometry = {"stride": 1, "padding": 0, "dilation": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        int8_conv2d(torch.randn(1, 3, 8, 8), q.weight_q, q.weight_scale, None, **geometry)


# 4, 7: block structure checked on load and at the op; a failed load changes nothing
def _sparse():
    torch.manual_seed(0)
    return SparseLinear.from_dense(nn.Linear(256, 64), sparsity=0.5)


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}, m.mode


def _unchanged(m, snap):
    sd = m.state_dict()
    return m.mode == snap[1] and sd.keys() >= snap[0].keys() and all(
        torch.equal(sd[k], v) and sd[k].shape == v.shape for k, v in snap[0].items())


@pytest.mark.parametrize("corrupt, match", [
    (lambda sd: sd["crow_indices"].__setitem__(1, 10 ** 9), "crow_indices decreases|end at nnz"),
    (lambda sd: sd["crow_indices"].__setitem__(-1, 3), "end at nnz"),
    (lambda sd: sd["col_indices"].__setitem__(0, 99), r"col_indices must lie in \[0, 8\)"),
    (lambda sd: sd["col_indices"].__setitem__(1, int(sd["col_indices"][0])), "increase strictly"),
    (lambda sd: sd.pop("values"), r"missing \['values'\]"),
    (lambda sd: sd.pop("_extra_state"), "missing _extra_state"),
    (lambda sd: sd.__setitem__("values", sd["values"][:, :16, :16].contiguous()), r"values must be float \[nnz, 32, 32\]"),
])
def test_corrupt_state_is_refused_and_changes_nothing(corrupt, match):
    src, dst = _sparse(), _sparse()
    with torch.no_grad():
        dst.values.mul_(2)
    sd = copy.deepcopy(src.state_dict())
    corrupt(sd)
    snap = _snapshot(dst)
    with pytest.raises(RuntimeError, match=match):
        dst.load_state_dict(sd, strict=False)
    assert _unchanged(dst, snap)
    assert dst(torch.randn(2, 256)).shape == (2, 64)


def test_block_size_mismatch_changes_nothing():
    src = SparseLinear.from_dense(nn.Linear(256, 64), sparsity=0.5, block=16)
    dst = _sparse()
    snap = _snapshot(dst)
    with pytest.raises(RuntimeError, match=r"\(block, in, out\) = \(16, 256, 64\)"):
        dst.load_state_dict(src.state_dict())
    assert _unchanged(dst, snap)


def test_bsr_linear_checks_the_structure_before_any_kernel():
    s = _sparse()
    x = torch.randn(3, 256)
    crow = s.crow_indices.clone()
    crow[-1] += 1  # disagrees with nnz
    with pytest.raises(ValueError, match="end at nnz"):
        accel.bsr_linear(x, s.values, crow, s.col_indices, (64, 256))
    col = s.col_indices.clone()
    col[0] = -1
    with pytest.raises(ValueError, match=r"col_indices must lie in \[0, 8\).*-1"):
        accel.bsr_linear(x, s.values, s.crow_indices, col, (64, 256))
    # in-place corruption of a module's buffer is seen too (the cached check follows the version counter)
    y = s(x)
    with torch.no_grad():
        s.col_indices[0] = 10 ** 6
    with pytest.raises(ValueError, match="col_indices must lie"):
        s(x)
    assert y.shape == (3, 64)


# 8: packed weights follow in-place updates and loads in every grad mode
@pytest.mark.parametrize("make", [lambda: QuantLinear.from_float(nn.Linear(64, 32), "dynamic"),
                                  lambda: QuantConv2d.from_float(nn.Conv2d(4, 6, 3, padding=1))], ids=["linear", "conv"])
@pytest.mark.parametrize("created_in_inference_mode", [False, True])
def test_no_stale_packed_weights_under_inference_mode(make, created_in_inference_mode):
    torch.manual_seed(0)
    if created_in_inference_mode:
        with torch.inference_mode():
            q, other = make(), make()
    else:
        q, other = make(), make()
    x = torch.randn(2, 64) if isinstance(q, QuantLinear) else torch.randn(2, 4, 8, 8)
    with torch.inference_mode():
        y0 = q(x)
        q.weight_q.zero_()
        y1 = q(x)
        bias = q.bias.view(1, -1) if isinstance(q, QuantLinear) else q.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(y1, bias.expand_as(y1))
        q.load_state_dict(other.state_dict())
        torch.testing.assert_close(q(x), other(x))
        q.load_state_dict(copy.deepcopy(other.state_dict()), assign=True)
        torch.testing.assert_close(q(x), other(x))
        assert not torch.equal(y0, y1)


# 9: static mode (what calibrate -> quantize_ produce) compiles fullgraph and exports
def test_static_mode_compiles_fullgraph_and_exports():
    torch.compiler.reset()
    model = nn.Sequential(QuantConv2d.from_float(nn.Conv2d(3, 8, 3, padding=1), act_scale=0.05), nn.Flatten(),
                          QuantLinear.from_float(nn.Linear(8 * 6 * 6, 10), act_scale=0.02)).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="aot_eager")(x), ref)
        ep = torch.export.export(model, (x,))
        torch.testing.assert_close(ep.module()(x), ref)


def test_static_without_a_scale_still_raises():
    with pytest.raises(RuntimeError, match="has no activation scale"):
        QuantLinear(8, 4, mode="static")(torch.randn(2, 8))


# 10: .half() / .to(bf16) keep the scales in fp32
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_keeps_scales_fp32(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight.mul_(1e-4)  # weight scales around 1e-6: zero in fp16
        lin.bias.zero_()
    q = QuantLinear.from_float(lin, "weight_only")
    h = copy.deepcopy(q).to(dtype)
    assert h.weight_scale.dtype == torch.float32 and h.bias.dtype == dtype
    assert torch.equal(h.weight_scale, q.weight_scale)
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert sqnr(lin(x), h(x.to(dtype)).float()) > 30
    c = QuantConv2d.from_float(nn.Conv2d(3, 4, 3)).half()
    assert c.weight_scale.dtype == torch.float32


# 11: masks are tested, not multiplied
@pytest.mark.parametrize("value, match", [(0.5, r"only 0 and 1.*0\.5"), (float("nan"), r"only 0 and 1.*nan")])
def test_non_binary_masks_are_refused(value, match):
    lin = nn.Linear(64, 32)
    mask = torch.ones(32, 64)
    mask[0, 0] = value
    with pytest.raises(ValueError, match=match):
        SparseLinear.from_dense(lin, mask=mask)
    kept = SparseLinear.from_dense(lin, mask=torch.ones(32, 64))  # 0/1 floats are fine
    torch.testing.assert_close(kept.dense_weight(), lin.weight.detach())


# 12: clear errors, empty shapes
def test_empty_shapes_work():
    q0 = QuantLinear.from_float(nn.Linear(0, 5), "dynamic")  # no inputs: the output is the bias
    y = q0(torch.randn(3, 0))
    torch.testing.assert_close(y, q0.bias.expand(3, 5))
    assert QuantLinear.from_float(nn.Linear(5, 0), "dynamic")(torch.randn(3, 5)).shape == (3, 0)
    q, s = quantize_rows_ref(torch.randn(0, 7))
    assert q.shape == (0, 7) and s.shape == (0,)
    q, s = quantize_per_image_ref(torch.randn(0, 3, 4, 4))
    assert q.shape == (0, 3, 4, 4)


def test_constructor_errors_name_the_values():
    with pytest.raises(ValueError, match="in_features must be an int >= 0, got -5"):
        SparseLinear(-5, 70)
    with pytest.raises(ValueError, match=r"block_size must be an int in .* got 32\.0"):
        SparseLinear(64, 64, block_size=32.0)
    with pytest.raises(ValueError, match=r"block must be an int in .* got 32\.0"):
        SparseLinear.from_dense(nn.Linear(64, 64), sparsity=0.5, block=32.0)
    with pytest.raises(ValueError, match="out_features must be an int >= 0, got -1"):
        QuantLinear(4, -1)
    with pytest.raises(ValueError, match="act_scale is used only by mode 'static'"):
        QuantLinear.from_float(nn.Linear(4, 4), "weight_only", act_scale=0.1)
    with pytest.raises(ValueError, match="act_qmax must be 63, 127"):
        QuantLinear(4, 4, act_qmax=100)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\], got 1.5"):
        SparseLinear.from_dense(nn.Linear(64, 64), sparsity=1.5)


def test_load_state_dict_with_other_nnz_and_back():
    a, b = _sparse(), SparseLinear.from_dense(nn.Linear(256, 64), sparsity=0.9)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 256)
    torch.testing.assert_close(b(x), a(x))
    assert F.linear(x, a.dense_weight(), a.bias).shape == (2, 64)


# ---------------------------------------------------------------------------------------------------------
# torch's own CPU conv is wrong or crashes on some geometries; the float forms must route around it
# ---------------------------------------------------------------------------------------------------------
def test_float_form_conv_one_channel_channels_last_strides_is_right():
    """torch 2.13: a 1-channel input with channels_last strides (any NCHW tensor with C=1 converted
    ``.to(memory_format=channels_last)``) and a 1-wide output gives ~1e32 garbage from F.conv2d."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 1, (1, 4), (1, 2))
    q = QuantConv2d.from_float(conv, "auto")
    x = torch.randn(2, 1, 10, 5)
    ref = F.conv2d(x.double(), (q.weight_q.double() * q.weight_scale.double().view(-1, 1, 1, 1)), q.bias.double(), (1, 2))
    for form, dtype, tol in (("float", torch.float32, 1e-5), ("float", torch.bfloat16, 0.1),
                             ("float_bf16", torch.float32, 0.1), ("float_nchw", torch.bfloat16, 0.1)):
        with torch.no_grad(), accel.engines.force(int8_conv2d=form):
            y = q(x.to(dtype))
        assert (y.double() - ref).abs().max() < tol * max(1.0, float(ref.abs().max())), form


def test_float_form_conv_padding_only_outputs_do_not_crash():
    """torch 2.13: fp32 channels_last F.conv2d (1x1, stride (1, 2), padding (0, 3), dilation 3, a 1-wide
    input) segfaults. Run in a subprocess so a regression fails the test instead of killing the run."""
    import subprocess
    import sys
    code = """
import torch, torch.nn as nn, torch.nn.functional as F
from accel import QuantConv2d, engines
torch.manual_seed(0)
conv = nn.Conv2d(24, 11, 1, (1, 2), (0, 3), (3, 3))
q = QuantConv2d.from_float(conv, "auto")
x = torch.randn(3, 24, 15, 1).contiguous(memory_format=torch.channels_last)
wd = q.weight_q.double() * q.weight_scale.double().view(-1, 1, 1, 1)
ref = F.conv2d(x.double(), wd, q.bias.double(), (1, 2), (0, 3), (3, 3))
for form in ("float", "float_nchw", "float_bf16"):
    with torch.no_grad(), engines.force(int8_conv2d=form):
        y = q(x)
    assert (y.double() - ref).abs().max() < 0.05 * max(1.0, float(ref.abs().max())), form
xg = x.clone().requires_grad_()
with engines.force(int8_conv2d="float"):
    q(xg).sum().backward()
xr = x.double().requires_grad_()
F.conv2d(xr, wd, None, (1, 2), (0, 3), (3, 3)).sum().backward()
assert (xg.grad.double() - xr.grad).abs().max() < 1e-4
print("OK")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), (r.returncode, r.stderr[-2000:])
