"""pytest-benchmark suite for the block-sparse linear (CPU, or CUDA when present).

    pytest bench/test_bsr_bench.py --benchmark-only --benchmark-group-by=group

Each group is one (density, M) cell of a 4096x4096, block-32 layer, with one benchmark per
provider: dense fp32, dense bf16, torch BSR and accel. pytest-benchmark runs providers one after
the other (warm caches); the side-by-side ratios of record come from ``python -m bench.bsr_microbench``.
"""

import pytest
import torch

from bench.bsr_microbench import cpu_providers, cuda_providers, random_bsr

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
PROVIDERS = ["dense_fp16", "dense_bf16", "torch_bsr", "accel"] if DEVICE == "cuda" else [
    "dense_fp32", "dense_bf16", "torch_bsr", "accel"]
_WEIGHTS = {}


def _weights(density):
    if density not in _WEIGHTS:
        _WEIGHTS[density] = random_bsr(4096, 4096, 32, density, DTYPE, DEVICE)
    return _WEIGHTS[density]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("m", [1, 16, 256])
@pytest.mark.parametrize("density", [0.5, 0.25, 0.1, 0.05])
def test_bsr_linear(benchmark, density, m, provider):
    bsr = _weights(density)
    x = torch.randn(m, 4096, dtype=DTYPE, device=DEVICE)
    fns = cuda_providers(bsr, x) if DEVICE == "cuda" else cpu_providers(bsr, x, strategies=False)
    fn = fns[provider]
    if DEVICE == "cuda":
        inner = fn

        def fn():
            inner()
            torch.cuda.synchronize()

    benchmark.group = f"bsr density={density} M={m}"
    benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE), n=4096, k=4096, block=32)
    with torch.no_grad():
        benchmark(fn)
