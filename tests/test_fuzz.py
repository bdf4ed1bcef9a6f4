"""Property-based fuzzing of every CPU op over its input space against the references (hypothesis).

Each engine is fuzzed forced (``accel.engines.force``) and through the default dispatch, so a backend
that is wrong for a class of shapes is found here rather than by a user. Examples are derandomized
(the same cases every run, so CI is stable); ``ACCEL_FUZZ_EXAMPLES=n`` runs more, and
``ACCEL_FUZZ_RANDOM=1`` draws new ones.
"""

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accel import QuantConv2d, QuantLinear, engines
from accel.cpu import bsr as cpu_bsr
from accel.cpu import int8 as C
from accel.formats import BSRMatrix, topk_block_mask
from accel.ops.bsr_linear import bsr_linear
from accel.quant import (
    activate,
    int8_conv2d_ref,
    int8_linear_ref,
    quantize_per_image_ref,
    quantize_rows_ref,
    weight_only_linear_ref,
)

EXAMPLES = int(os.environ.get("ACCEL_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("ACCEL_FUZZ_RANDOM") != "1",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _amax(t: torch.Tensor) -> float:
    t = t.nan_to_num(0, posinf=0, neginf=0)
    return float(t.abs().max()) if t.numel() else 0.0


def _close_int8(y, ref, scale_hint):
    """int8 engines compute the reference's integers; only the fp32 epilogue may differ by rounding."""
    atol = 1e-4 * max(1.0, _amax(ref)) + 1e-6 * scale_hint
    torch.testing.assert_close(y.float(), ref.float(), atol=atol, rtol=1e-4, equal_nan=True)


# ------------------------------------------------------------------------------------------------ conv
@st.composite
def conv_cases(draw):
    b = draw(st.integers(1, 3))
    c, o = draw(st.integers(1, 24)), draw(st.integers(1, 20))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    # inputs at least as large as the dilated kernel (after padding), tall/narrow shapes included
    min_h = max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0])
    min_w = max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1])
    h = draw(st.integers(min_h, min_h + 18))
    w = draw(st.integers(min_w, min_w + 18))
    channels_last = draw(st.booleans())
    qmax = draw(st.sampled_from([63, 127]))
    seed = draw(st.integers(0, 2 ** 16))
    return b, c, o, (kh, kw), stride, padding, dilation, (h, w), channels_last, qmax, seed


def _conv_case(case):
    b, c, o, k, stride, padding, dilation, (h, w), channels_last, qmax, seed = case
    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(c, o, k, stride, padding, dilation)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.bias.copy_(torch.randn(o, generator=g))
    q = QuantConv2d.from_float(conv, act_qmax=qmax)
    x = torch.randn(b, c, h, w, generator=g) * 3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xq, xs = quantize_per_image_ref(x, qmax)
    ref = int8_conv2d_ref(xq, xs, q.weight_q, q.weight_scale, q.bias, stride, padding, dilation)
    return q, x, ref


@FUZZ
@given(case=conv_cases())
def test_fuzz_conv_default_dispatch(case):
    q, x, ref = _conv_case(case)
    with torch.no_grad():
        y = q(x)
    assert y.shape == ref.shape
    _close_int8(y, ref, 1.0)


@pytest.mark.parametrize("engine", ["onednn", "im2col"])
@FUZZ
@given(case=conv_cases())
def test_fuzz_conv_each_engine(engine, case):
    q, x, ref = _conv_case(case)
    qmax = case[-2]
    name = engine if engine in C.conv_engines(qmax) else engine + "_split"
    ok = C.onednn_conv_ok(x.shape[1], x.shape[2], x.shape[3], *q.kernel_size, tuple(q.stride), tuple(q.padding),
                          tuple(q.dilation))
    with torch.no_grad(), engines.force(int8_conv2d=name):
        if name.startswith("onednn") and not ok:
            with pytest.raises(ValueError, match="cannot run this call"):
                q(x)
            return
        y = q(x)
    _close_int8(y, ref, 1.0)


