# The two commands: `make run` serves the fleet, `make test` runs the whole suite.
# Both first install whatever is missing (scripts/setup.sh is idempotent and fast when all is there).

.PHONY: run test lint setup bench clean

setup:
	@scripts/setup.sh test

run:
	@scripts/setup.sh run
	.venv/bin/mcpfleet up

# The suite's files are shared out among TEST_WORKERS processes (pytest-xdist), each file whole in one
# of them, so a module's fixtures are set up once. TEST_WORKERS=0 runs it all in this one process.
TEST_WORKERS ?= 2

test:
	@scripts/setup.sh test
	@$(MAKE) --no-print-directory lint
	.venv/bin/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile

# Style and likely bugs (ruff), the layers' import contracts (import-linter), types of core and sandbox (mypy).
lint:
	@scripts/setup.sh test
	.venv/bin/ruff check .
	.venv/bin/lint-imports
	.venv/bin/mypy

bench:
	@scripts/setup.sh run
	@command -v wrk >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null)
	.venv/bin/python bench/gateway_overhead.py
	.venv/bin/python bench/sandbox_lifecycle.py
	.venv/bin/python bench/clone_start.py
	.venv/bin/python bench/image_seal.py
	.venv/bin/python bench/registry_guard.py
	.venv/bin/python bench/models.py
	.venv/bin/python bench/load_faults.py $(LOAD_FAULTS_ARGS)

clean:
	rm -rf .setup .venv .venv-sandbox tests/conformance/node_modules
