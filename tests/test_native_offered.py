"""Where the CPU, accel's ISA view and a compiler allow a native kernel, it must be offered: a kernel that fails to
build or fails its check before first use is switched off with one warning (the other strategies serve users), which
would otherwise only skip tests/test_native.py. This file has no such skip."""

import ctypes
import platform

import pytest
import torch

from accel import engines
from accel.cpu import native


def linux_grants_amx() -> bool:
    """Whether Linux gives this process the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA):
    without it the AMX kernels are rightly off."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(158, 0x1023, 18) == 0  # (SYS_arch_prctl on x86_64)


@pytest.mark.parametrize("name, available", [
    ("int8_bsr_vnni", native.int8_available),
    ("bsr_float", lambda: native.float_available(torch.float32)),
    ("bsr_amx", native.amx_available),
])
def test_allowed_kernels_build_and_pass_their_checks(name, available):
    why = native._allowed(name)
    if why is not None:
        pytest.skip(f"{name} not allowed here: {why}")
    if name == "bsr_amx" and not linux_grants_amx():
        pytest.skip("Linux refuses the AMX tile state here")
    assert available(), f"{name} is allowed here but failed to build or failed its check (see the 'accel' log)"


def test_amx_int8_product_where_allowed():
    if native._allowed("int8_bsr_vnni") is not None or engines.cpu_isa() != "amx" or \
            not all(f in engines._cpu_flags() for f in native.AMX_INT8_NEEDS) or not linux_grants_amx():
        pytest.skip("no AMX int8 here")
    assert native.int8_amx_available()
