# Two commands set everything up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned before the extras: an open range would let pip pick the newest release, which on
# Linux x86_64 is a multi-GB CUDA build. 2.13.0 is the CPU build these machines carry (/opt/wheels);
# elsewhere set TORCH_SPEC, e.g. TORCH_SPEC='torch' on a CUDA workstation.
TORCH_SPEC ?= torch==2.13.0
DEMO_SECONDS ?= 60
# Training budget of `make models` (train/budgets.py): smoke (fast path, ~10 min, a plumbing check)
# or standard (1-2 h on 2 cores: rebuilds the shipped models/$(MODEL)).
BUDGET ?= smoke
# Which shipped model `make models` builds: parking_lot or ridgecrest_like (scripts/make_models.sh).
MODEL  ?= parking_lot
# The stamp is rebuilt whenever pyproject.toml changes, so new dependencies are picked up.
STAMP  := $(VENV)/.installed-dev

.PHONY: help venv mosquitto chromium test demo bench soak lint clean models bundle docs

help:
	@echo "make test   - create .venv, install deps (and mosquitto, chromium), run the test suite"
	@echo "make demo   - create .venv, install deps (and mosquitto), run a live parking-lot site for a minute"
	@echo "make bench  - run every benchmark with its default budget, refresh benchmarks/results/"
	@echo "make soak   - long reliability runs: 10 broker restarts, 100 000 fuzz messages, 30 s of 10x load"
	@echo "make models - smoke-budget build of the parking-lot model pipeline into build/ (about 10 min)"
	@echo "make models BUDGET=standard - retrain the shipped models/parking_lot (1-2 h on 2 cores)"
	@echo "make bundle - offline install folder for an edge box: wheels (aarch64, Python 3.10), models, configs"
	@echo "make docs   - build the documentation site into build/docs (mkdocs, --strict)"
	@echo "make lint   - ruff over the code"
	@echo "make clean  - remove .venv and caches"

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "error: Python >= 3.10 is required, found " + sys.version.split()[0])'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH_SPEC)'
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

bundle: venv
	VENV=$(VENV) bash scripts/make_bundle.sh

mosquitto:
	@bash scripts/ensure_mosquitto.sh

chromium:
	@bash scripts/ensure_chromium.sh

test: venv mosquitto chromium
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# The demo runs without Mosquitto too: spar-trial falls back to the embedded amqtt broker.
demo: venv
	@bash scripts/ensure_mosquitto.sh || echo "note: no Mosquitto; the demo uses the embedded amqtt broker" >&2
	$(VENV)/bin/spar-trial run --duration $(DEMO_SECONDS) --link configs/links/lossy.toml --out results/demo --overwrite

bench: venv mosquitto
	VENV=$(VENV) bash scripts/run_benchmarks.sh

soak: venv mosquitto
	VENV=$(VENV) bash scripts/soak.sh

models: venv
	VENV=$(VENV) BUDGET=$(BUDGET) MODEL=$(MODEL) bash scripts/make_models.sh

# The reference documentation (docs/, mkdocs.yml); --strict fails on any broken link.
docs: venv
	$(VENV)/bin/mkdocs build --strict --site-dir build/docs

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache *.egg-info
