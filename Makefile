# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test lint typecheck pytest demo fast-test reproduce-census bench bench-quick accuracy clean

setup:
	@bash scripts/setup_env.sh

lint: setup
	$(VENV)/bin/ruff check .

typecheck: setup
	$(VENV)/bin/mypy models pipeline data_loaders

pytest: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The whole suite: lint, type checks, every test (slow and multi-process ones included).
test: setup lint typecheck pytest

# Everything but the tests marked slow (for quick local iterations).
fast-test: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: setup
	@bash scripts/demo.sh

reproduce-census: setup
	@bash scripts/reproduce_census.sh

bench: setup
	$(VENV)/bin/mptrec bench --out bench/results.json

# Accuracy benchmark (about 2 hours on 2 cores): Census Table 2/3 protocols on 3 seeds with paired
# intervals, torch-rechub 0.9.0 peers in their own venv, generated Ali-CCP at 1M/4M/16M rows.
accuracy: setup
	bash scripts/rechub_env.sh
	$(PY) -m mptrec.bench.accuracy --out bench/accuracy.json --peers --set train.threads=1 \
		--aliccp-rows 1000000 4000000 16000000

bench-quick: setup
	$(VENV)/bin/mptrec bench --quick --out runs/bench-quick.json

clean:
	rm -rf runs/demo .pytest_cache .mypy_cache .ruff_cache
