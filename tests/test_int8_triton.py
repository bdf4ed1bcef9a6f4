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
        q, s = Q.quantize_rows(x.to(DEV), config=cfg)
        assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref), cfg


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


def test_every_mm_config():
    m, n, k = 70, 90, 200  # ragged against every tile
    a, b, x = _randint8(m, k), _randint8(n, k), torch.randn(m, k)
    exact = (a.long() @ b.long().t()).int()
    ref_w = weight_only_linear_ref(x, b, None)
    for cfg in Q.gpu_mm_configs():
        assert torch.equal(Q.int8_mm(a.to(DEV), b.to(DEV), out_dtype=torch.int32, config=cfg).cpu(), exact), cfg
        torch.testing.assert_close(Q.int8_mm(x.to(DEV), b.to(DEV), config=cfg).cpu().double(), ref_w.double(),
                                   atol=1e-3, rtol=1e-5)


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


def test_conv_every_config():
    x, wt = _randint8(2, 20, 9, 9), _randint8(70, 20, 3, 3)
    ref = F.conv2d(x.double(), wt.double(), padding=1)
    for cfg in C.gpu_conv_configs():
        y = C.int8_conv2d(x.to(DEV), wt.to(DEV), padding=1, out_dtype=torch.int32, config=cfg).cpu()
        assert torch.equal(y.double(), ref), cfg


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
