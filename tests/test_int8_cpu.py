"""The CPU int8 paths (FBGEMM / oneDNN linear, oneDNN conv, weight-only) against the references."""

import pytest
import torch
import torch.nn.functional as F

from accel.cpu import int8 as C
from accel.quant import (
    dequantize_weight,
    int8_conv2d_ref,
    int8_linear_ref,
    quantize_per_image_ref,
    quantize_rows_ref,
    quantize_weight,
    sqnr,
    weight_only_linear_ref,
)

ENGINES = [e for e in C.exact_engines(63)]


def _close(y, ref):
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-5)


def test_quantize_weight_rules():
    w = torch.randn(6, 10)
    w[2] = 0.0
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and s.shape == (6,) and s[2] == 0 and not q[2].any()
    assert q.abs().max() == 127
    err = (dequantize_weight(q, s) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-7).all()
    w[4, 1] = float("nan")
    with pytest.raises(ValueError, match=r"holds NaN/inf in output channels \[4\]"):
        quantize_weight(w)
    with pytest.raises(TypeError, match="expected a float weight, got torch.int8"):
        quantize_weight(q)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("shape", [(1, 33, 70), (16, 64, 300), (129, 17, 40)], ids=str)
@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
def test_linear_matches_reference(shape, engine, activation):
    m, n, k = shape
    x, w, bias = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    wq, ws = quantize_weight(w)
    y = C.linear_int8_cpu(x, wq, ws, bias, activation, qmax=63, engine=engine)
    xq, xs = quantize_rows_ref(x, 63)
    _close(y, int8_linear_ref(xq, xs, wq, ws, bias, activation))


@pytest.mark.parametrize("engine", ENGINES)
def test_linear_static_scale_saturates(engine):
    x, w = torch.randn(9, 50) * 4, torch.randn(20, 50)
    wq, ws = quantize_weight(w)
    s = torch.tensor([0.02])  # far too small: most values saturate at +-qmax
    y = C.linear_int8_cpu(x, wq, ws, None, "none", static_scale=s, qmax=63, engine=engine)
    xq, xs = quantize_rows_ref(x, 63, s)
    assert xq.abs().max() == 63
    _close(y, int8_linear_ref(xq, xs, wq, ws))


@pytest.mark.parametrize("engine", C.exact_engines(127))
def test_linear_degenerate_static_scales(engine):
    """A static scale of 0, -0.0, a negative one or one whose inverse overflows: the rule's answer (inverse 0 or
    -FLT_MAX), for one row and for many, in every engine; never an exception."""
    wq, ws = quantize_weight(torch.randn(20, 50))
    bias = torch.randn(20)
    for m in (1, 9):
        x = torch.randn(m, 50) * 4
        for s in (0.0, -0.0, -0.5, 1e-39):
            static = torch.tensor([s])
            y = C.linear_int8_cpu(x, wq, ws, bias, "none", static, 127, engine)
            want = C.linear_int8_reference(x, wq, ws, bias, "none", static, 127)
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5 * (1 + float(want.abs().max())), msg=f"{m} {s}")


@pytest.mark.parametrize("engine", ENGINES)
def test_linear_special_rows(engine):
    x, w = torch.randn(5, 40), torch.randn(8, 40)
    x[1] = 0.0
    x[2, 7] = float("nan")
    x[3, 0] = float("inf")
    wq, ws = quantize_weight(w)
    bias = torch.randn(8)
    y = C.linear_int8_cpu(x, wq, ws, bias, "relu", qmax=63, engine=engine)
    assert torch.equal(y[1], torch.relu(bias))
    assert torch.isnan(y[2:4]).all()
    assert torch.isfinite(y[[0, 4]]).all()
    assert C.linear_int8_cpu(x[:0], wq, ws, bias, qmax=63, engine=engine).shape == (0, 8)


