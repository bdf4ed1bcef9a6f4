"""``accel.kernels._triton.launch``: after a specialisation's first launch, later ones call its compiled
binary directly with every parameter by position. On a CPU the interpreter has no binaries, so these
tests stand one in (``INTERPRET_AS_BINARY``: the jitted function re-entered by argument position) and
check that the direct launches compute what Triton's own path computes: the argument order, the grid
recomputed for each call's sizes, the config the first launch chose, and a new entry wherever Triton
would specialise differently (alignment, ``== 1`` integers, dtypes, constexprs)."""

import pytest
import torch
import triton
import triton.language as tl

from accel.quant import int8_linear_ref, quantize_rows_ref
from tests.helpers import interpret_mode, kernel_device

pytestmark = pytest.mark.interpreter

if not interpret_mode() and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)

#: the tests that count the stand-in binary's launches
stand_in = pytest.mark.skipif(not interpret_mode(), reason="the stand-in binary runs under TRITON_INTERPRET=1")
DEV = kernel_device()

from accel.kernels import _triton as T  # noqa: E402
from accel.kernels import int8_matmul as Q  # noqa: E402


@pytest.fixture
def as_binary(monkeypatch):
    monkeypatch.setattr(T, "INTERPRET_AS_BINARY", interpret_mode())
    T.clear_direct()
    yield
    T.clear_direct()


def _entries():
    return [e for entries in T._direct.values() for e in entries]


def _binaries():
    return {id(e.binary): e.binary for e in _entries()}


def _launches():
    return sum(b.launches for b in _binaries().values())


def _int8(*shape):
    return torch.randint(-127, 128, shape, dtype=torch.int8)


@stand_in
def test_repeated_gemm_launches_go_direct_and_match(as_binary):
    w, ws, bias = _int8(40, 96), torch.rand(40) + 0.5, torch.randn(40)
    ys = []
    for m in (40, 60, 50):  # one M bucket: the same specialisation, a grid recomputed from each call's M
        a, a_s = _int8(m, 96), torch.rand(m) + 0.5
        y = Q.int8_mm(a, w, a_s, ws, bias, activation="relu")
        ref = int8_linear_ref(a, a_s, w, ws, bias, activation="relu")
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-5)
        ys.append(y)
    assert len(_entries()) >= 1 and _launches() == 2  # the first call through Triton, the next two direct


@triton.jit
def _scaled_copy(x_ptr, y_ptr, n, stride, scale, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + o, tl.load(x_ptr + o * stride, mask=o < n) * scale, mask=o < n)


def _copy(x, n, stride, scale=2.0, block=16):
    y = torch.full((n,), float("nan"))
    T.launch(_scaled_copy, lambda meta: (triton.cdiv(meta["n"], meta["BLOCK"]),),
             dict(x_ptr=x, y_ptr=y, n=n, stride=stride, scale=scale, BLOCK=block))
    assert torch.equal(y, x[: n * stride : stride] * scale)


@stand_in
def test_a_new_specialisation_is_a_new_entry(as_binary):
    base = torch.randn(200)
    _copy(base, 40, 2)
    assert len(_entries()) == 1
    _copy(base, 37, 3, scale=0.5)  # other sizes and values of the same classes: direct
    assert len(_entries()) == 1 and _launches() == 1
    # a base one element (4 bytes) off 16: Triton specialises pointers on 16-byte alignment
    _copy(base[1:], 40, 2)
    assert len(_entries()) == 2 and _launches() == 1
    # an int equal to 1 becomes a constant, one divisible by 16 gets that attribute
    _copy(base, 40, 1)
    assert len(_entries()) == 3 and _launches() == 1
    _copy(base, 48, 2)
    assert len(_entries()) == 4 and _launches() == 1
    # a constexpr's value, and a dtype
    _copy(base, 40, 2, block=32)
    _copy(base.double(), 40, 2)
    assert len(_entries()) == 6 and _launches() == 1


@stand_in
def test_quantize_rows_both_kernels_direct(as_binary):
    for k in (300, Q.ONE_PASS_MAX_K + 100):  # one pass, and the two chunked passes
        for _ in range(2):
            x = torch.randn(3, k)
            q, s = Q.quantize_rows(x)
            q_ref, s_ref = quantize_rows_ref(x)
            assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert _launches() == 3  # the second call of each: one one-pass launch, two chunked launches


@stand_in
def test_split_k_epilogue_direct(as_binary):
    cfg = Q.tile_config(16, 32, 32, 1, 4, 1, split=2)
    w = _int8(32, 256)
    for _ in range(2):
        a, a_s, ws = _int8(3, 256), torch.rand(3) + 0.5, torch.rand(32) + 0.5
        y = Q.int8_mm(a, w, a_s, ws, config=cfg, impl="ptr")
        torch.testing.assert_close(y, int8_linear_ref(a, a_s, w, ws), rtol=1e-6, atol=1e-5)
    assert _launches() == 2  # the GEMM and its split-K epilogue, both direct on the second call


