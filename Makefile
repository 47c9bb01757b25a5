# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv (Python >= 3.11) and installs the project into it on first use;
# `make test` also installs the TypeScript client's locked dependencies (Node >= 18, npm).
PYTHON ?= python3
VENV ?= .venv
CLIENT := clients/typescript

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

# npm ci writes node_modules/.package-lock.json: reinstall only when the lock file changes.
$(CLIENT)/node_modules/.package-lock.json: $(CLIENT)/package-lock.json $(CLIENT)/package.json
	cd $(CLIENT) && npm ci --no-audit --no-fund

.PHONY: demo test test-python test-client openapi generate
# `make demo PORT=8090` when 8080 is taken.
demo: $(VENV)/.installed
	$(VENV)/bin/adapter demo $(if $(PORT),--port $(PORT))

# The client first, so that the run closes on pytest's summary line.
test: test-client test-python

test-python: $(VENV)/.installed
	$(VENV)/bin/pytest

# The client's drift check, type check, docs check, build, and vitest against `adapter demo`
# (from this .venv), including the Chromium test.
test-client: $(VENV)/.installed $(CLIENT)/node_modules/.package-lock.json
	cd $(CLIENT) && ADAPTER=$(abspath $(VENV))/bin/adapter npm test

openapi: $(VENV)/.installed
	$(VENV)/bin/adapter openapi > openapi/openapi.json

# Everything that lists the tasks, from the task registry: the OpenAPI document, the README's
# generated parts, the client's src/generated/ (tests/test_generated.py fails while one is stale).
generate: $(VENV)/.installed $(CLIENT)/node_modules/.package-lock.json
	$(VENV)/bin/adapter generate