def test_linear_sqnr_on_gaussian_data():
    """7-bit activations (the AVX2 rule) and 8-bit weights; the 8-bit GPU path is checked at >= 35 dB."""
    x, w = torch.randn(64, 512), torch.randn(256, 512)
    wq, ws = quantize_weight(w)
    ref = x.double() @ w.double().t()
    assert sqnr(ref, C.linear_int8_cpu(x, wq, ws, qmax=63)) >= 34.0
    xq, xs = quantize_rows_ref(x, 127)
    assert sqnr(ref, int8_linear_ref(xq, xs, wq, ws)) >= 35.0


@pytest.mark.parametrize("engine", C.exact_engines(127))
def test_linear_8bit_activations_exact(engine):
    """qmax 127 on every CPU: natively with VNNI/AMX, as two 7-bit passes (``*_split``) without."""
    x, w = torch.randn(16, 300), torch.randn(40, 300)
    x[3] *= 50  # a wide row: its integers fill [-127, 127]
    wq, ws = quantize_weight(w)
    xq, xs = quantize_rows_ref(x, 127)
    assert xq.abs().max() == 127
    _close(C.linear_int8_cpu(x, wq, ws, qmax=127, engine=engine), int8_linear_ref(xq, xs, wq, ws))


def test_act_qmax_rule(accel_env):
    from accel import engines

    accel_env(ACCEL_CPU_ACT_QMAX=None)  # the machine's own rule (the suite may run with the override set)
    assert C.act_qmax() == (127 if engines.has_vnni() else 63)
    accel_env(ACCEL_CPU_ACT_QMAX="127")
    assert C.act_qmax() == 127
    accel_env(ACCEL_CPU_ACT_QMAX="100")
    with pytest.raises(ValueError, match="must be 63 or 127, got '100'"):
        C.act_qmax()
    accel_env(ACCEL_CPU_ACT_QMAX=None, ACCEL_CPU_ISA="avx2")  # accel's own detection, capped: the AVX2 rules on any CPU
    assert C.act_qmax() == 63 and not engines.has_vnni()
    assert "fbgemm" not in C.exact_engines(127) and "int_mm" not in C.exact_engines(127)
    assert {"fbgemm_split", "onednn_split"} <= set(C.exact_engines(127)) or not C.fbgemm_available()
    with pytest.raises(ValueError, match="not exact for activation qmax 127"):
        C.linear_int8_cpu(torch.randn(2, 8), torch.ones(4, 8, dtype=torch.int8), torch.ones(4), qmax=127, engine="fbgemm")
    accel_env(ACCEL_CPU_ISA="sse")
    with pytest.raises(ValueError, match="ACCEL_CPU_ISA must be one of"):
        engines.cpu_isa()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_only(dtype):
    x, w, bias = torch.randn(7, 300).to(dtype), torch.randn(90, 300), torch.randn(90)
    wq, ws = quantize_weight(w)
    y = C.linear_weight_only_cpu(x, wq, ws, bias, "gelu")
    assert y.dtype == dtype
    ref = weight_only_linear_ref(x, wq, ws, bias, "gelu")
    tol = (1e-4, 1e-5) if dtype == torch.float32 else (0.1, 2e-2)
    torch.testing.assert_close(y.float(), ref, atol=tol[0], rtol=tol[1])


def test_packed_weight_follows_in_place_updates():
    x, w = torch.randn(4, 32), torch.randn(8, 32)
    wq, ws = quantize_weight(w)
    y1 = C.linear_int8_cpu(x, wq, ws, qmax=63)
    wq.mul_(-1)  # bumps the version counter: the cached packing must be rebuilt
    y2 = C.linear_int8_cpu(x, wq, ws, qmax=63)
    _close(y2, -y1)
    ws.mul_(2)
    _close(C.linear_int8_cpu(x, wq, ws, qmax=63), -2 * y1)


