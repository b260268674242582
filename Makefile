# Every target installs what it needs into .venv first, so each works on a bare machine.
# Choose the torch build with TORCH_SPEC / TORCH_INDEX, e.g. for CUDA:
#   make test TORCH_SPEC=torch==2.11.0 TORCH_INDEX="--index-url <your CUDA wheel index>"
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS      ?= dev
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
STAMP       := $(VENV)/.installed-$(EXTRAS)

# Ray's token auth writes ~/.ray/auth_token on first init; tests and demos run on loopback.
export RAY_AUTH_MODE ?= disabled
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-fast lint format bench bench-gpu mlflow-ui mlflow-server browser \
	kenlm-tools wordlists clean

# A shared tracking server: jobs log to it with MLFLOW_TRACKING_URI=http://<host>:<port>.
# Loopback unless told otherwise (MLFLOW_HOST=0.0.0.0 only behind an authenticating proxy).
MLFLOW_HOST      ?= 127.0.0.1
MLFLOW_PORT      ?= 5000
MLFLOW_BACKEND   ?= sqlite:///runs/mlflow-server.db
MLFLOW_ARTIFACTS ?= runs/mlflow-server-artifacts

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# pip compiles kenlm (the quality extra, in dev): a C++ compiler and cmake, with apt where root.
	@command -v g++ >/dev/null && command -v cmake >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { apt-get install -y -qq --no-install-recommends g++ cmake zlib1g-dev >/dev/null 2>&1 || \
	      { apt-get update -qq && apt-get install -y -qq --no-install-recommends g++ cmake zlib1g-dev; }; }; } || \
	  echo "no C++ compiler or cmake here: pip cannot build kenlm (the quality extra)"
	$(PIP) install --quiet --upgrade pip
	# torch first, from the chosen build; the project's `torch>=` range then keeps it.
	$(PIP) install --quiet "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(PIP) install --quiet -e ".[$(EXTRAS)]"
	touch $@

demo: $(STAMP)  ## corpus -> tokenizer -> 2 FSDP workers on local Ray -> MLflow -> samples
	$(PY) jobs/demo.py

# Two tiers over tests/ and the examples in platform/llamaray's docstrings (doctests).
# Tests that start a Ray cluster are marked `ray` (tests/conftest.py), slow ones `slow`.
DOCTESTS := $(PY) -m pytest platform/llamaray -q --doctest-modules

test-fast: $(STAMP) kenlm-tools wordlists  ## before every commit: no Ray cluster, nothing slow; and the doctests
	$(PY) -m pytest tests -q -m "not ray and not slow"
	$(DOCTESTS)

# The tests that start Ray clusters run beside the rest, which runs at idle CPU priority
# in the cycles the clusters leave unused (tests/run_suite.py says why and how).
test: $(STAMP) browser kenlm-tools wordlists  ## the whole suite, every tier, and the doctests (what CI runs)
	$(PY) tests/run_suite.py

# The MLflow UI test drives a headless Chromium; Debian's package, installed where this
# runs as root with apt (CI does). Elsewhere that one test is skipped, saying why.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	      { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; }; }; } || \
	  echo "chromium not installed: the MLflow UI browser test will be skipped"

# KenLM's lmplz and build_binary (`llamaray quality train lm`), built from the kenlm sdist on
# PyPI (the one the `quality` extra installs; it holds all of KenLM's source) into $(VENV)/bin:
# 29 s on 2 cores, download included. They need Boost, zlib, cmake and a C++ compiler,
# installed with apt where this runs as root (CI does). Elsewhere the tests that train a
# KenLM model are skipped, saying why.
KENLM_VERSION := 0.3.0
KENLM_DEPS    := libboost-program-options-dev libboost-system-dev libboost-thread-dev \
                 libboost-test-dev zlib1g-dev cmake g++
