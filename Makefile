# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

# nvidia-pytriton: for the tritonserver binary and Python-backend stubs inside it; --no-deps because its
# own Python API (unused by pcedge) pins numpy<2. Its stubs embed the system's libpython3.11: when this
# venv's Python is another 3.11 build, `pcedge serve` gives them the system python3.11's standard library
# with this venv's packages (runtime/serving/server.py), or says what to install.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[cpu,export,test,serve]'
	$(BIN)/pip install --quiet --no-deps 'nvidia-pytriton==0.7.0'
	touch $@

.PHONY: demo test install clean
install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/python -m pcedge.demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out results .pytest_cache