CONV_CASES = [
    (2, 3, 16, 16, 32, 3, 1, 1, 1),  # Conv2d(3, 32)
    (1, 16, 9, 7, 24, 3, 2, 1, 1),
    (2, 8, 12, 12, 8, 3, 1, 2, 2),
    (1, 32, 7, 7, 16, 1, 1, 0, 1),
]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_matches_reference(case, channels_last):
    b, c, h, w_, o, k, s, p, d = case
    x, w = torch.randn(b, c, h, w_), torch.randn(o, c, k, k)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(o)
    wq, ws = quantize_weight(w)
    y = C.conv2d_int8_cpu(x, wq, ws, bias, (s, s), (p, p), (d, d), "relu", qmax=63)
    xq, xs = quantize_per_image_ref(x, 63)
    ref = int8_conv2d_ref(xq, xs, wq, ws, bias, s, p, d, "relu")
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-5)
    assert sqnr(F.conv2d(x.double(), w.double(), bias.double(), s, p, d).relu(), y) >= 30


def test_conv_static_and_poisoned_image():
    x, w = torch.randn(3, 4, 8, 8), torch.randn(6, 4, 3, 3)
    x[1, 2, 3, 3] = float("nan")
    wq, ws = quantize_weight(w)
    y = C.conv2d_int8_cpu(x, wq, ws, None, (1, 1), (1, 1), (1, 1), qmax=63)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()
    s = torch.tensor([0.01])
    y = C.conv2d_int8_cpu(x[[0, 2]], wq, ws, None, (1, 1), (1, 1), (1, 1), static_scale=s, qmax=63)
    xq, xs = quantize_per_image_ref(x[[0, 2]], 63, s)
    torch.testing.assert_close(y, int8_conv2d_ref(xq, xs, wq, ws, None, 1, 1), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("engine", ENGINES)
def test_near_ties_keep_accels_integers(engine):
    """x * inv just below a .5 tie must round down: adding the zero point before rounding would not."""
    below = torch.nextafter(torch.tensor(3.5), torch.tensor(0.0)).item()  # 3.4999998
    x = torch.tensor([[63.0, below, -below, 2.5, 1.5] + [0.0] * 11])  # absmax 63, qmax 63: inv = 1
    w = torch.eye(16)  # identity weight: the output shows the quantized input
    wq, ws = quantize_weight(w)
    y = C.linear_int8_cpu(x, wq, ws, qmax=63, engine=engine)
    assert (y[0, :5] / ws[:5]).round().tolist() == [127 * 63, 127 * 3, -127 * 3, 127 * 2, 127 * 2]
    xc = x.view(1, 16, 1, 1)
    yc = C.conv2d_int8_cpu(xc, wq.view(16, 16, 1, 1), ws, qmax=63)
    assert torch.equal(yc.flatten()[:5], y[0, :5])


@pytest.mark.parametrize("zp", [128, 64])
def test_to_uint8_rounds_half_to_even_exactly(zp):
    """The one-add conversion gives round_half_even(v) + zp for every value in range: integers, exact ties,
    values next to ties, and the ends of the range, in NCHW and channels_last."""
    ties = torch.arange(-zp * 4, (255 - zp) * 4 + 1, dtype=torch.float32) / 4
    near = torch.cat([torch.nextafter(ties, torch.tensor(-1e9)), torch.nextafter(ties, torch.tensor(1e9))])
    near = near.clamp(-zp, 255 - zp)
    rand = (torch.rand(100_000) * 2 - 1) * min(zp, 255 - zp)
    for v in (ties, near, rand):
        want = (torch.round(v) + zp).to(torch.uint8)
        assert torch.equal(C._to_uint8(v.clone(), zp), want)
    img = (torch.rand(2, 5, 3, 4) * 2 - 1) * 127
    cl = img.contiguous(memory_format=torch.channels_last)
    got = C._to_uint8(cl.clone(memory_format=torch.channels_last), zp if zp == 128 else 128)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, (torch.round(img) + 128).to(torch.uint8))
