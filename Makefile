# The two commands: `make run` serves the fleet, `make test` runs the whole suite.
# Both first install whatever is missing (scripts/setup.sh is idempotent and fast when all is there).

.PHONY: run test setup bench clean

setup:
	@scripts/setup.sh

run: setup
	.venv/bin/mcpfleet up

test: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider

bench: setup
	.venv/bin/python bench/gateway_overhead.py

clean:
	rm -rf .setup .venv tests/conformance/node_modules
