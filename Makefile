# The project's commands. Each sets up .venv first (from scratch on a fresh machine).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CPU machines get the CPU build of torch first, so pip never pulls a multi-GB CUDA build.
CPU_TORCH ?= torch==2.13.0

.PHONY: run demo test lint typecheck pytest bench clean redis-server mooncake soak

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA found: torch comes from pyproject's range"; \
	else \
		$(BIN)/python -m pip install -q "$(CPU_TORCH)"; \
	fi
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

run: $(STAMP)          ## the main job: the demo (run it twice: the second starts with L3 hits)
	$(BIN)/hicache-async demo

demo: run

lint: $(STAMP)         ## ruff and mypy --strict
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict hicache_async backends/hicache_file backends/hicache_memory backends/hicache_redis backends/hicache_mooncake
	$(BIN)/mypy --strict examples

redis-server:          ## the storage tests start real redis-server processes
	@bash scripts/ensure-redis-server.sh

mooncake: $(STAMP)     ## the Mooncake Store tests start a real mooncake_master and store node
	@bash scripts/ensure-mooncake.sh $(BIN)/python

pytest: $(STAMP) redis-server mooncake
	$(BIN)/python -m pytest -q

test: lint pytest      ## what CI runs

SOAK_SECONDS ?= 600
SOAK_SEED    ?= 0
SOAK_L3      ?= file
soak: $(STAMP)         ## chaos soak: 10 minutes, every fault kind, file L3 (SOAK_L3=redis: make redis-server first); prints the JSON
	$(BIN)/hicache-async soak --seconds $(SOAK_SECONDS) --seed $(SOAK_SEED) --l3 $(SOAK_L3) --faults all --json

bench: $(STAMP)
	@ls benchmarks/bench_*.py >/dev/null 2>&1 || { echo "no benchmarks yet"; exit 0; }
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
