# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
# Debian's /usr/bin/python3.11 first: the Triton Python backend (nvidia-pytriton's tritonserver) embeds the
# system's libpython3.11, and pcedge's Triton models load only from a virtualenv of that same build (another
# 3.11.x's standard library fails inside it; `pcedge serve` says so instead).
PYTHON ?= $(shell test -x /usr/bin/python3.11 && echo /usr/bin/python3.11 || command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[export,test,serve]'
	# The tritonserver binary and Python-backend stubs inside nvidia-pytriton; --no-deps because its own
	# Python API (unused by pcedge) pins numpy<2.
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
