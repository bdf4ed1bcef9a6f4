"""pytest-benchmark suite for int8 Linear (CPU, or CUDA when present).

    pytest bench/test_int8_bench.py --benchmark-only --benchmark-group-by=group

One group per batch size M of a 4096x4096 layer, one benchmark per provider: fp32 (fp16 on CUDA),
bf16, accel int8 dynamic, accel int8 weight-only and torch's dynamic int8 Linear (CPU). The
side-by-side ratios of record come from ``python -m bench.int8_microbench``.
"""

import warnings

import pytest
import torch
import torch.nn as nn

from accel import QuantLinear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BASE = torch.float16 if DEVICE == "cuda" else torch.float32
PROVIDERS = ["float", "bf16", "int8_dynamic", "int8_weight_only"] + (["torch_dynamic_int8"] if DEVICE == "cpu" else [])
_MODELS = {}


def _models():
    if not _MODELS:
        torch.manual_seed(0)
        lin = nn.Linear(4096, 4096)
        _MODELS["float"] = nn.Linear(4096, 4096).to(DEVICE, BASE)
        _MODELS["float"].load_state_dict(lin.state_dict())
        _MODELS["bf16"] = nn.Linear(4096, 4096).to(DEVICE, torch.bfloat16)
        _MODELS["bf16"].load_state_dict(lin.state_dict())
        _MODELS["int8_dynamic"] = QuantLinear.from_float(lin.to(DEVICE), "dynamic")
        _MODELS["int8_weight_only"] = QuantLinear.from_float(lin.to(DEVICE), "weight_only")
        if DEVICE == "cpu":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _MODELS["torch_dynamic_int8"] = torch.ao.quantization.quantize_dynamic(
                    nn.Sequential(lin.cpu()), {nn.Linear}, dtype=torch.qint8)
    return _MODELS


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("m", [1, 16, 256])
def test_linear_4096(benchmark, m, provider):
    model = _models()[provider]
    dtype = torch.bfloat16 if provider == "bf16" else (BASE if provider == "float" else torch.float32)
    x = torch.randn(m, 4096, device=DEVICE, dtype=dtype)

    def fn():
        model(x)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"linear 4096x4096 M={m}"
    benchmark.extra_info.update(device=DEVICE, provider=provider)
    with torch.no_grad():
        benchmark(fn)
