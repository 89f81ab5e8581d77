# Two entry points on a fresh machine: `make demo` and `make test`. Everything installs into
# .venv through constraints.txt (tested pins), so nothing on the system Python is touched.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNS ?= runs

.PHONY: setup demo demo-digits test lint bench browser clean

$(BIN)/.installed: setup.cfg constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[torch,keras,serve,logs,ray,dev]"
	touch $@

setup: $(BIN)/.installed

# The main job: three heterogeneous backbones (timm and Keras) over the same 3 stored folds of
# the Fashion-MNIST demo (fetched once from Debian's dataset-fashion-mnist into the foldstack
# cache), then level 2 (honest CV table, the method chosen by CV log loss, every run and method
# scored on the 2,000 held-out test labels) and the OOF analysis report.
demo: setup
	$(BIN)/python run_folds.py --config configs/demo/resnet10t_28px.yaml --out $(RUNS)
	$(BIN)/python run_folds.py --config configs/demo/resnet10t_20px.yaml --out $(RUNS)
	$(BIN)/python run_folds.py --config configs/demo/mobilenetv3_36px.yaml --out $(RUNS)
	$(BIN)/python stack.py --data demo-fashion --out $(RUNS)
	$(BIN)/python -m oof.analyze --data demo-fashion --out $(RUNS)

# The same on the bundled digits (offline; saturated, so the stack shows only in the log loss).
demo-digits: setup
	$(BIN)/python run_folds.py --config configs/digits/resnet10t.yaml --out $(RUNS)
	$(BIN)/python run_folds.py --config configs/digits/resnet18.yaml --out $(RUNS)
	$(BIN)/python run_folds.py --config configs/digits/mobilenetv3.yaml --out $(RUNS)
	$(BIN)/python stack.py --out $(RUNS)
	$(BIN)/python -m oof.analyze --out $(RUNS)

# Headless Chromium renders the analysis report and drives the upload page in the tests
# (Debian's chromium and chromium-driver; selenium talks to the driver).
browser:
	@{ command -v chromium && command -v chromedriver; } >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

# Two pytest workers (one per core; each capped at one BLAS/TF thread in tests/conftest.py), each
# taking whole modules so a module's shared fixture (a trained stack, a Ray cluster) is built once.
# A worker that dies ends the run at once: xdist 3.8's loadscope re-queues a replaced worker's
# finished modules as empty units and can then wait forever (pytest-xdist#1378). Modules go out
# longest first (tests/conftest.py MODULE_SECONDS), not xdist's most-tests-first order.
PYTEST_WORKERS ?= 2
test: setup browser
	$(BIN)/python -m pytest -q -ra -n $(PYTEST_WORKERS) --dist loadscope --no-loadscope-reorder \
	  --max-worker-restart 0 --durations=25

lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench: setup
	$(BIN)/python bench/train_overhead.py
	$(BIN)/python bench/stack_scale.py
	$(BIN)/python bench/analyze_scale.py

clean:
	rm -rf $(RUNS) .pytest_cache
