"""Native CPU kernels: small C++ sources in ``accel/cpu/csrc``, compiled on the machine that runs them and
called through ``ctypes`` on tensors' memory. PyTorch has no block-sparse products that pay on the CPU: through its
GEMM calls a block row costs a call (~9 us of overhead each, 128 of them for a 4096-wide layer) plus a gather of
the activation columns it reads, and a block-sparse conv an im2col or a gather of every window. These kernels take
one pass over the stored blocks and read the activations in place.

* ``int8_bsr_vnni.cpp`` (:func:`int8_available`): the int8 block-sparse Linear of ``accel.cpu.int8_bsr`` on
  AVX-512 VNNI: accel's per-token quantization in one pass, then ``vpdpbusd`` over the stored blocks (int32 sums)
  with the dequantizing epilogue fused. At 90% block sparsity, 4096x4096, block 32 (2-core Sapphire Rapids):
  0.15 ms instead of 1.5 at M = 16, 2.1 instead of 4.9 at M = 256 (the product alone).
* ``bsr_float.cpp`` (:func:`float_available`): block-sparse Conv2d as an implicit GEMM over the channels_last
  input (taps outside the image read zeros: no padding copy), and block-sparse Linear as its 1x1 case, in fp32
  (FMA, AVX-512F) or bf16 (``vdpbf16ps``, AVX512_BF16), bias fused, for ``C % B == 0`` (``K % B`` for a Linear).
* ``bsr_amx.cpp`` (:func:`amx_available`): the same conv and linear in bf16 on AMX tiles (``tdpbf16ps``: 16 pixels x
  16 outputs x 32 inputs per instruction) over the zero-padded channels_last input. The int8 library's product
  has an AMX version too (``tdpbusd``, :func:`int8_amx_available`). Tiles need Linux to grant the process their
  state (``arch_prctl``), asked before first use.

Where a kernel is offered: the CPU has its instructions in ``/proc/cpuinfo`` and accel's ISA view
(``ACCEL_CPU_ISA``, :func:`accel.engines.cpu_isa`) allows them, ``ACCEL_COMPILE`` is not 0, and a C++ compiler
(``CXX``, else ``g++`` / ``c++`` / ``clang++``) builds the source. A library is built once per source, flags and
compiler into ``<accel cache dir>/native`` (a temporary folder where that cannot be written; renamed into place, so
concurrent processes are safe) and checked before first use (exact integer products; the float kernels against
PyTorch's conv); a build or check failure logs one warning (logger ``accel``) and the kernel is not offered.
OpenMP threads come from the runtime PyTorch already loaded (the same ``libgomp``), ``torch.get_num_threads()``
of them.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from typing import NamedTuple

import torch

from .. import engines
from .bsr_conv import output_size
from .packcache import cached
from .workspace import scratch

_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_COMMON = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", "-w")


class _Spec(NamedTuple):
    flags: tuple[str, ...]  # beyond _COMMON
    needs: tuple[str, ...]  # CPU flags (/proc/cpuinfo) its instructions need
    level: str  # the least ISA level of accel's view (engines.ISA_LEVELS) that allows it


KERNELS = {
    "int8_bsr_vnni": _Spec(("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c"),
                           ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c"), "avx512_vnni"),
    # (the bf16 functions carry their own target attribute: the library loads on AVX-512 CPUs without BF16)
    "bsr_float": _Spec(("-mavx512f", "-mavx512bw", "-mavx512vl"), ("avx512f", "avx512bw", "avx512vl"), "avx512"),
    # (AMX and the bf16 rounding instruction through target attributes too; the process asks Linux for the tile
    # state before first use)
    "bsr_amx": _Spec(("-mavx512f", "-mavx512bw", "-mavx512vl"),
                     ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"),
                     "amx"),
}
#: the CPU flag the bf16 path of ``bsr_float`` needs besides its library's
BF16_NEEDS = "avx512_bf16"
#: the CPU flags the AMX product of ``int8_bsr_vnni`` needs besides its library's
AMX_INT8_NEEDS = ("amx_tile", "amx_int8", "avx512dq", "avx512_bf16")  # (bf16 outputs rounded two groups at once)
#: block sizes the kernels handle (all of ``accel.formats.BLOCK_SIZES``)
BLOCKS = (16, 32, 64, 128)
#: kept for the int8 kernel's callers and tests
NEEDS = KERNELS["int8_bsr_vnni"].needs

_lock = threading.Lock()
_log = logging.getLogger("accel")


def compiler() -> str | None:
    """The C++ compiler accel builds with (``CXX``, else ``g++`` / ``c++`` / ``clang++`` on the PATH), or None."""
    cxx = os.environ.get("CXX")
    for c in ((cxx,) if cxx else ()) + ("g++", "c++", "clang++"):
        path = shutil.which(c)
        if path:
            return path
    return None


def int8_available() -> bool:
    """Whether the native int8 block-sparse kernel may be offered here. Builds and checks the library at the first
    call of a process (about a second; then cached on disk)."""
    return _library("int8_bsr_vnni", engines.generation()) is not None



def int8_amx_available() -> bool:
    """Whether the int8 block-sparse product may run on AMX tiles here (:func:`int8_available`, the tiles in
    ``/proc/cpuinfo``, accel's ISA view ``amx``, and Linux granting the tile state). Under a lower ISA view nothing
    asks for the tile state or runs a tile instruction."""
    lib = _library("int8_bsr_vnni", engines.generation())
    if lib is None or engines.cpu_isa() != "amx" or not all(f in engines._cpu_flags() for f in AMX_INT8_NEEDS):
        return False
    with _lock:
        if lib.amx is None:
            try:
                if lib.accel_amx_init() != 0:
                    raise RuntimeError("Linux refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)")
                _check_int8(lib, amx=True)
                lib.amx = True
            except Exception as e:  # noqa: BLE001 - the VNNI product serves
                _log.warning("accel: the AMX int8 product is off in this process (%s: %s)", type(e).__name__,
                             str(e)[:300])
                lib.amx = False
    return lib.amx


def float_available(dtype: torch.dtype) -> bool:
    """Whether the native fp32 / bf16 block-sparse conv and linear kernels may be offered for ``dtype`` here."""
    if dtype not in _FLOAT_DTYPES:
        return False
    if dtype == torch.bfloat16 and BF16_NEEDS not in engines._cpu_flags():
        return False
    return _library("bsr_float", engines.generation()) is not None


def scan_available() -> bool:
    """Whether :func:`any_nonfinite` runs here (the fp32 float kernels' library; bf16 needs no bf16 instruction)."""
    return _library("bsr_float", engines.generation()) is not None


#: below this many values the native layout copies cost more than they save (:func:`to_nchw`, :func:`to_nhwc`)
NCHW_COPY_MIN = 1 << 18  # (1x64x56x56: PyTorch's copy is as fast)


def _relayout(y: torch.Tensor, to_cl: bool) -> torch.Tensor | None:
    src, dst = ("contiguous", "channels_last") if to_cl else ("channels_last", "contiguous")
    fmt = torch.contiguous_format if to_cl else torch.channels_last
    if not (y.dtype in _DTYPES and y.dim() == 4 and y.device.type == "cpu" and y.is_contiguous(memory_format=fmt)):
        raise ValueError(f"to_{'nhwc' if to_cl else 'nchw'}: y {y.dtype} {tuple(y.shape)} strides {y.stride()} on "
                         f"{y.device}: expected a {src} fp32/bf16/fp16 [N, C, H, W] CPU tensor")
    if y.numel() < NCHW_COPY_MIN or not scan_available():
        return None
    n, c, h, w = y.shape
    out = torch.empty(n, c, h, w, dtype=y.dtype, memory_format=torch.channels_last if to_cl else torch.contiguous_format)
    rows, cols = (c, h * w) if to_cl else (h * w, c)  # (each image's matrix, transposed)
    rc = _lib("bsr_float").accel_transpose_images(y.data_ptr(), int(y.dtype != torch.float32), n, rows, cols,
                                                  out.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"the {src} -> {dst} copy refused its arguments (code {rc})")
    return out


def to_nchw(y: torch.Tensor) -> torch.Tensor | None:
    """A channels_last CPU tensor ``y [N, C, H, W]`` (fp32, bf16 or fp16) copied to contiguous NCHW by the native
    transposing copy (16 x 16 blocks in registers; PyTorch's strided copy is about 3x slower on a 6 MB fp32 conv
    output), or None where that kernel is not available here or ``y`` is small (the caller copies with
    ``Tensor.contiguous``)."""
    return _relayout(y, False)


def to_nhwc(x: torch.Tensor) -> torch.Tensor | None:
    """:func:`to_nchw`'s other direction: a contiguous NCHW CPU tensor ``x [N, C, H, W]`` copied to channels_last
    (None where the kernel is not available or ``x`` is small)."""
    return _relayout(x, True)


def _nhwc_view(x: torch.Tensor) -> torch.Tensor:
    """``x [N, C, H, W]`` as a contiguous ``[N, H, W, C]``: a view of a channels_last tensor, else a copy (the native
    transposing copy for a large NCHW one)."""
    xn = x.permute(0, 2, 3, 1)
    if xn.is_contiguous():
        return xn
    t = to_nhwc(x) if x.dtype in _DTYPES and x.is_contiguous() else None
    return t.permute(0, 2, 3, 1) if t is not None else xn.contiguous()


def any_nonfinite(x: torch.Tensor) -> bool:
    """Whether ``x [M, K]`` (fp32 or bf16 on the CPU, rows of unit stride) holds a NaN or an inf: one vector pass in
    native code (no reduction op, no sync; a few microseconds for a token's row)."""
    if not (x.dim() == 2 and x.dtype in _FLOAT_DTYPES and x.device.type == "cpu" and
            (x.stride(1) == 1 or x.shape[1] <= 1)):
        raise ValueError(f"any_nonfinite (native): x {x.dtype} {tuple(x.shape)} strides {x.stride()} on {x.device}: "
                         f"expected fp32/bf16 [M, K] rows of unit stride on the CPU")
    m, k = x.shape
    if not m or not k:
        return False
    return bool(_lib("bsr_float").accel_any_nonfinite(x.data_ptr(), int(x.dtype == torch.bfloat16), m, k, x.stride(0),
                                                       torch.get_num_threads()))


def amx_available() -> bool:
    """Whether the AMX bf16 block-sparse conv and linear kernels may be offered here (with the float kernels' library:
    the linear's NaN rows are fixed there)."""
    gen = engines.generation()
    return _library("bsr_amx", gen) is not None and _library("bsr_float", gen) is not None


def _allowed(name: str = "int8_bsr_vnni") -> str | None:
    """Why kernel ``name`` may not be offered here, or None."""
    spec = KERNELS[name]
    if (engines.env("ACCEL_COMPILE") or "1").strip() == "0":
        return "ACCEL_COMPILE=0"
    missing = [f for f in spec.needs if f not in engines._cpu_flags()]
    if missing:
        return f"the CPU lacks {missing}"
    if engines.ISA_LEVELS.index(engines.cpu_isa()) < engines.ISA_LEVELS.index(spec.level):
        return f"accel's ISA view is {engines.cpu_isa()!r} (ACCEL_CPU_ISA), below {spec.level!r}"
    if compiler() is None:
        return "no C++ compiler on the PATH"
    return None


@functools.lru_cache(maxsize=8)
def _library(name: str, _gen: int):
    """Kernel ``name``'s library when it may be offered under the current settings (:func:`_allowed`), else None."""
    if _allowed(name) is not None:
        return None
    return _checked(name, compiler(), engines.cache_dir())


_LOADED: dict = {}  # (name, compiler, cache dir) -> the checked library, or None where building or checking failed


def _checked(name: str, cxx: str, cache: str):
    """Build, load and check kernel ``name`` once per process and compiler and cache folder (the settings that
    change the library), however often accel's variables are read again."""
    key = (name, cxx, cache)
    with _lock:
        if key not in _LOADED:
            try:
                lib = _load(name, _build(name))
                _CHECKS[name](lib)
            except Exception as e:  # noqa: BLE001 - no native kernel here: the other strategies serve every call
                _log.warning("accel: the native kernel %s is off in this process (%s: %s); the other CPU strategies "
                             "run. ACCEL_COMPILE=0 stops trying.", name, type(e).__name__, str(e)[:300])
                lib = None
            _LOADED[key] = lib
        return _LOADED[key]


def _build(name: str) -> str:
    """The built library's path: ``<cache dir>/native/<name>-<hash>.so``, built now if missing (into a temporary
    name, then renamed: safe with concurrent processes)."""
    cxx = compiler()
    source = os.path.join(_CSRC, name + ".cpp")
    flags = _COMMON + KERNELS[name].flags
    with open(source, "rb") as f:
        src = f.read()
    for header in sorted(h for h in os.listdir(_CSRC) if h.endswith(".h")):  # (the sources include them)
        with open(os.path.join(_CSRC, header), "rb") as f:
            src += f.read()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout.splitlines()[:1]
    digest = hashlib.sha1(src + repr((cxx, flags, version)).encode()).hexdigest()[:16]
    private = os.path.join(tempfile.gettempdir(), f"accel-native-{os.getuid()}")
    for base in (os.path.join(engines.cache_dir(), "native"), private):
        path = os.path.join(base, f"{name}-{digest}.so")
        if base == private and not _private_dir(base):
            continue  # (a shared temp folder: only a folder of this user's that nobody else can write)
        if _intact(path):
            return path
        try:
            os.makedirs(base, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=base)
            os.close(fd)
        except OSError:
            continue  # not writable: the next place
        try:
            r = subprocess.run([cxx, *flags, source, "-o", tmp], capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                raise RuntimeError(f"{os.path.basename(cxx)} failed: {(r.stderr or r.stdout).strip()[:300]}")
            os.chmod(tmp, 0o644)  # (readable by the other users of a shared cache folder)
            _write_digest(tmp, path + ".sha1")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path
    raise OSError(f"no writable folder for the native library ({engines.cache_dir()}/native, {tempfile.gettempdir()})")


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def _write_digest(lib_path: str, digest_path: str) -> None:
    """The library's content hash next to it (written first, renamed into place): a damaged or partly copied file
    is rebuilt instead of loaded (loading a truncated library kills the process with SIGBUS)."""
    fd, tmp = tempfile.mkstemp(suffix=".sha1", dir=os.path.dirname(digest_path))
    with os.fdopen(fd, "w") as f:
        f.write(_file_digest(lib_path))
    os.chmod(tmp, 0o644)
    os.replace(tmp, digest_path)


def _intact(path: str) -> bool:
    """Whether a built library is there and its content matches the hash written next to it."""
    try:
        with open(path + ".sha1") as f:
            return f.read().strip() == _file_digest(path)
    except OSError:
        return False


def _private_dir(base: str) -> bool:
    """``base`` exists or is created as this user's, writable by nobody else."""
    try:
        os.makedirs(base, mode=0o700, exist_ok=True)
        st = os.stat(base)
        return st.st_uid == os.getuid() and not st.st_mode & 0o022
    except OSError:
        return False


def _load(name: str, path: str):
    lib = ctypes.CDLL(path)
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    if name == "bsr_amx":
        lib.accel_amx_init.restype = i32
        lib.accel_amx_init.argtypes = []
        lib.accel_bsr_conv_amx.restype = i32
        lib.accel_bsr_conv_amx.argtypes = [p] + [i64] * 14 + [p, p, p, i64, i64, p, p, i64, i64, p, i32]
        lib.accel_int8_conv_amx.restype = i32
        lib.accel_int8_conv_amx.argtypes = [p] + [i64] * 11 + [p, p, p, i64, i64, p, p, p, p, p, i32, i64, i64, i32,
                                                                i32]
        if lib.accel_amx_init() != 0:  # (before any tile instruction: without the permission they fault)
            raise RuntimeError("Linux refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)")
        return lib
    if name == "bsr_float":
        lib.accel_bsr_conv_float.restype = i32
        lib.accel_bsr_conv_float.argtypes = [p, i32] + [i64] * 13 + [p, p, p, i64, i64, p, p, i64, i64, i32, i64, p,
                                                                     i32, i32]
        lib.accel_any_nonfinite.restype = i32
        lib.accel_any_nonfinite.argtypes = [p, i32, i64, i64, i64, i32]
        lib.accel_nonfinite_rows.restype = i64
        lib.accel_nonfinite_rows.argtypes = [p, i32, i64, i64, i64, p, i32, i64, i64]
        lib.accel_pad_nhwc.restype = i32
        lib.accel_pad_nhwc.argtypes = [p, i32] + [i64] * 6 + [p, i32]
        lib.accel_transpose_images.restype = i32
        lib.accel_transpose_images.argtypes = [p, i32, i64, i64, i64, p, i32]
        return lib
    lib.accel_quantize_rows.restype = i32
    lib.accel_quantize_rows.argtypes = [p, i32, i64, i64, i64, i32, i32, ctypes.c_float, p, i64, i64, p, i32]
    lib.accel_quantize_images_padded.restype = i32
    lib.accel_quantize_images_padded.argtypes = [p, i32, i32, i64, i64, i64, i64, i32, i32, ctypes.c_float, p, i64,
                                                 i64, p, i32]
    lib.accel_int8_bsr_vnni.restype = i32
    lib.accel_int8_bsr_vnni.argtypes = [p, i32, i64, i64, p, p, p, i64, i64, p, p, p, p, p, i32, i64, i64, i32, i32]
    lib.accel_amx_init.restype = i32
    lib.accel_amx_init.argtypes = []
    lib.accel_int8_bsr_amx.restype = i32
    lib.accel_int8_bsr_amx.argtypes = [p, i64, i64, p, p, p, i64, i64, p, p, p, p, p, i32, i64, i64, i32, i32]
    lib.accel_int8_linear_amx.restype = i32
    lib.accel_int8_linear_amx.argtypes = [p, i32, i64, i64, i64, i32, p, i64, i64, p, p, p, p, i64, i64, p, p, p, p, i32,
                                          i64, i64, i32, i32]
    lib.amx = None  # its AMX product: set up and checked at the first int8_amx_available() that needs it
    return lib


def _check_int8(lib, amx: bool = False) -> None:
    """Both int8 kernels before first use: the quantization bit for bit against accel's eager rule (fp32, bf16, fp16;
    row lengths of vector bodies and tails; zero, NaN and inf rows), the product against an exact integer product
    (every block size, short and full token tiles, an empty block row, int8 and uint8 activations, a partial last
    block of outputs)."""
    from .int8 import act_scale_inv

    g = torch.Generator().manual_seed(0)
    for dtype in () if amx else (torch.float32, torch.bfloat16, torch.float16):
        for k in (1, 15, 16, 17, 33, 100):
            x = (torch.randn(5, k, generator=g) * 3).to(dtype)
            x[1] = 0
            x[2, k // 2] = float("nan")
            x[3, k - 1] = float("inf")
            for qmax in (63, 127):
                u, scale = _quantize(lib, x, qmax, k + 3)
                want_s, inv = act_scale_inv(x.float(), qmax, None)
                want_u = (torch.round(x.float() * inv[:, None]) + 128).to(torch.uint8)
                ok = torch.isfinite(want_s)
                if not (torch.equal(scale.nan_to_num(-1.0), want_s.nan_to_num(-1.0)) and
                        torch.equal(u[ok, :k], want_u[ok]) and bool((u[:, k:] == 128).all())):
                    raise RuntimeError(f"the quantization of {dtype} rows of {k} (qmax {qmax}) differs from accel's rule")
    for bs in BLOCKS:
        nbr, nbc = 3, 2
        mask = torch.tensor([[1, 0], [0, 0], [1, 1]], dtype=torch.bool)
        crow = torch.cat([torch.zeros(1, dtype=torch.int64), mask.sum(1).cumsum(0)])
        col = mask.nonzero()[:, 1].contiguous()
        values = torch.randint(-127, 128, (col.numel(), bs, bs), generator=g, dtype=torch.int8)
        w = pack(values, crow, col)
        dense = torch.zeros(nbr * bs, nbc * bs, dtype=torch.int64)
        for p, (r, c) in enumerate(mask.nonzero().tolist()):
            dense[r * bs:(r + 1) * bs, c * bs:(c + 1) * bs] = values[p]
        n = nbr * bs - 5
        ones, zeros = torch.ones(nbr * bs), torch.zeros(nbr * bs)
        for m in (1, 3, 9, 17, 40):
            x = torch.randint(-127, 128, (m, nbc * bs), generator=g, dtype=torch.int8)
            want = (x.long() @ dense.t()).float()[:, :n]  # (|sums| < 2**24: exact in fp32)
            for u8, tiles in (((True, True),) if amx else ((False, False), (True, False))):
                xi = (x.view(torch.uint8) ^ 0x80) if u8 else x
                for out in (torch.float32, torch.bfloat16):
                    y = _product(lib, xi, w, torch.ones(m), ones, zeros, n, tiles, out_dtype=out)
                    if not torch.equal(y, want.to(out)):
                        raise RuntimeError(f"wrong product (block {bs}, {m} tokens, uint8 {u8}, AMX {tiles}, {out} "
                                           f"output) checked against an exact integer product")
        if amx:  # the fused entry (quantization and product in one region): the two steps' bits, a NaN row included
            k, ws, bias = nbc * bs, torch.rand(n, generator=g), torch.randn(n, generator=g)
            xf = (torch.randn(40, k, generator=g) * 3).bfloat16()
            xf[7, 3] = float("nan")
            for m in (17, 40):
                u, scale = _quantize(lib, xf[:m], 127, k)
                want = _product(lib, u, w, scale, ws, bias, n, True, out_dtype=torch.bfloat16)
                u2, scale2 = torch.empty(m, k, dtype=torch.uint8), torch.empty(m)
                got = torch.empty(m, n, dtype=torch.bfloat16)
                rc = lib.accel_int8_linear_amx(xf.data_ptr(), 1, m, k, k, 127, u2.data_ptr(), k, k, scale2.data_ptr(),
                                               w.blocks.data_ptr(), w.crow.data_ptr(), w.col.data_ptr(), nbr, bs,
                                               w.comp.data_ptr(), ws.data_ptr(), bias.data_ptr(), got.data_ptr(), 1, n,
                                               n, torch.get_num_threads(), 0)
                if rc != 0 or not torch.equal(got.view(torch.int16), want.view(torch.int16)):
                    raise RuntimeError(f"the fused AMX int8 Linear (block {bs}, {m} tokens) differs from its two steps "
                                       f"(code {rc})")


_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _quantize(lib, x: torch.Tensor, qmax: int, width: int, u: torch.Tensor | None = None,
              static_scale: float | None = None):
    m, k = x.shape
    u = torch.empty(m, width, dtype=torch.uint8) if u is None else u
    scale = torch.empty(m, dtype=torch.float32)
    rc = lib.accel_quantize_rows(x.data_ptr(), _DTYPES[x.dtype], m, k, x.stride(0), qmax, int(static_scale is not None),
                                 0.0 if static_scale is None else static_scale, u.data_ptr(), u.stride(0), width,
                                 scale.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"the quantization kernel refused its arguments or ran out of memory (code {rc})")
    return u, scale


def _product(lib, x, w, scale, w_scale, bias, n: int, amx: bool = False, dense_order: bool = False,
             out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    m = x.shape[0]
    y = torch.empty(m, n, dtype=out_dtype)
    bs = w.blocks.shape[2]
    y_bf16 = int(out_dtype == torch.bfloat16)
    if amx:
        rc = lib.accel_int8_bsr_amx(x.data_ptr(), m, x.stride(0), w.blocks.data_ptr(), w.crow.data_ptr(),
                                    w.col.data_ptr(), w.crow.numel() - 1, bs, w.comp.data_ptr(), scale.data_ptr(),
                                    w_scale.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
                                    y_bf16, n, n, torch.get_num_threads(), int(dense_order))
    else:
        rc = lib.accel_int8_bsr_vnni(x.data_ptr(), int(x.dtype == torch.uint8), m, x.stride(0), w.blocks.data_ptr(),
                                     w.crow.data_ptr(), w.col.data_ptr(), w.crow.numel() - 1, bs, w.comp.data_ptr(),
                                     scale.data_ptr(), w_scale.data_ptr(), None if bias is None else bias.data_ptr(),
                                     y.data_ptr(), y_bf16, n, n, torch.get_num_threads(), int(dense_order))
    if rc != 0:
        raise RuntimeError(f"the block-sparse kernel refused its arguments (code {rc})")
    return y


class Packed(NamedTuple):
    """The weight as the kernel reads it (:func:`pack`)."""

    blocks: torch.Tensor  # [nnz, B/4, B, 4] int8
    comp: torch.Tensor  # [nbr * B] int32
    crow: torch.Tensor  # [nbr + 1] int64
    col: torch.Tensor  # [nnz] int64
    width: int  # the activation columns the blocks read: (max col + 1) * B


def pack(values_q: torch.Tensor, crow: torch.Tensor, col: torch.Tensor) -> Packed:
    """The kernel's operands for int8 blocks ``values_q [nnz, B, B]`` (out, in) at ``crow`` / ``col`` (BSR): the
    blocks repacked ``[nnz, B/4, B, 4]``, and ``comp [nbr * B]``, 128 times each output's sum of weights over its
    block row (the uint8 zero point's share, taken back out of the sums). Checks what the kernel's memory accesses
    rely on (the block size, ``crow`` from 0 to nnz non-decreasing, columns >= 0), once per weight."""
    nnz, bs = values_q.shape[0], values_q.shape[1]
    nbr = crow.numel() - 1
    crow, col = crow.to(torch.int64).contiguous(), col.to(torch.int64).contiguous()
    if (values_q.dtype != torch.int8 or values_q.dim() != 3 or values_q.shape[2] != bs or bs not in BLOCKS or
            nbr < 0 or col.numel() != nnz or int(crow[0]) != 0 or int(crow[-1]) != nnz or
            bool((crow[1:] < crow[:-1]).any()) or (nnz and int(col.min()) < 0)):
        raise ValueError(f"native int8 block-sparse: not a BSR int8 weight: values {values_q.dtype} "
                         f"{tuple(values_q.shape)}, crow {tuple(crow.shape)} from {int(crow[0]) if nbr >= 0 else None} "
                         f"to {int(crow[-1]) if nbr >= 0 else None}, col {tuple(col.shape)} (blocks of {BLOCKS})")
    blocks = values_q.view(nnz, bs, bs // 4, 4).permute(0, 2, 1, 3).contiguous()
    rows = torch.repeat_interleave(torch.arange(nbr), crow[1:] - crow[:-1])
    comp = torch.zeros(nbr, bs, dtype=torch.int32).index_add_(0, rows, values_q.sum(2, dtype=torch.int32))
    return Packed(blocks, comp.mul_(128).flatten(), crow, col, (int(col.max()) + 1) * bs if nnz else 0)


def _lib(name: str = "int8_bsr_vnni"):
    lib = _library(name, engines.generation())
    if lib is None:
        raise RuntimeError(f"the native kernel {name} is not available here ({_allowed(name) or 'build failed'})")
    return lib


def quantize_rows(x: torch.Tensor, qmax: int, width: int, spread: bool = False,
                  static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """accel's per-token quantization of ``x [M, K]`` (fp32, bf16 or fp16, rows of unit stride) in one pass:
    ``(u, scale)``, ``u [M, width]`` uint8 the integers plus 128 (128 past K: zeros), in a reused buffer (the
    caller's until its next call), and ``scale [M]`` fp32 (NaN for rows holding NaN/inf: their bytes are 128).
    ``spread``: rows an odd number of cache lines apart (:func:`spread_stride`), for the kernels' tile loads.
    ``static_scale`` (one fp32 value): accel's static rule instead (``accel.cpu.int8.scale_inv``, values saturating
    at +-qmax)."""
    if not (x.dtype in _DTYPES and x.dim() == 2 and x.device.type == "cpu" and (x.stride(1) == 1 or x.shape[1] <= 1)
            and width >= x.shape[1] and type(qmax) is int and 1 <= qmax <= 127 and
            (static_scale is None or (static_scale.dtype == torch.float32 and static_scale.numel() == 1))):
        raise ValueError(f"quantize_rows: x {x.dtype} {tuple(x.shape)} strides {x.stride()} on {x.device}, qmax {qmax}, "
                         f"width {width}, static scale "
                         f"{None if static_scale is None else (static_scale.dtype, tuple(static_scale.shape))}: "
                         f"expected fp32/bf16/fp16 [M, K] rows of unit stride on the CPU, K <= width, "
                         f"1 <= qmax <= 127, one fp32 static scale or none")
    m = x.shape[0]
    ld = spread_stride(width) if spread else width
    u = scratch("native.u8", m * ld, torch.uint8).view(m, ld)[:, :width]
    return _quantize(_lib(), x, qmax, width, u, None if static_scale is None else float(static_scale.reshape(())))


def quantize_images_padded(x: torch.Tensor, qmax: int, padding,
                           static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows` for the images of a conv input ``x [N, C, H, W]`` (fp32, bf16 or fp16; channels_last, or
    contiguous NCHW with C a multiple of 16: read in place, no NHWC copy), one row per image, written straight into
    the padded ``up [N, H + 2 ph, W + 2 pw, C]`` uint8 (NHWC; a reused buffer, the caller's until its next call) whose
    padding is the zero point 128: ``(up, scale [N])``, the same integers and scales as the rows'. ``static_scale``
    (one fp32 value): accel's static rule instead (``accel.cpu.int8.scale_inv``, values saturating at +-qmax)."""
    pad = tuple(padding) if isinstance(padding, (tuple, list)) else ()
    ph, pw = (int(v) for v in pad) if len(pad) == 2 and all(isinstance(v, int) for v in pad) else (-1, -1)
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    if not (x.dtype in _DTYPES and x.dim() == 4 and (cl or (x.is_contiguous() and x.shape[1] % 16 == 0)) and
            x.device.type == "cpu" and ph >= 0 and pw >= 0 and type(qmax) is int and 1 <= qmax <= 127 and
            (static_scale is None or (static_scale.dtype == torch.float32 and static_scale.numel() == 1))):
        raise ValueError(f"quantize_images_padded: x {x.dtype} {tuple(x.shape)} strides {x.stride()} on {x.device}, "
                         f"qmax {qmax}, padding {padding}, static scale "
                         f"{None if static_scale is None else (static_scale.dtype, tuple(static_scale.shape))}: "
                         f"expected fp32/bf16/fp16 [N, C, H, W] on the CPU, one fp32 static scale or none, "
                         f"channels_last or contiguous with C a multiple of 16, padding a pair of ints >= 0, "
                         f"1 <= qmax <= 127")
    n, c, h, w = x.shape
    up = scratch("native.up8", n * (h + 2 * ph) * (w + 2 * pw) * c, torch.uint8).view(n, h + 2 * ph, w + 2 * pw, c)
    scale = torch.empty(n, dtype=torch.float32)
    s = 0.0 if static_scale is None else float(static_scale.reshape(()))
    rc = _lib().accel_quantize_images_padded(x.data_ptr(), _DTYPES[x.dtype], int(not cl), n, h, w, c, qmax,
                                             int(static_scale is not None), s, up.data_ptr(), ph, pw, scale.data_ptr(),
                                             torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"the quantization kernel refused its arguments or ran out of memory (code {rc})")
    return up, scale


def out_dtype(x_dtype: torch.dtype, activation: str) -> torch.dtype:
    """The int8 kernels' output for a layer of ``x_dtype`` activations: bf16 stored by the kernel for bf16 layers
    without an activation (the fp32 result rounded once: the bits of converting it), fp32 otherwise, activated and
    converted by the caller (even relu does not commute with the rounding bit for bit: a tiny negative result
    rounds to -0.0, which relu keeps, where relu first gives +0.0)."""
    return torch.bfloat16 if x_dtype == torch.bfloat16 and activation == "none" else torch.float32


def spread_stride(width: int) -> int:
    """A row stride of at least ``width`` bytes that is an odd number of 64-byte lines: 16 rows read by one tile load
    then fall in 16 different L1 sets (a stride that is a multiple of 4 KiB puts them all in one set, and the loads
    miss L1)."""
    lines = -(-width // 64)
    return 64 * (lines + 1 - lines % 2)


def int8_bsr_linear(u: torch.Tensor, w: Packed, scale: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None, n: int, amx: bool = False, dense_order: bool = False,
                    out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``y [M, n]``: ``((acc * scale[t]) * w_scale[o]) + bias[o]`` in fp32 with ``acc[t, o]`` the int32 product of
    the integers in ``u`` (uint8, plus 128, from :func:`quantize_rows`; or int8) and the blocks of ``w``
    (:func:`pack`); rows with a scale past 2**96 in fp64; stored as ``out_dtype`` (fp32, or bf16 rounded once as
    ``Tensor.to`` rounds). ``dense_order``: the dense int8 engines' epilogue instead, ``(acc * w_scale[o]) * scale[t]
    + bias[o]`` (one fused multiply-add) in fp32 for every row. The operands' layout is checked here: the kernel reads
    raw pointers."""
    bs = w.blocks.shape[2]
    nbr = w.crow.numel() - 1
    m = u.shape[0] if u.dim() == 2 else -1
    vec = (scale, w_scale) + (() if bias is None else (bias,))
    if not (u.dtype in (torch.int8, torch.uint8) and u.dim() == 2 and u.stride(1) == 1 and u.shape[1] >= w.width and
            u.device.type == "cpu" and 0 <= n <= nbr * bs and scale.numel() == m and w_scale.numel() == n and
            (bias is None or bias.numel() == n) and
            all(t.dtype == torch.float32 and t.dim() == 1 and t.is_contiguous() and t.device.type == "cpu" for t in vec)):
        raise ValueError(f"int8_bsr_linear (native): u {u.dtype} {tuple(u.shape)} strides {u.stride()} on {u.device}, "
                         f"scale {scale.dtype} {tuple(scale.shape)}, w_scale {w_scale.dtype} {tuple(w_scale.shape)}, "
                         f"bias {None if bias is None else (bias.dtype, tuple(bias.shape))}, n {n}: expected "
                         f"int8/uint8 u [M, >= {w.width}] with rows of unit stride, contiguous fp32 vectors of M and "
                         f"n <= {nbr * bs} on the CPU")
    if amx and not int8_amx_available():
        raise RuntimeError("int8_bsr_linear (native): the AMX product is not available here (tiles, ACCEL_CPU_ISA, or "
                           "Linux's tile state)")
    if amx and u.dtype != torch.uint8:
        raise ValueError(f"int8_bsr_linear (native AMX): u must be uint8 (integers + 128), got {u.dtype}")
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"int8_bsr_linear (native): out_dtype must be float32 or bfloat16, got {out_dtype}")
    return _product(_lib(), u, w, scale, w_scale, bias, n, amx, dense_order, out_dtype)


def int8_runner(w: Packed, w_scale: torch.Tensor, bias: torch.Tensor | None, n: int, qmax: int, k: int, amx: bool,
                dtype: torch.dtype, activation: str = "none", dense_order: bool = False):
    """:func:`quantize_rows` (spread rows), :func:`int8_bsr_linear` and the activation for one int8 layer of ``dtype``
    activations, its operands checked once here: a function of ``x [M, k]`` (a layer's input of that dtype) making two
    native calls (one on AMX: both steps in one parallel region) and returning ``dtype`` (:func:`out_dtype`), for a
    settled layer's plan (``accel.ops._plans``), where each Python step costs microseconds between a model's other
    ops."""
    from ..quant import ACTIVATIONS, activate

    y_dtype = out_dtype(dtype, activation)
    bs = w.blocks.shape[2]
    nbr = w.crow.numel() - 1
    width = -(-k // bs) * bs
    ld = spread_stride(width)
    vec = (w_scale,) + (() if bias is None else (bias,))
    if not (0 <= n <= nbr * bs and w.width <= width and w_scale.numel() == n and (bias is None or bias.numel() == n) and
            all(t.dtype == torch.float32 and t.dim() == 1 and t.is_contiguous() and t.device.type == "cpu" for t in vec)
            and isinstance(qmax, int) and 1 <= qmax <= 127 and dtype in _DTYPES and activation in ACTIVATIONS):
        raise ValueError(f"int8_bsr_linear (native): w_scale {w_scale.dtype} {tuple(w_scale.shape)}, bias "
                         f"{None if bias is None else (bias.dtype, tuple(bias.shape))}, n {n}, K {k} (blocks of {bs} "
                         f"reading {w.width} columns), qmax {qmax}, activations {dtype}, activation {activation!r}")
    if amx and not int8_amx_available():
        raise RuntimeError("int8_bsr_linear (native): the AMX product is not available here (tiles, ACCEL_CPU_ISA, or "
                           "Linux's tile state)")
    lib = _lib()
    quantize, product = lib.accel_quantize_rows, lib.accel_int8_bsr_vnni
    fused = lib.accel_int8_linear_amx  # (on AMX: the quantization and the product in one parallel region)
    weights = (w.blocks.data_ptr(), w.crow.data_ptr(), w.col.data_ptr(), nbr, bs, w.comp.data_ptr())
    tail = (w_scale.data_ptr(), None if bias is None else bias.data_ptr())
    y_bf16 = int(y_dtype == torch.bfloat16)

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != dtype or x.dim() != 2 or x.shape[1] != k or x.device.type != "cpu":
            raise ValueError(f"int8_bsr_linear (native): x {x.dtype} {tuple(x.shape)} on {x.device}: expected {dtype} "
                             f"[M, {k}] on the CPU")
        if x.stride(1) != 1 and k > 1:
            x = x.contiguous()
        m = x.shape[0]
        threads = torch.get_num_threads()
        u = scratch("native.u8", m * ld, torch.uint8)
        scale = torch.empty(m, dtype=torch.float32)
        y = torch.empty(m, n, dtype=y_dtype)
        if amx:
            rc = fused(x.data_ptr(), _DTYPES[x.dtype], m, k, x.stride(0), qmax, u.data_ptr(), ld, width,
                       scale.data_ptr(), *weights, *tail, y.data_ptr(), y_bf16, n, n, threads, int(dense_order))
        else:
            rc = quantize(x.data_ptr(), _DTYPES[x.dtype], m, k, x.stride(0), qmax, 0, 0.0, u.data_ptr(), ld, width,
                          scale.data_ptr(), threads)
            if rc != 0:
                raise RuntimeError(f"the quantization kernel refused its arguments or ran out of memory (code {rc})")
            rc = product(u.data_ptr(), 1, m, ld, *weights, scale.data_ptr(), *tail, y.data_ptr(), y_bf16, n, n,
                         threads, int(dense_order))
        if rc != 0:
            raise RuntimeError(f"the int8 block kernel refused its arguments (code {rc})")
        if activation != "none":
            y = activate(y, activation, inplace=True)
        return y if y.dtype == dtype else y.to(dtype)

    run.operands = (w, w_scale, bias)  # (alive while the function is)
    return run


# ------------------------------------------------------------------------------------------------ float (bsr_float)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16)


class PackedFloat(NamedTuple):
    """A block-sparse weight as the float kernel reads it (:func:`pack_float`)."""

    blocks: torch.Tensor  # fp32 [nnz, B(in), B(out)], or bf16 [nnz, B/2, B(out), 2]
    crow: torch.Tensor  # [nbr + 1] int64
    col: torch.Tensor  # [nnz] int64
    ncols: int  # block columns the weight has (K / B)


def pack_float(values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, ncols: int,
               dtype: torch.dtype) -> PackedFloat:
    """The float kernel's operands for blocks ``values [nnz, B, B]`` (out, in; any float dtype, converted to
    ``dtype``) at ``crow`` / ``col`` of a weight with ``ncols`` block columns. Checks what the kernel's memory accesses
    rely on (block size, ``crow`` from 0 to nnz non-decreasing, ``0 <= col < ncols``), once per weight."""
    nnz, bs = values.shape[0], values.shape[1]
    nbr = crow.numel() - 1
    crow, col = crow.to(torch.int64).contiguous(), col.to(torch.int64).contiguous()
    if (dtype not in _FLOAT_DTYPES or not values.is_floating_point() or values.dim() != 3 or values.shape[2] != bs or
            bs not in BLOCKS or nbr < 0 or col.numel() != nnz or int(crow[0]) != 0 or int(crow[-1]) != nnz or
            bool((crow[1:] < crow[:-1]).any()) or (nnz and (int(col.min()) < 0 or int(col.max()) >= ncols))):
        raise ValueError(f"native block-sparse: not a BSR weight for {dtype}: values {values.dtype} "
                         f"{tuple(values.shape)}, crow {tuple(crow.shape)}, col {tuple(col.shape)} in "
                         f"[{int(col.min()) if nnz else None}, {int(col.max()) if nnz else None}] of {ncols} block "
                         f"columns (blocks of {BLOCKS}, fp32 or bf16)")
    v = values.detach().to(dtype)
    if dtype == torch.float32:
        blocks = v.transpose(1, 2).contiguous()
    else:
        blocks = v.view(nnz, bs, bs // 2, 2).permute(0, 2, 1, 3).contiguous()
    return PackedFloat(blocks, crow, col, ncols)


def packed_float(values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, ncols: int,
                 dtype: torch.dtype) -> PackedFloat:
    """:func:`pack_float`, once per weight (re-packed when the values change in place, as in training)."""
    return cached("native_float", (values, crow, col), (ncols, dtype),
                  lambda: pack_float(values, crow, col, ncols, dtype))


def _float_operands(x, w: PackedFloat, bias, c: int, k_blocks: int, what: str):
    bs = w.blocks.shape[2]  # (B in both packings)
    if x.dtype == torch.bfloat16 and BF16_NEEDS not in engines._cpu_flags():  # (vdpbf16ps would fault)
        raise ValueError(f"{what} (native): bf16 needs AVX512_BF16, which this CPU lacks")
    if not (x.dtype == w.blocks.dtype and x.device.type == "cpu" and c % bs == 0 and k_blocks == w.ncols and
            (bias is None or (bias.dtype == torch.float32 and bias.dim() == 1 and bias.is_contiguous() and
                              bias.device.type == "cpu"))):
        raise ValueError(f"{what} (native): x {x.dtype} {tuple(x.shape)} on {x.device} with blocks {w.blocks.dtype} of "
                         f"{bs} over {w.ncols} block columns, bias {None if bias is None else (bias.dtype, tuple(bias.shape))}"
                         f": expected x in the blocks' dtype on the CPU, channels a multiple of the block, K/B = "
                         f"{w.ncols} and a contiguous fp32 bias")
    return bs


def _check_geometry(stride, padding, dilation) -> None:
    if not (len(stride) == len(padding) == len(dilation) == 2 and min(stride) >= 1 and min(dilation) >= 1 and
            min(padding) >= 0):
        raise ValueError(f"native conv: stride {tuple(stride)} and dilation {tuple(dilation)} must be >= 1, padding "
                         f"{tuple(padding)} >= 0")


def bsr_conv2d(x: torch.Tensor, w: PackedFloat, weight_shape, bias: torch.Tensor | None, stride, padding,
               dilation) -> torch.Tensor:
    """``conv2d(x, W) + bias`` for the block-sparse ``W [O, C, KH, KW]`` packed by :func:`pack_float` (``(kh, kw, c)``
    order, ``C % B == 0``): ``[N, O, OH, OW]`` in ``x``'s dtype (fp32 sums, rounded once), in the layout
    ``nn.Conv2d`` gives ``x`` (the kernel stores NCHW itself)."""
    return conv_runner(w, weight_shape, bias, stride, padding, dilation, x, "native")(x)[0]


def _runner_out_hw(what: str, h: int, w: int, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, dh: int,
                   dw: int) -> tuple[int, int]:
    """A conv runner's output size for an ``h x w`` input, or a ValueError where the padded input is smaller than the
    dilated kernel (as PyTorch's conv)."""
    if h + 2 * ph < dh * (kh - 1) + 1 or w + 2 * pw < dw * (kw - 1) + 1:
        raise ValueError(f"{what}: input {h}x{w} with padding {(ph, pw)} is smaller than the dilated {kh}x{kw} kernel "
                         f"(dilation {(dh, dw)})")
    return output_size(h, w, kh, kw, (sh, sw), (ph, pw), (dh, dw))


#: the native float conv engines (:func:`conv_runner`)
CONV_ENGINES = ("native", "native_nchw", "native_amx", "native_amx_padded")


def conv_runner(w: PackedFloat, weight_shape, bias: torch.Tensor | None, stride, padding, dilation, x: torch.Tensor,
                engine: str, lib=None):
    """One layer's native block-sparse conv, its operands checked once here with an input ``x`` of the layer: a
    function of such inputs (``x``'s dtype and channels, any batch and image size) that checks only the input and
    returns ``(y, bad)``: ``y [N, O, OH, OW]`` in ``x``'s dtype (channels_last; from ``native``, in the layout
    ``nn.Conv2d`` gives ``x``, NCHW stored by the kernel), and whether ``x`` holds a NaN or an inf in the input rows
    the windows span (whole rows, from each output row's first tap row to its last; every engine scans each row just
    before its first use, or as it copies it). For a settled layer's plan (``accel.ops._plans``), where each Python
    step costs microseconds between a model's other ops (the checked path cost ~50 us more per call than its
    kernel).

    Engines (:data:`CONV_ENGINES`): ``native`` the float kernel (fp32 or bf16, fp32 sums), reading channels_last (an
    NCHW ``x`` copied first); ``native_nchw`` the same for fp32, reading a contiguous NCHW ``x`` in place (each pixel's
    channels a plane apart: no copy, slower reads; which pays depends on the layer); ``native_amx`` bf16 on AMX
    tiles, reading a channels_last ``x`` in place (other layouts are copied first); pixel groups whose windows reach
    into the zero padding are copied into a small buffer first, which costs more where most of them do (narrow
    images); ``native_amx_padded`` copies ``x`` into a zero-padded buffer instead (``accel_pad_nhwc``). ``lib``: the
    kernel's library (its check before first use), else the loaded one."""
    if engine not in CONV_ENGINES:
        raise ValueError(f"bsr_conv2d (native): unknown engine {engine!r}; one of {CONV_ENGINES}")
    o, c, kh, kw = weight_shape
    dtype, amx = x.dtype, engine in ("native_amx", "native_amx_padded")
    if amx and dtype != torch.bfloat16:
        raise ValueError(f"bsr_conv2d (native AMX): x must be bfloat16, got {dtype}")
    if engine == "native_nchw" and dtype != torch.float32:
        raise ValueError(f"bsr_conv2d (native_nchw): x must be float32, got {dtype}")
    in_place_nchw = engine == "native_nchw"
    bs = _float_operands(x, w, bias, c, kh * kw * c // w.blocks.shape[2], "bsr_conv2d")
    _check_geometry(stride, padding, dilation)
    nbr = w.crow.numel() - 1
    if x.dim() != 4 or x.shape[1] != c or bias is not None and bias.numel() != o or o > nbr * bs:
        raise ValueError(f"bsr_conv2d (native): x {tuple(x.shape)} for weight {tuple(weight_shape)}, bias "
                         f"{None if bias is None else tuple(bias.shape)}, {nbr} block rows of {bs}")
    (sh, sw), (ph, pw), (dh, dw) = tuple(stride), tuple(padding), tuple(dilation)
    weights = (w.blocks.data_ptr(), w.crow.data_ptr(), w.col.data_ptr(), nbr, bs,
               None if bias is None else bias.data_ptr())
    lib = lib or _lib("bsr_amx" if amx else "bsr_float")
    kern = lib.accel_bsr_conv_amx if amx else lib.accel_bsr_conv_float
    pad = _lib("bsr_float").accel_pad_nhwc if engine == "native_amx_padded" and (ph or pw) else None
    flag = int(dtype == torch.bfloat16)

    def run(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        if x.dtype != dtype or x.dim() != 4 or x.shape[1] != c or x.device.type != "cpu":
            raise ValueError(f"bsr_conv2d (native): x {x.dtype} {tuple(x.shape)} on {x.device}: expected {dtype} "
                             f"[N, {c}, H, W] on the CPU")
        n, _, h, wd = x.shape
        oh, ow = _runner_out_hw("bsr_conv2d (native)", h, wd, kh, kw, sh, sw, ph, pw, dh, dw)
        # the float kernel stores an NCHW result itself for an input nn.Conv2d answers in NCHW (no copy afterwards)
        nchw = not amx and n > 0 and (x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last))
        y = torch.empty(n, o, oh, ow, dtype=dtype) if nchw else torch.empty(n, oh, ow, o, dtype=dtype)
        found = ctypes.c_int(0)  # (no outputs: nothing to make NaN)
        if y.numel():
            threads = torch.get_num_threads()
            read_nchw = in_place_nchw and x.is_contiguous()
            xn = x if read_nchw else _nhwc_view(x)
            if pad is not None:  # the padded copy, scanned as it is made
                hp, wp = h + 2 * ph, wd + 2 * pw
                xp = scratch("native.xpad", n * hp * wp * c, dtype)
                found.value = pad(xn.data_ptr(), 1, n, h, wd, c, ph, pw, xp.data_ptr(), threads)
                rc = kern(xp.data_ptr(), n, hp, wp, c, kh, kw, sh, sw, 0, 0, dh, dw, oh, ow, *weights, y.data_ptr(),
                          o, o, None, threads)
            elif amx:  # (the rows the windows reach, scanned by the kernels as they go)
                rc = kern(xn.data_ptr(), n, h, wd, c, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, *weights, y.data_ptr(),
                          o, o, ctypes.byref(found), threads)
            else:
                rc = kern(xn.data_ptr(), flag, n, h, wd, c, kw, sh, sw, ph, pw, dh, dw, oh, ow, *weights, y.data_ptr(),
                          o, o, int(nchw), kh, ctypes.byref(found), int(read_nchw), threads)
            if rc != 0:
                raise RuntimeError(f"the block-sparse conv kernel ({engine}) refused its arguments (code {rc})")
        return (y if nchw else y.permute(0, 3, 1, 2)), bool(found.value)

    run.operands = (w, bias)  # (alive while the function is)
    return run


def bsr_linear(x: torch.Tensor, w: PackedFloat, bias: torch.Tensor | None, out_features: int,
               amx: bool = False) -> torch.Tensor:
    """``x [M, K] @ W^T + bias`` for the block-sparse ``W [out_features, K]`` packed by :func:`pack_float`
    (``K % B == 0``): ``[M, out_features]`` in ``x``'s dtype (a 1x1 conv over one image row of M pixels), rows of
    ``x`` holding NaN/inf NaN in every finite output (as the dense layer); ``amx``: on AMX tiles (bf16 only)."""
    if x.dim() != 2:
        raise ValueError(f"bsr_linear (native): x must be [M, K], got {tuple(x.shape)}")
    return linear_runner(w, bias, out_features, x, amx)(x)


def linear_runner(w: PackedFloat, bias: torch.Tensor | None, out_features: int, x: torch.Tensor, amx: bool = False):
    """:func:`bsr_linear` for one layer's operands, checked once here with an input ``x [M, K]`` of the layer: a
    function of such inputs (``x``'s dtype and K) that checks only the input and makes two native calls (the product,
    then the rows holding NaN/inf), for a settled layer's plan (``accel.ops._plans``), where each Python step costs
    microseconds between a model's other ops."""
    bs = w.blocks.shape[2]
    k, dtype = x.shape[-1], x.dtype
    if amx and dtype != torch.bfloat16:
        raise ValueError(f"bsr_linear (native AMX): x must be bfloat16, got {dtype}")
    _float_operands(x, w, bias, k, k // bs, "bsr_linear")
    nbr = w.crow.numel() - 1
    if out_features > nbr * bs or bias is not None and bias.numel() != out_features:
        raise ValueError(f"bsr_linear (native): out_features {out_features} with {nbr} block rows of {bs}, bias "
                         f"{None if bias is None else tuple(bias.shape)}")
    fix = _lib("bsr_float").accel_nonfinite_rows
    kern = _lib("bsr_amx").accel_bsr_conv_amx if amx else _lib("bsr_float").accel_bsr_conv_float
    weights = (w.blocks.data_ptr(), w.crow.data_ptr(), w.col.data_ptr(), nbr, bs, None if bias is None else
               bias.data_ptr())
    bf16 = int(dtype == torch.bfloat16)
    n = out_features

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != dtype or x.dim() != 2 or x.shape[1] != k or x.device.type != "cpu":
            raise ValueError(f"bsr_linear (native): x {x.dtype} {tuple(x.shape)} on {x.device}: expected {dtype} "
                             f"[M, {k}] on the CPU")
        if x.stride(1) != 1 or x.stride(0) != k:
            x = x.contiguous()
        m = x.shape[0]
        y = torch.empty(m, n, dtype=dtype)
        if m and n:
            if amx:  # (the conv kernels over one image row of m pixels: a 1x1 conv)
                rc = kern(x.data_ptr(), 1, 1, m, k, 1, 1, 1, 1, 0, 0, 1, 1, 1, m, *weights, y.data_ptr(), n, n,
                          None, torch.get_num_threads())
            else:
                rc = kern(x.data_ptr(), bf16, 1, 1, m, k, 1, 1, 1, 0, 0, 1, 1, 1, m, *weights, y.data_ptr(), n, n, 0, 1,
                          None, 0, torch.get_num_threads())
            if rc != 0:
                raise RuntimeError(f"the block-sparse kernel refused its arguments (code {rc})")
            fix(x.data_ptr(), bf16, m, k, k, y.data_ptr(), bf16, n, n)
        return y

    run.operands = (w, bias)  # (alive while the function is)
    return run


def _check_float(lib) -> None:
    """The float kernel against PyTorch's conv (fp64) before first use: every block size, stride, padding and
    dilation, an empty block row, outputs not a multiple of the block, fp32 (and bf16 where the CPU has it)."""
    from ..formats import bsr_to_dense

    g = torch.Generator().manual_seed(0)
    dtypes = (torch.float32,) + ((torch.bfloat16,) if BF16_NEEDS in engines._cpu_flags() else ())
    for bs in BLOCKS:
        o, c, kh, kw = 2 * bs + 3, bs, 3, 2
        nbr, nbc = 3, kh * kw
        keep = torch.rand(nbr, nbc, generator=g) < 0.5
        keep[1] = False
        crow = torch.cat([torch.zeros(1, dtype=torch.int64), keep.sum(1).cumsum(0)])
        col = keep.nonzero()[:, 1].contiguous()
        values = torch.randn(col.numel(), bs, bs, generator=g)
        dense = bsr_to_dense(values.double(), crow, col, (nbr * bs, nbc * bs))[:o].view(o, kh, kw, c).permute(0, 3, 1, 2)
        bias = torch.randn(o, generator=g)
        x = torch.randn(2, c, 7, 6, generator=g)
        for dtype in dtypes:
            w = pack_float(values, crow, col, nbc, dtype)
            for stride, padding, dilation in (((1, 1), (1, 0), (1, 1)), ((2, 1), (0, 2), (1, 2))):
                xd = x.to(dtype)
                want = torch.nn.functional.conv2d(xd.double(), dense if dtype == torch.float32 else
                                                  dense.to(dtype).double(), bias.double(), stride, padding, dilation)
                xl = xd.contiguous(memory_format=torch.channels_last)  # (read in place: no layout copy inside the check)
                y = conv_runner(w, (o, c, kh, kw), bias, stride, padding, dilation, xl, "native", lib)(xl)[0]
                yn = conv_runner(w, (o, c, kh, kw), bias, stride, padding, dilation, xd, "native", lib)(xd)[0]  # NCHW
                if dtype == torch.float32:  # (and read in place)
                    yi = conv_runner(w, (o, c, kh, kw), bias, stride, padding, dilation, xd, "native_nchw", lib)(xd)[0]
                else:
                    yi = yn
                err = float((y.double() - want).abs().max() / want.abs().max())
                if not (err < (1e-5 if dtype == torch.float32 else 1e-2) and yn.is_contiguous() and torch.equal(yn, y)
                        and torch.equal(yi, y)):
                    raise RuntimeError(f"the {dtype} block-sparse conv (block {bs}, stride {stride}, padding {padding}, "
                                       f"dilation {dilation}) is off by {err:.2e} against PyTorch's conv")


# ------------------------------------------------------------------------------------------------ AMX (bsr_amx)
def bsr_conv2d_amx(x: torch.Tensor, w: PackedFloat, weight_shape, bias: torch.Tensor | None, stride, padding,
                   dilation, padded: bool = False) -> torch.Tensor:
    """:func:`bsr_conv2d` for bf16 on AMX tiles (``w`` packed for bf16): ``[N, O, OH, OW]`` channels_last bf16."""
    return bsr_conv2d_amx_scanned(x, w, weight_shape, bias, stride, padding, dilation, padded)[0]


def bsr_conv2d_amx_scanned(x: torch.Tensor, w: PackedFloat, weight_shape, bias: torch.Tensor | None, stride, padding,
                           dilation, padded: bool = False) -> tuple[torch.Tensor, bool]:
    """:func:`bsr_conv2d_amx` and whether ``x`` holds a NaN or an inf in the input rows its windows span (whole rows,
    from each output row's first tap row to its last; the caller then makes NaN the outputs of exactly the windows
    holding one, as the dense conv's): :func:`conv_runner`'s ``native_amx`` engine, or with ``padded``
    ``native_amx_padded``."""
    return conv_runner(w, weight_shape, bias, stride, padding, dilation, x,
                       "native_amx_padded" if padded else "native_amx")(x)


def _check_amx(lib) -> None:
    """The AMX kernel against PyTorch's conv (fp64) before first use: every block size, stride, dilation, output
    rows of 1, 7, 16, 17 and 40 pixels (partial tile groups), an empty block row, outputs not a multiple of 16."""
    from ..formats import bsr_to_dense

    g = torch.Generator().manual_seed(0)
    for bs in BLOCKS:
        o, c, kh, kw = 2 * bs + 5, bs, 3, 2
        nbr, nbc = 3, kh * kw
        keep = torch.rand(nbr, nbc, generator=g) < 0.5
        keep[1] = False
        keep[0, 0] = True
        crow = torch.cat([torch.zeros(1, dtype=torch.int64), keep.sum(1).cumsum(0)])
        col = keep.nonzero()[:, 1].contiguous()
        values = torch.randn(col.numel(), bs, bs, generator=g).bfloat16()
        dense = bsr_to_dense(values.double(), crow, col, (nbr * bs, nbc * bs))[:o].view(o, kh, kw, c).permute(0, 3, 1, 2)
        bias = torch.randn(o, generator=g)
        w = pack_float(values, crow, col, nbc, torch.bfloat16)
        for width, stride, padding, dilation in ((1, (1, 1), (1, 0), (1, 1)), (7, (1, 1), (1, 1), (1, 2)),
                                                 (16, (1, 1), (0, 0), (1, 1)), (17, (2, 1), (1, 0), (1, 1)),
                                                 (40, (1, 2), (0, 1), (2, 1))):
            x = torch.randn(2, c, 5, width + (kw - 1) * dilation[1], generator=g).bfloat16()
            want = torch.nn.functional.conv2d(x.double(), dense, bias.double(), stride, padding, dilation)
            xl = x.contiguous(memory_format=torch.channels_last)
            y = conv_runner(w, (o, c, kh, kw), bias, stride, padding, dilation, xl, "native_amx", lib)(xl)[0]
            err = float((y.double() - want).abs().max() / want.abs().max())
            if not err < 1e-2:
                raise RuntimeError(f"the AMX block-sparse conv (block {bs}, width {width}, stride {stride}, padding "
                                   f"{padding}, dilation {dilation}) is off by {err:.2e} against PyTorch's conv")


def _int8_conv_raw(lib, up, w: Packed, kw, stride, dilation, oh, ow, scale, w_scale, bias, y, nchw: bool = False) -> None:
    n, hp, wp, c = up.shape
    bs = w.blocks.shape[2]
    rc = lib.accel_int8_conv_amx(up.data_ptr(), n, hp, wp, c, kw, stride[0], stride[1], dilation[0], dilation[1], oh, ow,
                                 w.blocks.data_ptr(), w.crow.data_ptr(), w.col.data_ptr(), w.crow.numel() - 1, bs,
                                 w.comp.data_ptr(), scale.data_ptr(), w_scale.data_ptr(),
                                 None if bias is None else bias.data_ptr(), y.data_ptr(), int(y.dtype == torch.bfloat16),
                                 y.shape[1 if nchw else -1], y.shape[1 if nchw else -1], int(nchw),
                                 torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"the AMX int8 conv kernel refused its arguments (code {rc})")


def int8_conv2d_amx(up: torch.Tensor, w: Packed, weight_shape, scale: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None, stride, dilation, out_hw,
                    out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """accel's int8 conv on AMX tiles: ``up [N, Hp, Wp, C]`` uint8 the padded input quantized per image (integers
    + 128, the padding 128), ``w`` the int8 weight ``[O, KH*KW*C]`` ((kh, kw, c) order) packed by :func:`pack`,
    ``scale [N]``, ``w_scale [O]``, ``bias [O]`` fp32: ``[N, OH, OW, O]``, ``fma((acc - comp) * w_scale, scale,
    bias)`` in fp32 stored as ``out_dtype`` (fp32, or bf16 rounded once as ``Tensor.to`` rounds)."""
    o, c, kh, kw = weight_shape
    n, hp, wp, cu = up.shape
    bs = w.blocks.shape[2]
    oh, ow = out_hw
    vec = (scale, w_scale) + (() if bias is None else (bias,))
    ok = (up.dtype == torch.uint8 and up.is_contiguous() and cu == c and c % bs == 0 and
          w.crow.numel() - 1 == -(-o // bs) and w.width <= kh * kw * c and scale.numel() == n and
          w_scale.numel() == o and (bias is None or bias.numel() == o) and
          all(t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu" for t in vec) and
          up.device.type == "cpu" and out_dtype in (torch.float32, torch.bfloat16))
    fits = (oh >= 0 and ow >= 0 and (oh == 0 or hp >= (oh - 1) * stride[0] + (kh - 1) * dilation[0] + 1) and
            (ow == 0 or wp >= (ow - 1) * stride[1] + (kw - 1) * dilation[1] + 1))
    if not (ok and fits):
        raise ValueError(f"int8_conv2d (native AMX): up {up.dtype} {tuple(up.shape)}, weight {tuple(weight_shape)} "
                         f"in blocks of {bs}, scale {tuple(scale.shape)}, w_scale {tuple(w_scale.shape)}, bias "
                         f"{None if bias is None else tuple(bias.shape)}, output {out_hw} {out_dtype}, stride {stride}, "
                         f"dilation {dilation}")
    y = torch.empty(n, oh, ow, o, dtype=out_dtype)
    if y.numel():
        _int8_conv_raw(_lib("bsr_amx"), up, w, kw, stride, dilation, oh, ow, scale, w_scale, bias, y)
    return y


def int8_conv_runner(w: Packed, weight_shape, w_scale: torch.Tensor, bias: torch.Tensor | None, stride, padding,
                     dilation, qmax: int, dtype: torch.dtype, activation: str = "none",
                     static_scale: float | None = None):
    """:func:`quantize_images_padded` then :func:`int8_conv2d_amx` for one layer's operands, checked once here: a
    function of inputs ``x [N, C, H, W]`` in ``dtype`` (channels_last, or contiguous NCHW: read in place) making two
    native calls and returning ``[N, O, OH, OW]`` in ``dtype`` and ``x``'s layout (the kernel stores an NCHW result
    itself: no copy of a channels_last one), activated: for a settled layer's plan
    (``accel.ops._plans``), where each Python step costs microseconds between a model's other ops (the checked path
    cost ~0.1 ms more per call than its two kernels on 8x64x56x56). ``static_scale``: one activation scale (accel's
    static rule), else per image."""
    from ..quant import ACTIVATIONS, activate

    o, c, kh, kw = weight_shape
    bs = w.blocks.shape[2]
    nbr = w.crow.numel() - 1
    y_dtype = out_dtype(dtype, activation)
    vec = (w_scale,) + (() if bias is None else (bias,))
    _check_geometry(stride, padding, dilation)
    if not (dtype in _DTYPES and c % 16 == 0 and c % bs == 0 and nbr == -(-o // bs) and w.width <= kh * kw * c and
            w_scale.numel() == o and (bias is None or bias.numel() == o) and
            all(t.dtype == torch.float32 and t.dim() == 1 and t.is_contiguous() and t.device.type == "cpu" for t in vec)
            and isinstance(qmax, int) and 1 <= qmax <= 127 and activation in ACTIVATIONS):
        raise ValueError(f"int8_conv2d (native AMX): weight {tuple(weight_shape)} in {nbr} block rows of {bs}, w_scale "
                         f"{w_scale.dtype} {tuple(w_scale.shape)}, bias "
                         f"{None if bias is None else (bias.dtype, tuple(bias.shape))}, qmax {qmax}, activations {dtype}, "
                         f"activation {activation!r}")
    if not int8_amx_available():
        raise RuntimeError("int8_conv2d (native AMX): the AMX kernels are not available here (tiles, ACCEL_CPU_ISA, or "
                           "Linux's tile state)")
    (sh, sw), (ph, pw), (dh, dw) = tuple(stride), tuple(padding), tuple(dilation)
    quantize, conv = _lib().accel_quantize_images_padded, _lib("bsr_amx").accel_int8_conv_amx
    weights = (w.blocks.data_ptr(), w.crow.data_ptr(), w.col.data_ptr(), nbr, bs, w.comp.data_ptr())
    tail = (w_scale.data_ptr(), None if bias is None else bias.data_ptr())
    static = (0, 0.0) if static_scale is None else (1, float(static_scale))
    y_bf16 = int(y_dtype == torch.bfloat16)

    def run(x: torch.Tensor) -> torch.Tensor:
        cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)  # (else NCHW: y too, from the kernel)
        if x.dtype != dtype or x.dim() != 4 or x.shape[1] != c or x.device.type != "cpu" or \
                not (cl or x.is_contiguous()):
            raise ValueError(f"int8_conv2d (native AMX): x {x.dtype} {tuple(x.shape)} strides {x.stride()} on "
                             f"{x.device}: expected {dtype} [N, {c}, H, W], channels_last or contiguous, on the CPU")
        n, _, h, wd = x.shape
        oh, ow = _runner_out_hw("int8_conv2d (native AMX)", h, wd, kh, kw, sh, sw, ph, pw, dh, dw)
        y = torch.empty(n, oh, ow, o, dtype=y_dtype) if cl else torch.empty(n, o, oh, ow, dtype=y_dtype)
        if y.numel():
            hp, wp, threads = h + 2 * ph, wd + 2 * pw, torch.get_num_threads()
            up = scratch("native.up8", n * hp * wp * c, torch.uint8)
            scale = torch.empty(n, dtype=torch.float32)
            rc = quantize(x.data_ptr(), _DTYPES[dtype], int(not cl), n, h, wd, c, qmax, *static, up.data_ptr(), ph, pw,
                          scale.data_ptr(), threads)
            if rc != 0:
                raise RuntimeError(f"the quantization kernel refused its arguments or ran out of memory (code {rc})")
            rc = conv(up.data_ptr(), n, hp, wp, c, kw, sh, sw, dh, dw, oh, ow, *weights, scale.data_ptr(), *tail,
                      y.data_ptr(), y_bf16, o, o, int(not cl), threads)
            if rc != 0:
                raise RuntimeError(f"the AMX int8 conv kernel refused its arguments (code {rc})")
        if activation != "none":
            y = activate(y, activation, inplace=True)
        if cl:
            y = y.permute(0, 3, 1, 2)
        return y if y.dtype == dtype else y.to(dtype)  # (the layout kept)

    run.operands = (w, w_scale, bias)  # (alive while the function is)
    return run


def _check_amx_int8(lib) -> None:
    """The int8 conv against an exact integer conv (fp64) of the same integers (C = 128, block 64: sums kept in memory
    between stretches of the weight; 8 output rows: two groups of 4 rows per image)."""
    g = torch.Generator().manual_seed(1)
    for bs, c in ((16, 16), (32, 64), (64, 64), (64, 128)):
        o, kh, kw = 2 * bs + 5 if bs < 64 else 70, 3, 2
        wq = torch.randint(-127, 128, (o, c, kh, kw), generator=g, dtype=torch.int8)
        w2 = wq.permute(0, 2, 3, 1).reshape(o, kh * kw * c)
        nbr, nbc = -(-o // bs), kh * kw * c // bs
        wpad = torch.zeros(nbr * bs, nbc * bs, dtype=torch.int8)
        wpad[:o] = w2
        values = wpad.view(nbr, bs, nbc, bs).permute(0, 2, 1, 3).reshape(-1, bs, bs)
        w = pack(values, torch.arange(nbr + 1) * nbc, torch.arange(nbc).repeat(nbr))
        for width, stride, dilation in ((1, (1, 1), (1, 1)), (17, (2, 1), (1, 2)), (40, (1, 2), (2, 1))):
            q = torch.randint(-127, 128, (2, c, 10, width + (kw - 1) * dilation[1]), generator=g, dtype=torch.int8)
            want = torch.nn.functional.conv2d(q.double(), wq.double(), None, stride, 0, dilation)
            up = (q.permute(0, 2, 3, 1).contiguous().view(torch.uint8) ^ 0x80)
            s, ws = torch.ones(2), torch.ones(o)
            for out in (torch.float32, torch.bfloat16):
                y = torch.empty(2, want.shape[2], want.shape[3], o, dtype=out)
                _int8_conv_raw(lib, up, w, kw, stride, dilation, want.shape[2], want.shape[3], s, ws, None, y)
                yn = torch.empty(2, o, want.shape[2], want.shape[3], dtype=out)  # (the NCHW store)
                _int8_conv_raw(lib, up, w, kw, stride, dilation, want.shape[2], want.shape[3], s, ws, None, yn, True)
                if not (torch.equal(y.permute(0, 3, 1, 2), want.to(out)) and torch.equal(yn, want.to(out))):
                    raise RuntimeError(f"the AMX int8 conv (block {bs}, width {width}, stride {stride}, dilation "
                                       f"{dilation}, {out} output) differs from an exact integer conv")


def _check_bsr_amx(lib) -> None:
    _check_amx(lib)
    _check_amx_int8(lib)


_CHECKS = {"int8_bsr_vnni": _check_int8, "bsr_float": _check_float, "bsr_amx": _check_bsr_amx}
