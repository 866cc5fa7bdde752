# Quick start: `make demo` (set-up + prune the bundled demo model), `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= demo_out

.PHONY: setup demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,eval,quant]'

setup: $(PY)

demo: $(PY)
	$(PY) -m fair_moe.prune --model fair_moe/data/demo_model --budget 0.25 --out $(OUT) --overwrite \
		--ppl-file fair_moe/data/heldout/python.txt --ppl-file fair_moe/data/heldout/licenses.txt \
		--ppl-file fair_moe/data/heldout/docs.txt

test: $(PY)
	$(PY) -m pytest -q tests

lint: $(PY)
	$(VENV)/bin/ruff check fair_moe scripts tests
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) $(OUT)
