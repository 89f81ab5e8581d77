# Two entry points on a fresh machine: `make demo` and `make test`. Everything installs into
# .venv through constraints.txt (tested pins), so nothing on the system Python is touched.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNS ?= runs

.PHONY: setup demo test lint bench browser clean

$(BIN)/.installed: setup.cfg constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[torch,keras,dev]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python run_folds.py --backbone timm/resnet10t --img-size 32 --out $(RUNS)

# Headless Chromium renders the analysis report in the tests (Debian's package).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: setup browser
	$(BIN)/python -m pytest -q -ra

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python bench/train_overhead.py

clean:
	rm -rf $(RUNS) .pytest_cache
