#!/usr/bin/env bash
# One-shot GPU run, meant to take under 8 minutes in all, in this order (each step's results
# are written as soon as it ends, so a run cut short keeps what it finished):
#   1. the GPU-only tests (tests/logit/test_runner_cuda.py: capture, captured == eager in float32,
#      identical bf16 greedy tokens over 64 steps, no host sync in a replayed step): gpu-tests.txt
#   2. the engine alone, eager vs captured CUDA graphs, N = 1, 4, 16, 32, beside the
#      memory-bandwidth bound, for the demo base-large and a real 1B shape (random weights built
#      here from bench/real-shapes/*.json by eftmesh_lab.real_shapes): engine-gpu.json
#   3. the concurrency benchmark on the demo family (N = 1, 4, 16, 32, cuda, bfloat16; no fixed-k
#      runs, 16 Poisson requests): load-gpu.json, load-gpu.png
#   4. the same on the real-shape family (1B base-large, SmolLM2-135M-shaped small roles; no fixed-k
#      runs, 16 Poisson requests): load-gpu-real.json, load-gpu-real.png
#   5. every figure above against issue 15's targets, one table (eftmesh_lab.gpu_targets): gpu-targets.json
#   6. the one-step profile (bench/gpu_profile.py): gpu-profile.txt (PROFILE=0 skips it)
#   7. --torch-compile, in whatever time is left: the compiled GPU test (compiled, then captured,
#      == eager in float32), gpu-tests-compile.txt; then the engine alone with its captured steps
#      compiled, engine-gpu-compile.json
# Results go to RESULTS_DIR (default bench/). Extra arguments go to both concurrency benchmarks
# (e.g. --reps 1). PY picks the interpreter (default .venv's, made with `make install` when
# missing); with another one, eftmesh and the lab are found under services/ and tools/lab/.
# REAL=0 skips the real-shape family (steps 2b and 4).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
if [[ $PY == .venv/bin/python && ! -x $PY ]]; then
  echo "+ make install (no .venv yet)"
  make install
fi
OUTDIR=${RESULTS_DIR:-bench}
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD/services:$PWD/tools/lab${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

echo "+ $PY -c 'import torch; ...'  # the GPU this runs on"
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__, torch.cuda.get_device_name(0))'

start=$SECONDS
run() { echo "+ $*"; "$@"; }

# the --torch-compile test (a compile takes tens of seconds) runs last, in whatever time is left
run "$PY" -m pytest -q -p no:cacheprovider tests/logit/test_runner_cuda.py -k "not compiled" 2>&1 | tee "$OUTDIR/gpu-tests.txt" | tail -n 15 || true

engine_models=(--model models/demo/base-large)
if [[ ${REAL:-1} != 0 ]]; then
  # a failed build leaves the demo family's runs: the real shape's are then skipped, not failed
  if run "$PY" -m eftmesh_lab.real_shapes --out build/real-shapes --device cuda --dtype bfloat16; then
    engine_models+=(--model build/real-shapes/base-large)
  else
    echo "  real_shapes failed: the real-shape runs are skipped"
    REAL=0
  fi
fi
run "$PY" -m eftmesh_lab.bench_engine "${engine_models[@]}" --device cuda --dtype bfloat16 \
  --concurrency 1,4,16,32 --out "$OUTDIR/engine-gpu.json" || true
echo "  ($((SECONDS - start)) s so far)"

# no fixed-k runs and a short Poisson run here too: the lease is 15 minutes, device start included
run "$PY" -m eftmesh_lab.bench_load --device cuda --dtype bfloat16 --concurrency 1,4,16,32 \
  --systems lockstep,hf-generate,mesh-plain,mesh-adaptive --poisson-requests 16 \
  --out "$OUTDIR/load-gpu.json" --plot "$OUTDIR/load-gpu.png" "$@" || true
echo "  ($((SECONDS - start)) s so far)"

if [[ ${REAL:-1} != 0 ]]; then
  # trimmed to what the targets need (no fixed-k runs, a short Poisson run): the 1B shape's
  # processes take longest to start, and the run must fit the device's lease
  run "$PY" -m eftmesh_lab.bench_load --models build/real-shapes --device cuda --dtype bfloat16 \
    --concurrency 1,4,16,32 --port 50350 --systems lockstep,hf-generate,mesh-plain,mesh-adaptive \
    --poisson-requests 16 --out "$OUTDIR/load-gpu-real.json" --plot "$OUTDIR/load-gpu-real.png" "$@" || true
  echo "  ($((SECONDS - start)) s so far)"
fi

# the figures so far against issue 15's targets, one table (reads the JSON above; no GPU, instant)
run "$PY" -m eftmesh_lab.gpu_targets --results "$OUTDIR" || true

if [[ ${PROFILE:-1} != 0 ]]; then
  run "$PY" bench/gpu_profile.py --device cuda --out "$OUTDIR/gpu-profile.txt" | tail -n 40 || true
fi
# --torch-compile on the GPU, in whatever time is left: the compiled GPU test (correctness first),
# then the engine alone with its captured steps compiled (against engine-gpu.json's captured ones)
run "$PY" -m pytest -q -p no:cacheprovider tests/logit/test_runner_cuda.py -k "compiled" 2>&1 | tee "$OUTDIR/gpu-tests-compile.txt" | tail -n 15 || true
echo "  ($((SECONDS - start)) s so far)"
run "$PY" -m eftmesh_lab.bench_engine "${engine_models[@]}" --device cuda --dtype bfloat16 \
  --concurrency 1,4,16,32 --torch-compile only --out "$OUTDIR/engine-gpu-compile.json" || true
echo "done in $((SECONDS - start)) s: results in $OUTDIR/"
