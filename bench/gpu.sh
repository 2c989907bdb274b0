#!/usr/bin/env bash
# One-shot GPU run: the concurrency benchmark (every system at N = 1, 4, 16, 32 on cuda in
# bfloat16) and the one-step profile (bench/gpu_profile.py), meant to take under 8 minutes in
# all. Results go to RESULTS_DIR (default bench/): load-gpu.json, load-gpu.png, gpu-profile.txt.
# Extra arguments go to the concurrency benchmark (e.g. --reps 1). PY picks the interpreter
# (default .venv's, made with `make install` when missing); with another one, eftmesh and the
# lab are found under services/ and tools/lab/. PROFILE=0 skips the profile.
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
if [[ ${PROFILE:-1} != 0 ]]; then
  cmd=("$PY" bench/gpu_profile.py --device cuda --out "$OUTDIR/gpu-profile.txt")
  echo "+ ${cmd[*]}"
  "${cmd[@]}" | tail -n 40
fi
cmd=("$PY" -m eftmesh_lab.bench_load --device cuda --dtype bfloat16 --concurrency 1,4,16,32
     --out "$OUTDIR/load-gpu.json" --plot "$OUTDIR/load-gpu.png" "$@")
echo "+ ${cmd[*]}"
"${cmd[@]}"
echo "done in $((SECONDS - start)) s: results in $OUTDIR/ (load-gpu.json, load-gpu.png, gpu-profile.txt)"
