# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv (Python >= 3.11) and installs the project into it on first use.
PYTHON ?= python3
VENV ?= .venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

.PHONY: demo test openapi
demo: $(VENV)/.installed
	$(VENV)/bin/adapter demo

test: $(VENV)/.installed
	$(VENV)/bin/pytest

openapi: $(VENV)/.installed
	$(VENV)/bin/adapter openapi > openapi/openapi.json
