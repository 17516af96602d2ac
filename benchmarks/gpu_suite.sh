#!/usr/bin/env bash
# GPU suite: kernel tests on CUDA, correctness against HF, kernel and throughput benchmarks.
# Usage: benchmarks/gpu_suite.sh OUTDIR [STEP ...]
#   steps (default: all, in this order): tests parity kernels hf W-8B W-nano W-prefix W-pressure
#   (also: profile = step_profile.py per shape, timeline = step_profile.py --workload W-hf, W-hf,
#   multi-gpu = benchmarks/multi_gpu.py over every layout that fits the visible GPUs, or
#   multi-gpu-<layouts> for some of them, e.g. multi-gpu-W-8B, multi-gpu-W-70B, to split a long run)
# Old code against new, side by side: benchmarks/ab.py (not a step: it needs the old tree).
# Each step writes OUTDIR/<step>.log (and a JSON where it has figures); a short table comes last.
# At the end the JSONs are merged into OUTDIR/all_results.json and everything is packed into
# OUTDIR/bundle.tgz (two files: the device tool returns at most eight).
# Steps are independent, so a long suite can be split over several runs into the same OUTDIR.
set -u
OUT=${1:?usage: benchmarks/gpu_suite.sh OUTDIR [STEP ...]}
shift
STEPS=${*:-tests parity kernels hf W-8B W-nano W-prefix W-pressure}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1
unset TRITON_INTERPRET
PY=${PYTHON:-python}
status=0

run_step() {  # name, command...
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  if "$@" >"$OUT/$name.log" 2>&1; then
    echo "   ok ($((SECONDS - t0)) s)"
  else
    echo "   FAILED ($((SECONDS - t0)) s): tail of $OUT/$name.log"; tail -n 15 "$OUT/$name.log"; status=1
  fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/device.txt" 2>&1
for step in $STEPS; do
  case $step in
    tests)   run_step tests $PY -m pytest tests/kernels -q -rs ;;
    parity)  run_step parity $PY -m pytest tests/gpu -q -s -rs -m gpu
             # each case prints "PARITY {json}": collect them for the table and all_results.json
             grep -o 'PARITY {.*}' "$OUT/parity.log" | cut -c8- | $PY -c \
               'import json, sys; print(json.dumps({"results": [json.loads(l) for l in sys.stdin]}, indent=1))' \
               > "$OUT/parity.json" ;;
    kernels) run_step kernels $PY benchmarks/kernel_tune.py --case overview --json "$OUT/kernels.json" ;;
    profile) run_step profile $PY benchmarks/step_profile.py --json "$OUT/profile.json" ;;
    timeline) run_step timeline $PY benchmarks/step_profile.py --workload W-hf --json "$OUT/timeline.json" ;;
    hf)      run_step W-hf-side-by-side $PY benchmarks/hf_side_by_side.py --json "$OUT/W-hf-side-by-side.json" ;;
    W-*)     run_step "$step" $PY benchmarks/throughput.py --workload "$step" --json "$OUT/$step.json" ;;
    multi-gpu) run_step multi-gpu $PY benchmarks/multi_gpu.py --json "$OUT/multi-gpu.json" ;;
    multi-gpu-*) run_step "$step" $PY benchmarks/multi_gpu.py --layouts "${step#multi-gpu-}" --json "$OUT/$step.json" ;;
    *)       echo "unknown step $step (tests parity kernels profile timeline hf W-8B W-nano W-hf W-prefix W-pressure multi-gpu multi-gpu-<layouts>)"; status=1 ;;
  esac
done
for log in tests parity; do
  grep -E "passed|failed|error|skipped" "$OUT/$log.log" 2>/dev/null | tail -n 1 | sed "s/^/$log: /"
done
for log in "$OUT"/multi-gpu*.log; do  # multi_gpu.py ends with its own table (layouts, efficiency, targets)
  [ -f "$log" ] && sed -n '/^== multi-gpu ==/,$p' "$log"
done
$PY benchmarks/summarize.py "$OUT"
# Only a few files come back from the GPU machine: merge every JSON into all_results.json and
# pack everything (logs included) into bundle.tgz; the loose files are removed unless KEEP_RAW=1.
$PY - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
merged = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != "all_results.json"}
(out / "all_results.json").write_text(json.dumps(merged, indent=2))
PYEOF
(cd "$OUT" && tar czf bundle.tgz --exclude bundle.tgz --exclude all_results.json . 2>/dev/null)
if [ "${KEEP_RAW:-0}" != 1 ]; then
  find "$OUT" -maxdepth 1 -type f ! -name bundle.tgz ! -name all_results.json -delete
fi
exit $status
