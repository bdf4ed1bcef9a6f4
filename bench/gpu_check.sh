#!/usr/bin/env bash
# A GPU session's whole check, as one command for the device tool (repository root, a bare CUDA machine
# with torch and triton installed and no network):
#   install accel without touching torch/triton; record the GPU, driver and versions; run the Triton
#   kernel tests on the device (ACCEL_TEST_NO_INTERPRET=1); run `python -m bench.gpu_suite`.
# Logs and the suite's JSON go to $OUT (the device tool brings that folder back).
#
#   bash bench/gpu_check.sh [SUITE_BUDGET_S=250] [TEST_S=150] [suite args...]   (0 skips that step)
#   TESTS_K='not every' (default) selects the tests; TESTS_K='' runs the per-config sweeps too;
#   TEST_FILES picks the test files (default: the four Triton kernel files); PROFILE_S=60 also runs
#   bench.gpu_host_profile (host time per launch, cProfile) into $OUT/host_profile.txt.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
SUITE_BUDGET=${1:-250}
TEST_S=${2:-150}
shift $(( $# < 2 ? $# : 2 ))
export PYTHONUNBUFFERED=1
PY=python3
{
  date -u; nvidia-smi; nproc
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1
grep -E "Driver Version|torch |H100|H200" "$OUT/env.txt" | head -5
$PY -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { echo "INSTALL FAILED"; tail -20 "$OUT/install.log"; }
t0=$SECONDS
if [ "$TEST_S" -gt 0 ]; then
  ACCEL_TEST_NO_INTERPRET=1 timeout "$TEST_S" $PY -m pytest -v -p no:cacheprovider -rfE --timeout 90 \
    --durations=12 ${TEST_FILES:-tests/test_triton_launch.py tests/test_int8_triton.py tests/test_bsr_triton.py tests/test_int8_bsr_triton.py tests/test_bsr_conv_triton.py} \
    -k "${TESTS_K-not every}" > "$OUT/pytest.log" 2>&1
  echo "pytest rc=$? in $((SECONDS - t0)) s"
  grep -E "(FAILED|ERROR)( |$)| passed| failed|Timeout" "$OUT/pytest.log" | cut -c1-300 | tail -40
fi
if [ "${PROFILE_S:-0}" -gt 0 ]; then
  timeout "$PROFILE_S" $PY -m bench.gpu_host_profile --out "$OUT/host_profile.txt" > /dev/null 2>&1
  echo "host profile rc=$?"; tail -8 "$OUT/host_profile.txt" 2>/dev/null
fi
if [ "$SUITE_BUDGET" -gt 0 ]; then
  t0=$SECONDS
  timeout $((SUITE_BUDGET + 60)) $PY -m bench.gpu_suite --budget-s "$SUITE_BUDGET" "$@" > "$OUT/suite.log" 2>&1
  echo "suite rc=$? in $((SECONDS - t0)) s"
  cp bench/results/*-cuda*.json "$OUT/" 2>/dev/null
  grep -E "^\[|Error|error" "$OUT/suite.log" | cut -c1-220 | tail -70
fi
