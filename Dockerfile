# The one eftmesh image: `eftmesh logit ...`, `eftmesh combiner ...` and `eftmesh generate ...`
# (the Helm chart runs all three from it). It carries the shipped demo family under
# /app/models/demo; mount real checkpoints over /app/models (chart value models.volume).
#
#   docker build -t eftmesh:0.1.0 .                                   # CUDA 12.8 torch wheels
#   docker build -t eftmesh:0.1.0-cpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
ARG PYTHON=3.11

FROM python:${PYTHON}-slim AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services services
RUN pip install --no-cache-dir --prefix=/install --extra-index-url "${TORCH_INDEX}" .

FROM python:${PYTHON}-slim
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HF_HOME=/tmp/hf HF_HUB_OFFLINE=1
COPY --from=build /install /usr/local
COPY models/demo /app/models/demo
WORKDIR /app
USER 10001:10001
EXPOSE 50050 50051
ENTRYPOINT ["eftmesh"]
CMD ["--help"]
