# Sourced by the device checks: wheels the GPU image lacks (.whl/, docs/performance.md), the repo on
# PYTHONPATH, $OUT/log.txt, and `card` / `stamp` / `speed` helpers (the last two log with elapsed seconds).
set -uo pipefail
OUT=${OUT:-results/device}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
t0=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)" | tee -a "$LOG"; }
speed() {  # stage timeout args...: one benchmarks.speed call, its rows under $OUT/<stage>/speed.csv
  local stage=$1 limit=$2; shift 2
  stamp "speed $stage: $*"
  timeout "$limit" python3 -m benchmarks.speed "$@" out="$OUT/$stage" 2>&1 | tee -a "$LOG" | grep -v "^|"
}
card() {  # the card, driver, torch and triton versions, on stdout and in the log
  { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
      torch.cuda.get_device_name())"
  } 2>&1 | tee -a "$LOG"
}
