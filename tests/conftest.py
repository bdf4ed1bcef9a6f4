"""Test configuration.

``TRITON_INTERPRET=1`` is set here, before anything imports triton, so the Triton kernels run on
CPU tensors through Triton's interpreter (``@triton.jit`` reads the flag when it is applied). The
ahead-of-time compile tests run ``accel.kernels.aot`` in a subprocess with the flag removed.
Set ``ACCEL_TEST_NO_INTERPRET=1`` to run the suite against real Triton (on a GPU machine).

Engine decisions (``accel.engines``): the suite does not measure (``ACCEL_ENGINE_MEASURE=0``, so
every call takes the documented default and results do not depend on how busy the machine is)
and keeps its cache in a temporary directory, emptied before every test (a decision one test measured
never decides another's); the engine tests turn measuring on themselves.
"""

import os
import tempfile

if os.environ.get("ACCEL_TEST_NO_INTERPRET", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["ACCEL_ENGINE_MEASURE"] = "0"
os.environ["ACCEL_CACHE_DIR"] = tempfile.mkdtemp(prefix="accel-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def measuring(monkeypatch, accel_env):
    """Engine decisions measured for real (the suite's default is to take the unmeasured defaults), with a small
    budget, and never refused as "busy": the suite may share the machine, and these tests check choices."""
    from accel import engines

    accel_env(ACCEL_ENGINE_MEASURE="1")
    monkeypatch.setattr(engines, "BUDGET_S", 0.02)
    monkeypatch.setattr(engines, "MIN_ROUNDS", 2)
    monkeypatch.setattr(engines, "_contended", lambda mark=None: False)
    engines.clear(disk=True)
    yield
    engines.clear(disk=True)


@pytest.fixture(autouse=True)
def _fresh_engine_cache():
    from accel import engines

    engines.clear(disk=True)
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


@pytest.fixture
def accel_env(monkeypatch):
    """``accel_env(NAME=value, OTHER=None)`` sets (None: unsets) accel's environment variables for the
    test and makes accel read them again (it reads them once, as oneDNN does); undone afterwards."""
    from accel import engines

    def set_vars(**values):
        for k, v in values.items():
            if v is None:
                monkeypatch.delenv(k, raising=False)
            else:
                monkeypatch.setenv(k, str(v))
        engines.reload_env()

    yield set_vars
    monkeypatch.undo()
    engines.reload_env()


@pytest.fixture
def accel_log():
    """The messages accel logs (logger ``accel``, warnings and above) during the test."""
    import logging

    class Logged(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    handler = Logged()
    logging.getLogger("accel").addHandler(handler)
    yield handler.messages
    logging.getLogger("accel").removeHandler(handler)
