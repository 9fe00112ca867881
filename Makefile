# The two commands of the README. Each installs what it needs first (scripts/setup.sh).
.PHONY: main test test-all setup

setup:
	@bash scripts/setup.sh

main: setup
	.venv/bin/fedhash demo

test: setup
	@bash scripts/test.sh

test-all: setup
	@bash scripts/test.sh -m ""