# ------------------------------------------------------------------------------------------------ linear
@st.composite
def linear_cases(draw):
    lead = draw(st.lists(st.integers(0, 5), min_size=1, max_size=3))
    k, n = draw(st.integers(1, 300)), draw(st.integers(1, 90))
    mode = draw(st.sampled_from(["dynamic", "static", "weight_only"]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    strided = draw(st.booleans())
    qmax = draw(st.sampled_from([63, 127]))
    activation = draw(st.sampled_from(["none", "relu", "gelu"]))
    special = draw(st.sampled_from(["none", "zero_row", "nan", "inf", "huge"]))
    seed = draw(st.integers(0, 2 ** 16))
    return lead, k, n, mode, dtype, strided, qmax, activation, special, seed


def _linear_case(case):
    lead, k, n, mode, dtype, strided, qmax, activation, special, seed = case
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g))
    x = torch.randn(*lead, 2 * k if strided else k, generator=g)
    x = (x[..., ::2] if strided else x).to(dtype)
    m = math.prod(lead)
    if m and special != "none":
        flat = x.reshape(-1, k)
        row = flat[0].clone()
        row[:] = {"zero_row": 0.0, "nan": row[0], "inf": row[0], "huge": 1e4}[special]
        if special == "nan":
            row[k // 2] = float("nan")
        if special == "inf":
            row[0] = float("inf")
        x = torch.cat([row[None], flat[1:]]).reshape(x.shape) if not strided else x
    act_scale = 0.02 if mode == "static" else None
    q = QuantLinear.from_float(lin, mode, act_scale=act_scale, activation=activation, act_qmax=qmax)
    x2 = x.reshape(-1, k).float()
    if mode == "weight_only":
        pre = weight_only_linear_ref(x2, q.weight_q, q.weight_scale, q.bias, "none")
    else:
        xq, xs = quantize_rows_ref(x2, qmax, None if act_scale is None else torch.tensor([act_scale]))
        pre = int8_linear_ref(xq, xs, q.weight_q, q.weight_scale, q.bias, "none")
    ref = activate(pre.clone(), activation)
    # a half-precision layer computes in its dtype (as F.linear does): a pre-activation past fp16's range is
    # inf there, and an activation of inf may be NaN (GELU), so such cases are compared only where finite
    return q, x, ref.reshape(*lead, n), dtype, _amax(pre) > 6e4


@FUZZ
@given(case=linear_cases())
def test_fuzz_linear_default_dispatch(case):
    q, x, ref, dtype, fp16_overflow = _linear_case(case)
    with torch.no_grad():
        y = q(x)
    assert y.shape == ref.shape and y.dtype == dtype
    if dtype == torch.float32:
        _close_int8(y, ref, 1.0)
    else:  # half inputs / outputs: compare at their precision
        if dtype == torch.float16 and fp16_overflow:
            return  # beyond fp16's range: inf or NaN, as F.linear in fp16 gives
        ref = ref.to(dtype).float()
        torch.testing.assert_close(y.float(), ref, atol=5e-2 * max(1.0, _amax(ref)), rtol=2e-2, equal_nan=True)


@pytest.mark.parametrize("engine", sorted(set(C.LINEAR_ENGINES)))
@FUZZ
@given(case=linear_cases())
def test_fuzz_linear_each_engine(engine, case):
    q, x, ref, dtype, _ = _linear_case(case)
    if q.mode == "weight_only":
        return
    if engine not in C.exact_engines(case[6], case[1]):
        if x.numel():  # (an empty call runs no engine)
            with pytest.raises(ValueError, match="cannot run this call"), engines.force(int8_linear=engine):
                q(x)
        return
    with torch.no_grad(), engines.force(int8_linear=engine):
        y = q(x)
    if dtype == torch.float32:
        _close_int8(y, ref, 1.0)


# ------------------------------------------------------------------------------------------------ block-sparse
@st.composite
def bsr_cases(draw):
    block = draw(st.sampled_from([16, 32, 64]))
    n, k = draw(st.integers(1, 200)), draw(st.integers(1, 200))
    m = draw(st.integers(0, 70))
    sparsity = draw(st.sampled_from([0.0, 0.3, 0.7, 0.95, 1.0]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
    layout = draw(st.sampled_from(["contiguous", "strided", "3d"]))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 16))
    return block, n, k, m, sparsity, dtype, layout, bias, seed


@pytest.mark.parametrize("engine", [None, "gather_bmm", "gather_bmm_t", "panels", "rows", "mkl", "dense"])
@FUZZ
@given(case=bsr_cases())
def test_fuzz_bsr_linear(engine, case):
    block, n, k, m, sparsity, dtype, layout, has_bias, seed = case
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    mask = topk_block_mask(torch.rand(-(-n // block), -(-k // block), generator=g), sparsity)
    bsr = BSRMatrix.from_dense(w, block, mask)
    values = bsr.values.to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if has_bias else None
    x = torch.randn(m, 2 * k, generator=g).to(dtype)
    x = x[:, ::2] if layout == "strided" else x[:, :k]
    if layout == "3d":
        x = x.reshape(1, m, k) if m else x.reshape(1, 0, k)
    ref = x.double() @ bsr.to_dense().to(dtype).double().t()
    if bias is not None:
        ref = ref + bias.double()
    ctx = engines.force(bsr_linear=engine) if engine else engines.force()
    with torch.no_grad(), ctx:
        if engine == "mkl" and dtype not in cpu_bsr.MKL_DTYPES and m and bsr.nnz_blocks and k:
            with pytest.raises(ValueError, match="cannot run this call"):
                bsr_linear(x, values, bsr.crow_indices, bsr.col_indices, (n, k), bias, allow_dense=True)
            return
        y = bsr_linear(x, values, bsr.crow_indices, bsr.col_indices, (n, k), bias, allow_dense=True)
    assert y.shape == ref.shape and y.dtype == dtype
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    scale = max(1.0, math.sqrt(k) / 4)
    torch.testing.assert_close(y.double(), ref, atol=tol * scale * (8 if dtype == torch.bfloat16 else 1), rtol=tol * 4)


# ------------------------------------------------------------------------------------------------ auto forms
#: relative rounding of the compute dtype each form uses (dequantized weights and inputs in that dtype)
_EPS = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def _check_form(y, ref, magnitude, quant_bound, form, dtype):
    """``|y - ref| <= bound`` elementwise, where ``ref`` is the float layer on the int8 weights (fp64),
    ``magnitude`` the same layer on ``|x|``, ``|W|`` and ``|b|`` (what rounding errors scale with) and
    ``quant_bound`` the worst case of the activation quantization (int8 forms only); the compute dtype
    adds its rounding and the output dtype one more. GELU/ReLU are at most 1.13-Lipschitz."""
    compute = torch.bfloat16 if form == "float_bf16" else dtype
    bound = 1.13 * (quant_bound + 4 * _EPS[compute] * magnitude) + _EPS[dtype] * ref.abs() + 1e-6
    err = (y.double() - ref).abs()
    finite = torch.isfinite(ref) & (ref.abs() < (6e4 if dtype == torch.float16 else math.inf))
    assert bool((err <= bound)[finite].all()), (form, float(((err - bound)[finite]).max()))


@st.composite
def auto_linear_cases(draw):
    lead = draw(st.lists(st.integers(0, 4), min_size=1, max_size=3))
    k, n = draw(st.integers(1, 200)), draw(st.integers(1, 70))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    form = draw(st.sampled_from(["dynamic", "weight_only", "float", "float_bf16"]))
    activation = draw(st.sampled_from(["none", "relu", "gelu"]))
    qmax = draw(st.sampled_from([63, 127]))
    return lead, k, n, dtype, form, activation, qmax, draw(st.integers(0, 2 ** 16))


@FUZZ
@given(case=auto_linear_cases())
def test_fuzz_linear_auto_forms(case):
    """An ``auto`` QuantLinear forced onto each form computes the float layer of its int8 weights
    (to that form's precision), in the input's dtype and shape; a form the input cannot use raises."""
    lead, k, n, dtype, form, activation, qmax, seed = case
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g))
        lin.bias.copy_(torch.randn(n, generator=g))
    q = QuantLinear.from_float(lin, "auto", activation=activation, act_qmax=qmax)
    x = torch.randn(*lead, k, generator=g).to(dtype)
    w = q.weight_q.double() * q.weight_scale.double()[:, None]
    ref = torch.nn.functional.linear(x.double(), w, q.bias.double())
    ref = {"none": ref, "relu": torch.relu(ref), "gelu": torch.nn.functional.gelu(ref)}[activation]
    xa = x.double().abs()
    magnitude = torch.nn.functional.linear(xa, w.abs(), q.bias.double().abs())
    step = xa.amax(-1, keepdim=True) / (2 * qmax) if x.numel() else xa.sum(-1, keepdim=True)
    quant_bound = step * w.abs().sum(1) if form == "dynamic" else torch.zeros_like(magnitude)
    with torch.no_grad(), engines.force(quant_linear_form=form):
        if form == "float_bf16" and dtype != torch.float32 and x.numel():
            with pytest.raises(ValueError, match="cannot run this call"):
                q(x)
            return
        y = q(x)
    assert y.shape == ref.shape and y.dtype == dtype
    _check_form(y, ref, magnitude, quant_bound, form, dtype)


@st.composite
def auto_conv_cases(draw):
    geometry = draw(conv_cases())
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    form = draw(st.sampled_from(["onednn", "im2col", "float", "float_nchw", "float_bf16"]))
    return geometry, dtype, form


@FUZZ
@given(case=auto_conv_cases())
def test_fuzz_conv_auto_forms(case):
    """An ``auto`` QuantConv2d forced onto each form (int8 engines, float in NHWC/NCHW, bf16) computes
    the float conv of its int8 weights, for every geometry; a form that cannot run the call raises."""
    (b, c, o, k, stride, padding, dilation, (h, w), channels_last, qmax, seed), dtype, form = case
    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(c, o, k, stride, padding, dilation)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.bias.copy_(torch.randn(o, generator=g))
    q = QuantConv2d.from_float(conv, "auto", act_qmax=qmax)
    x = torch.randn(b, c, h, w, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    wd = q.weight_q.double() * q.weight_scale.double().view(-1, 1, 1, 1)
    ref = torch.nn.functional.conv2d(x.double(), wd, q.bias.double(), stride, padding, dilation)
    magnitude = torch.nn.functional.conv2d(x.double().abs(), wd.abs(), q.bias.double().abs(), stride, padding, dilation)
    int8 = form in ("onednn", "im2col")
    step = x.double().abs().amax((1, 2, 3)).view(-1, 1, 1, 1) / (2 * qmax)  # one scale per image
    quant_bound = step * torch.nn.functional.conv2d(torch.ones_like(x, dtype=torch.float64), wd.abs(), None, stride,
                                                    padding, dilation) if int8 else torch.zeros_like(ref)
    engine = form if form not in ("onednn", "im2col") or form in C.conv_engines(qmax) else form + "_split"
    runnable = not (engine.startswith("onednn") and not C.onednn_conv_ok(c, h, w, *k, stride, padding, dilation)) \
        and not (form == "float_bf16" and dtype != torch.float32)
    with torch.no_grad(), engines.force(int8_conv2d=engine):
        if not runnable:
            with pytest.raises(ValueError, match="cannot run this call"):
                q(x)
            return
        y = q(x)
    assert y.shape == ref.shape and y.dtype == dtype
    _check_form(y, ref, magnitude, quant_bound, form, dtype)


@st.composite
def embedding_cases(draw):
    rows, dim = draw(st.integers(1, 60)), draw(st.integers(1, 40))
    padding_idx = draw(st.one_of(st.none(), st.integers(-rows, rows - 1)))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    idx_dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    bad = draw(st.sampled_from(["none", "none", "negative", "too_big"]))
    return rows, dim, padding_idx, shape, dtype, idx_dtype, bad, draw(st.integers(0, 2 ** 16))


@FUZZ
@given(case=embedding_cases())
def test_fuzz_quant_embedding(case):
    """QuantEmbedding looks up exactly its dequantized rows (in the float table's dtype), for any index
    shape; an index out of range raises IndexError as ``nn.Embedding`` does, never reads garbage."""
    from accel import QuantEmbedding

    rows, dim, padding_idx, shape, dtype, idx_dtype, bad, seed = case
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.Embedding(rows, dim, padding_idx=padding_idx).to(dtype)
    q = QuantEmbedding.from_float(emb)
    idx = torch.randint(0, rows, shape, generator=g).to(idx_dtype)
    if bad != "none" and idx.numel():
        idx.view(-1)[0] = -1 if bad == "negative" else rows
        with pytest.raises(IndexError):
            q(idx)
        return
    y = q(idx)
    ref = torch.nn.functional.embedding(idx.long(), q.dequantized_weight()).to(dtype)
    assert y.shape == (*shape, dim) and y.dtype == dtype
    torch.testing.assert_close(y, ref, atol=0, rtol=1e-2 if dtype != torch.float32 else 1e-6)
    err = (q.dequantized_weight() - emb.weight.float()).abs().max() if rows else 0
    assert err <= emb.weight.float().abs().amax(1).max() / 127 + 1e-6