@stand_in
def test_off_by_default_in_the_interpreter():
    assert not T.INTERPRET_AS_BINARY
    T.clear_direct()
    Q.int8_mm(_int8(2, 32), _int8(16, 32), None, None, out_dtype=torch.int32)
    assert not T._direct


def _bsr(n, k, block, density, seed):
    from tests.sparse_refs import bsr_from_mask, random_block_mask

    mask = random_block_mask(-(-n // block), -(-k // block), density, seed=seed)
    return bsr_from_mask(torch.randn(n, k), block, mask)


def _launcher_cases():
    from accel.kernels import bsr_conv as BC
    from accel.kernels import bsr_matmul as B
    from accel.kernels import int8_bsr_matmul as IB
    from accel.kernels import int8_conv as C

    from tests.sparse_refs import block_rows, random_conv_bsr

    def bsr_mm(seed):  # forward with the split-K reduce (forced SPLIT 2), and the SDDMM
        v, crow, col = (t.to(DEV) for t in _bsr(40, 96, 16, 0.6, seed=3))
        cfg = next(c for c in B.fwd_configs_for_block(16, m_bucket=8) if c.kwargs["SPLIT"] > 1)
        x, dy = torch.randn(5, 96, device=DEV), torch.randn(5, 40, device=DEV)
        y = B.bsr_dense_mm(x, v, crow, col, 40, torch.randn(40, device=DEV), config=cfg)
        y = (y, B.bsr_dense_mm(x, v, crow, col, 40))  # autotuned
        dv = B.bsr_sddmm(dy, x, block_rows(crow).to(DEV), col, 16)
        return (*y, dv)

    def int8_bsr(seed):
        v, crow, col = _bsr(48, 64, 16, 0.5, seed=4)
        vq = v.mul(20).round().clamp(-127, 127).to(torch.int8)
        args = (_int8(6, 64), torch.rand(6) + 0.5, vq, torch.rand(48) + 0.5, crow, col)
        return IB.int8_bsr_mm(*(t.to(DEV) for t in args), 48, torch.randn(48, device=DEV), activation="gelu")

    def int8_conv(seed):
        x = _int8(2, 16, 6, 6).to(DEV).contiguous(memory_format=torch.channels_last)
        w = _int8(32, 16, 3, 3).to(DEV).contiguous(memory_format=torch.channels_last)
        scales = (torch.rand(2) + 0.5, torch.rand(32) + 0.5, torch.randn(32))
        return C.int8_conv2d(x, w, *(t.to(DEV) for t in scales), 1, 1, out_dtype=torch.float32)

    def bsr_conv(seed):
        ws = (16, 16, 3, 3)
        v, crow, col = (t.to(DEV) for t in random_conv_bsr(ws, 16, 0.6, seed=5))
        x = torch.randn(2, 16, 5, 5, device=DEV).contiguous(memory_format=torch.channels_last)
        dy = torch.randn(2, 16, 5, 5, device=DEV).contiguous(memory_format=torch.channels_last)
        y = BC.bsr_conv2d(x, v, crow, col, ws, torch.randn(16, device=DEV), 1, 1, 1)
        dx = BC.bsr_conv2d_dx(dy, v, crow, col, ws, x.shape, 1, 1, 1)
        dv = BC.bsr_conv2d_dw(dy, x, block_rows(crow).to(DEV), col, 16, ws, 1, 1, 1)
        return y, dx, dv

    def int8_gemm(impl, offset=0):
        def run(seed):  # the GEMM (split-K and its epilogue where the table picks them) and the quantizer
            x = torch.randn(5, 256, device=DEV)
            x_q, x_s = Q.quantize_rows(x)
            x_q = torch.cat([x_q.new_zeros(offset), x_q.flatten()])[offset:].view(5, 256) if offset else x_q
            w, ws = _int8(64, 256).to(DEV), torch.rand(64, device=DEV) + 0.5
            y = Q.int8_mm(x_q, w, x_s, ws, torch.randn(64, device=DEV), activation="gelu", impl=impl)
            long_q, long_s = Q.quantize_rows(torch.randn(2, Q.ONE_PASS_MAX_K + 300, device=DEV))
            return x_q, x_s, y, long_q, long_s
        return run

    return {"bsr_mm": bsr_mm, "int8_bsr": int8_bsr, "int8_conv": int8_conv, "bsr_conv": bsr_conv,
            "int8_mm_ptr": int8_gemm("ptr"), "int8_mm_tma": int8_gemm("tma"), "int8_mm_unaligned": int8_gemm("auto", 1)}


#: launches of each case's first call: the forced-SPLIT forward and its reduce, the autotuned forward and the
#: SDDMM; the kernel; forward, dX and dW; the quantizer's one-pass, absmax and chunk kernels and the GEMM
MIN_ENTRIES = {"bsr_mm": 4, "int8_bsr": 1, "int8_conv": 1, "bsr_conv": 3, "int8_mm_ptr": 4, "int8_mm_tma": 4,
               "int8_mm_unaligned": 4}


class _Counting:
    """Wraps a remembered binary (real or stand-in) and counts the direct launches through it."""

    def __init__(self, binary):
        self.binary, self.launches = binary, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.binary[grid]


@pytest.mark.parametrize("name", ["bsr_mm", "int8_bsr", "int8_conv", "bsr_conv", "int8_mm_ptr", "int8_mm_tma",
                                  "int8_mm_unaligned"])
def test_every_launcher_direct_matches_triton(as_binary, monkeypatch, name):
    """Each launcher's second call (same shapes, new data) runs its kernels direct (on a GPU: their
    compiled binaries) and gives bit-for-bit what Triton's own path gives on the same inputs."""
    fn = _launcher_cases()[name]
    torch.manual_seed(0)
    fn(0)  # through Triton: the entries
    entries = _entries()
    # every launch remembered (on a GPU too: an autotuned launch is remembered only when its config is
    # found in the autotuner's cache under Triton's own key, which this checks was rebuilt right)
    assert len(entries) >= MIN_ENTRIES[name], [e.names[0] for e in entries]
    for e in entries:
        e.binary = _Counting(e.binary)
    torch.manual_seed(1)
    direct = fn(1)
    assert all(e.binary.launches >= 1 for e in entries), [e.names[0] for e in entries if not e.binary.launches]
    monkeypatch.setattr(T, "DIRECT", False)
    torch.manual_seed(1)
    ref = fn(1)
    for a, b in zip(direct if isinstance(direct, tuple) else (direct,), ref if isinstance(ref, tuple) else (ref,)):
        assert torch.equal(a, b)
    if not interpret_mode():
        assert all(hasattr(e.binary.binary, "packed_metadata") for e in entries)  # Triton's CompiledKernels


@stand_in
def test_heuristics_are_checked_on_every_direct_call(as_binary):
    """With a forced config K is keyed by its class only (64 and 96 are both multiples of 16), but the
    GEMM's EVEN_K heuristic (K a multiple of BLOCK_K = 64) differs: the second call must not reuse the
    first one's binary."""
    cfg = Q.tile_config(16, 32, 64, 1, 4, 1)
    for k in (64, 96):
        a, w = _int8(3, k), _int8(32, k)
        y = Q.int8_mm(a, w, None, None, out_dtype=torch.int32, config=cfg, impl="ptr")
        assert torch.equal(y, a.int() @ w.int().t()), k
    assert _launches() == 0


def test_values_that_cannot_be_keyed_are_never_remembered():
    """Constexprs are keyed with their type (Triton compiles True and 1 apart); a value the key cannot
    hold (here an object) makes the launch go through Triton every time."""
    fn = T._kernel_info(_scaled_copy)[0]

    def key(v):
        return T._launch_key(fn, None, {"BLOCK": v}, {}, frozenset({"BLOCK"}))

    assert key(True) != key(1) != key(1.0) and key(16) == key(16) != key(32)
    assert T._launch_key(fn, None, {"x_ptr": object()}, {}, frozenset()) is None
    assert T._launch_key(fn, None, {"BLOCK": object()}, {}, frozenset({"BLOCK"})) is None


@pytest.mark.skipif(interpret_mode(), reason="CUDA graphs need a GPU")
def test_direct_launches_capture_in_a_cuda_graph(as_binary):
    """Direct launches (the TMA GEMM's scratch allocation included) record into a CUDA graph, and its
    replays compute on the captured buffers' new contents."""
    w, ws = _int8(256, 512).cuda(), torch.rand(256, device="cuda") + 0.5
    x = torch.randn(8, 512, device="cuda")

    def step():
        x_q, x_s = Q.quantize_rows(x)
        return Q.int8_mm(x_q, w, x_s, ws, out_dtype=torch.float32)

    step()  # the entries
    assert _entries()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = step()
    x.copy_(torch.randn(8, 512, device="cuda"))
    g.replay()
    torch.cuda.synchronize()
    x_q, x_s = quantize_rows_ref(x.cpu())
    torch.testing.assert_close(y.cpu(), int8_linear_ref(x_q, x_s, w.cpu(), ws.cpu()), rtol=1e-5, atol=1e-4)
