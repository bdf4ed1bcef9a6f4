"""Test configuration.

``TRITON_INTERPRET=1`` is set here, before anything imports triton, so the Triton kernels run on
CPU tensors through Triton's interpreter (``@triton.jit`` reads the flag when it is applied). The
ahead-of-time compile tests run ``accel.kernels.aot`` in a subprocess with the flag removed.
Set ``ACCEL_TEST_NO_INTERPRET=1`` to run the suite against real Triton (on a GPU machine).
"""

import os

if os.environ.get("ACCEL_TEST_NO_INTERPRET", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def poison_empty(monkeypatch):
    """Make ``torch.empty`` return NaN-filled floats (and a sentinel in integers) for the test's duration,
    so a kernel that leaves part of its output unwritten fails the comparison (FLA's poison fixture)."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(-123456789)
        return t

    monkeypatch.setattr(torch, "empty", empty)
    yield
