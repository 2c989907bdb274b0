# syntax=docker/dockerfile:1
# eftmesh images: `eftmesh logit ...`, `eftmesh combiner ...` and `eftmesh generate ...` (the Helm
# chart runs all three). Two targets from one source:
#
#   docker build --target cuda -t ghcr.io/eftmesh/eftmesh:0.1.0 .       # CUDA torch: GPU logit services
#   docker build --target cpu  -t ghcr.io/eftmesh/eftmesh:0.1.0-cpu .   # CPU-only torch (~5x smaller): the combiner, CPU logit services
#
# Both carry the shipped demo family under /app/models/demo. Real checkpoints come from volumes
# (see docs/deployment.md). Dependencies are installed from pyproject.toml before the source is
# copied, so a source change rebuilds only the last, small layers.
ARG PYTHON=3.11

# --- the dependency list, read from pyproject.toml alone ------------------------------------------
FROM python:${PYTHON}-slim AS requirements
WORKDIR /src
COPY pyproject.toml ./
# The project's pinned dependencies plus the extras named in EXTRAS (comma-separated): by default
# `real-models` (gguf: serving .gguf files). The lab's own dependencies (tools/lab/pyproject.toml:
# matplotlib, tqdm) are never read.
ARG EXTRAS=real-models
RUN python - <<'PY'
import os, tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = list(p["dependencies"])
for extra in filter(None, os.environ.get("EXTRAS", "").split(",")):
    deps += p["optional-dependencies"][extra]
open("/src/requirements.txt", "w").write("\n".join(deps) + "\n")
PY

# --- dependencies, one layer per torch flavour -----------------------------------------------------
FROM python:${PYTHON}-slim AS deps-cpu
COPY --from=requirements /src/requirements.txt /tmp/requirements.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --prefix=/install --extra-index-url https://download.pytorch.org/whl/cpu -r /tmp/requirements.txt

FROM python:${PYTHON}-slim AS deps-cuda
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
COPY --from=requirements /src/requirements.txt /tmp/requirements.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --prefix=/install --extra-index-url "${TORCH_INDEX}" -r /tmp/requirements.txt

# --- the eftmesh package itself (no dependencies: they are above) ----------------------------------
# Only services/ (the serving package `eftmesh`): the lab in tools/lab (demo training, benchmarks,
# load runner: distribution eftmesh-lab) is never copied, so the images cannot run or import it.
FROM python:${PYTHON}-slim AS app
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services services
RUN pip install --no-cache-dir --no-deps --prefix=/install .

# --- runtime images ----------------------------------------------------------------------------------
FROM python:${PYTHON}-slim AS runtime-base
# NUMBA_CACHE_DIR: the sampler's compiled kernels (core/fused.py) are written there at the first
# start and loaded from it by a restarted container (~0.3 s instead of ~3.6 s compiling). The
# chart's /tmp is a pod-lived emptyDir, so a crash or liveness restart finds it; a new pod compiles.
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HF_HOME=/tmp/hf HF_HUB_OFFLINE=1 \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor TRITON_CACHE_DIR=/tmp/triton NUMBA_CACHE_DIR=/tmp/numba-cache
WORKDIR /app
# A C++ compiler for --torch-compile: inductor writes C++ for a CPU step, and Triton builds its
# GPU launcher with one (vLLM's images carry one too). Without it a compile fails, is logged,
# and steps run uncompiled.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 eftmesh && useradd --system --uid 10001 --gid 10001 --no-create-home eftmesh
EXPOSE 50050 50051 8000 9464

FROM runtime-base AS cpu
COPY --from=deps-cpu /install /usr/local
COPY --from=app /install /usr/local
COPY models/demo /app/models/demo
USER 10001:10001
HEALTHCHECK NONE
ENTRYPOINT ["eftmesh"]
CMD ["--help"]

# The last stage is the default target: the CUDA image.
FROM runtime-base AS cuda
COPY --from=deps-cuda /install /usr/local
COPY --from=app /install /usr/local
COPY models/demo /app/models/demo
USER 10001:10001
HEALTHCHECK NONE
ENTRYPOINT ["eftmesh"]
CMD ["--help"]
