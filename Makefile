# `make repro` and `make test` do all set-up on a fresh machine (Python 3.11 or 3.12).
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
# Where no NVIDIA GPU is present, install the CPU builds (no multi-GB CUDA wheels).
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
EXTRA := $(if $(HAS_GPU),gpu,cpu)
# PyTorch's CPU wheel index, used only when it answers (offline mirrors serve the CPU build by name).
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu

.PHONY: setup repro test postgres-server gpu-test ui server plots clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if [ -z "$(HAS_GPU)" ]; then \
	  idx=""; if curl -fsS -m 5 -o /dev/null $(TORCH_CPU_INDEX)/torch/ 2>/dev/null; then idx="--extra-index-url $(TORCH_CPU_INDEX)"; fi; \
	  echo "no GPU: installing the CPU build of torch 2.13.0 $$idx"; \
	  $(BIN)/python -m pip install -q $$idx "torch==2.13.0"; \
	fi
	$(BIN)/python -m pip install -q -e ".[$(EXTRA),dev]"
	touch $@

# The whole study: the quick CPU study, or on a machine with an NVIDIA GPU the GPU-sized one (params.yaml: studies),
# which trains on the GPU and benchmarks the CPU and the GPU side by side.
STUDY ?= $(if $(HAS_GPU),gpu,quick)

# Git carries dvc.lock and results/ but not the MLflow store (mlruns/), whose runs the report reads. In a clone
# with no store yet, a committed dvc.lock would have DVC skip tune and benchmark as done, so every stage runs again.
FORCE = $(if $(MLFLOW_TRACKING_URI),,$(if $(wildcard mlruns/mlflow.db),,--force))

repro: setup
	@if [ "$(STUDY)" = quick ]; then dvc repro $(FORCE); else dvc exp run $(FORCE) -S study=$(STUDY); fi
	@echo "report: $(CURDIR)/reports/report.html (and reports/report.md); every run: make ui"

# Two workers, one test file each: most of the time is single-threaded stage start-up. The twenty slowest tests
# are listed at the end, so the suite's time stays a measured figure.
test: setup postgres-server
	python -m pytest -q -n 2 --dist loadfile --durations=20

# The shared-storage test starts a throwaway PostgreSQL server from Debian's package: installed here when
# missing, apt-get exists and we are root. Never fatal: without it that one test skips, saying why.
postgres-server:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian's postgresql for the shared-storage test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql) >/dev/null 2>&1 \
	    || echo "postgresql could not be installed: the shared-storage test will skip"; \
	fi

gpu-test: setup
	python -m pytest -q -m gpu

ui: setup
	@python -c "import mlflow; c = mlflow.MlflowClient('sqlite:///mlruns/mlflow.db'); \
	  [print(f'{e.name} runs: http://127.0.0.1:5000/#/experiments/{e.experiment_id}/runs') for e in c.search_experiments() if e.name != 'Default']"
	mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --port 5000

# The team's tracking server, started as tests/test_team.py starts it (docs/team.md): a database backend, artifacts
# proxied into ARTIFACTS, MLflow's basic-auth app (MLFLOW_AUTH_CONFIG_PATH, MLFLOW_AUTH_ADMIN_PASSWORD and
# MLFLOW_FLASK_SERVER_SECRET_KEY from the environment). HOST=0.0.0.0 to serve other machines.
BACKEND ?= sqlite:///mlserver/mlflow.db
ARTIFACTS ?= mlserver/artifacts
HOST ?= 127.0.0.1
PORT ?= 5000
WORKERS ?= 4
server: setup
	@mkdir -p mlserver
	mlflow server --host $(HOST) --port $(PORT) --workers $(WORKERS) --backend-store-uri "$(BACKEND)" \
	  --artifacts-destination "$(ARTIFACTS)" --app-name basic-auth

# `dvc plots show` without a network: Vega, Vega-Lite and Vega-Embed from npm, inlined into the page's template.
VEGA_JS := vega/.js
plots: setup $(VEGA_JS)/offline.html
	dvc plots show --html-template $(VEGA_JS)/offline.html
	@echo "to compare experiments: dvc plots diff --html-template $(VEGA_JS)/offline.html <exp> <exp>"

$(VEGA_JS)/offline.html: vega/offline.py
	mkdir -p $(VEGA_JS)
	cd $(VEGA_JS) && npm pack --silent vega@5 vega-lite@5 vega-embed@6 >/dev/null
	python vega/offline.py $(VEGA_JS)

clean:
	rm -rf data/raw data/prepared models results reports mlruns
