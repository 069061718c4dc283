# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test clean

# CPU build of torch pinned first: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[embedded,test,torchserve,plots]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/tandem demo

test: install
	$(PY) -m pytest -m "not gpu"

clean:
	rm -rf $(VENV) src/*.egg-info
