# The README's commands. Each target creates .venv on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench ndif-up ndif-down clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) workflows/entity_tracking.py --out runs/demo
	@echo "Report: runs/demo/report.md (numbers: runs/demo/results.json, plots: runs/demo/*.png)"

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench.run_all

# A self-hosted NDIF on loopback for --remote runs and the remote tests (docs/REMOTE.md). The first
# ndif-up installs the server into .ndif/venv (~5.5 GB, a few minutes); later ones take about a minute.
ndif-up: $(STAMP)
	$(PY) ndif/server.py up

ndif-down:
	$(PYTHON) ndif/server.py down

.PHONY: ndif-status
ndif-status:
	$(PYTHON) ndif/server.py status

clean:
	rm -rf $(VENV) .pytest_cache runs
