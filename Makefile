# Two commands for a fresh machine with only python3:
#   make run    start MLflow, two shards and the gateway on loopback
#   make test   run every test
# Both create or refresh .venv when pyproject.toml changed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEPS_HASH := $(shell $(PYTHON) -c "import hashlib,sys;print(hashlib.sha256(open('pyproject.toml','rb').read()).hexdigest()[:16])")
STAMP := $(VENV)/.deps-$(DEPS_HASH)
PYTEST_ARGS ?=

.PHONY: venv run test test-unit test-e2e protos bench bench-quick bench-peers soak clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.deps-*
	touch $(STAMP)

venv: $(STAMP)

run: venv
	$(BIN)/loraplex up

test: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-unit: venv
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

test-e2e: venv
	$(BIN)/python -m pytest -q e2e_tests $(PYTEST_ARGS)

protos: venv
	$(BIN)/python -m protos.generate

bench: venv
	$(BIN)/python -m bench

bench-quick: venv
	$(BIN)/python -m bench --quick

# loraplex against vLLM's CPU build (installed into its own venv under the benchmark cache on
# first use); PEERS_ARGS="--pairs 1 --dtypes bf16" for a quick run.
bench-peers: venv
	$(BIN)/python -m bench.peers $(PEERS_ARGS)

# The chaos soak over the real stack (bench/soak.py): 20 minutes by default;
# SOAK_DURATION_S=120 for a short run. Results in bench/results/soak.{json,png}.
SOAK_DURATION_S ?= 1200
soak: venv
	$(BIN)/python -m bench.soak --duration-s $(SOAK_DURATION_S) $(SOAK_ARGS)

clean:
	rm -rf .state
