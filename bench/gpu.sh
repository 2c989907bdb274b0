#!/usr/bin/env bash
# One-shot GPU run of the concurrency benchmark (issue 8): every system at N = 1, 4, 16, 32 on
# cuda in bfloat16, results to bench/load-gpu.json and bench/load-gpu.png; meant to take under
# 8 minutes. Extra arguments go to the benchmark. PY picks the interpreter (default .venv's,
# made with `make install` when missing); with another one, eftmesh is found under services/ and
# the lab (eftmesh_lab, which holds the benchmark) under tools/lab/.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
if [[ $PY == .venv/bin/python && ! -x $PY ]]; then
  echo "+ make install (no .venv yet)"
  make install
fi
export PYTHONPATH="$PWD/services:$PWD/tools/lab${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

echo "+ $PY -c 'import torch; ...'  # the GPU this runs on"
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__, torch.cuda.get_device_name(0))'

cmd=("$PY" -m eftmesh_lab.bench_load --device cuda --dtype bfloat16 --concurrency 1,4,16,32
     --out bench/load-gpu.json --plot bench/load-gpu.png "$@")
echo "+ ${cmd[*]}"
start=$SECONDS
"${cmd[@]}"
echo "done in $((SECONDS - start)) s: bench/load-gpu.json, bench/load-gpu.png"