# (No prerequisite: `test` installs the venv first; cluster/Dockerfile runs it on the image's
# Python with VENV=/home/ray/anaconda3.)
kenlm-tools:
	@test -x $(VENV)/bin/lmplz && test -x $(VENV)/bin/build_binary || { \
	  { dpkg -s $(KENLM_DEPS) >/dev/null 2>&1 || \
	    { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	      { apt-get install -y -qq --no-install-recommends $(KENLM_DEPS) >/dev/null 2>&1 || \
	        { apt-get update -qq && apt-get install -y -qq --no-install-recommends $(KENLM_DEPS); }; }; }; } && \
	  tmp=$$(mktemp -d) && \
	  $(PIP) download --quiet --no-deps --no-binary kenlm --no-build-isolation \
	    kenlm==$(KENLM_VERSION) -d $$tmp && \
	  tar xzf $$tmp/kenlm-$(KENLM_VERSION).tar.gz -C $$tmp && \
	  cmake -S $$tmp/kenlm-$(KENLM_VERSION) -B $$tmp/build -DCMAKE_BUILD_TYPE=Release >/dev/null && \
	  { $(MAKE) --no-print-directory -C $$tmp/build -j2 lmplz build_binary >$$tmp/build.log 2>&1 || \
	    { tail -20 $$tmp/build.log; false; }; } && \
	  cp $$tmp/build/bin/lmplz $$tmp/build/bin/build_binary $(VENV)/bin/ && rm -rf $$tmp; } || \
	  echo "KenLM's lmplz could not be built: the tests that train a KenLM model will be skipped"

# Debian's word lists: the real vocabularies the language-id tests train on (tests/quality_text.py).
WORDLISTS := wamerican wfrench wngerman wspanish witalian
wordlists:
	@dpkg -s $(WORDLISTS) >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { apt-get install -y -qq --no-install-recommends $(WORDLISTS) >/dev/null 2>&1 || \
	      { apt-get update -qq && apt-get install -y -qq --no-install-recommends $(WORDLISTS); }; }; } || \
	  echo "word lists not installed: the language-id tests will be skipped"

lint: $(STAMP)  ## ruff, the import layering (pyproject's [tool.importlinter]), and no cluster file opening Ray's or MLflow's ports to the world
	$(VENV)/bin/ruff check platform jobs tests cluster
	$(VENV)/bin/ruff format --check platform jobs tests cluster
	$(VENV)/bin/lint-imports
	$(PY) cluster/lint_ports.py cluster/

format: $(STAMP)
	$(VENV)/bin/ruff check --fix platform jobs tests cluster
	$(VENV)/bin/ruff format platform jobs tests cluster

bench: $(STAMP)  ## training step vs HF (eager and compiled), the matmul peak and the kernel floor, tokenizer, tokenize+pack on Ray, Ray Train vs torchrun, report cadence, checkpoint stall, stream; figures in docs/benchmarks.md
	$(PY) -m llamaray.bench.train_step --compile
	$(PY) -m llamaray.bench.tokenizer_throughput
	$(PY) -m llamaray.bench.tokenize_pack
	$(PY) -m llamaray.bench.ray_overhead
	$(PY) -m llamaray.bench.report_cadence
	$(PY) -m llamaray.bench.checkpoint_stall --s3
	$(PY) -m llamaray.bench.stream

# A bare GPU box without the venv runs the same script: PYTHONPATH=platform python -m llamaray.bench.gpu
bench-gpu: $(STAMP)  ## one GPU: tokens/s, MFU and checkpoint stall of the 1b preset at seq 2048 in bf16 (BENCH_GPU_ARGS="--compile")
	PYTHONPATH=platform $(PY) -m llamaray.bench.gpu $(BENCH_GPU_ARGS)

mlflow-ui: $(STAMP)  ## the local tracking store of runs under runs/ (make demo's)
	@echo "MLflow UI at http://127.0.0.1:5000: open the link a run printed, or choose 'Model training' at the top of the sidebar (the browser keeps the choice)"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///runs/mlflow.db \
		--default-artifact-root runs/mlartifacts --host 127.0.0.1 --port 5000

mlflow-server: $(STAMP)  ## tracking server: SQLite or PostgreSQL backend, local or s3:// artifacts
	mkdir -p runs
	$(VENV)/bin/mlflow server --backend-store-uri "$(MLFLOW_BACKEND)" \
		--artifacts-destination "$(MLFLOW_ARTIFACTS)" --serve-artifacts \
		--host $(MLFLOW_HOST) --port $(MLFLOW_PORT)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
