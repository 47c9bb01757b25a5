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
# `make demo PORT=8090` when 8080 is taken.
demo: $(VENV)/.installed
	$(VENV)/bin/adapter demo $(if $(PORT),--port $(PORT))

test: $(VENV)/.installed
	$(VENV)/bin/pytest

openapi: $(VENV)/.installed
	$(VENV)/bin/adapter openapi > openapi/openapi.json
