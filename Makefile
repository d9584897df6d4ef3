# The two commands of the README's quick start, and a few helpers.
.PHONY: install run test lint bench

install:
	bash scripts/install.sh

run: install  ## install, then run the whole pipeline on the bundled sample corpus
	.venv/bin/refinery run

test: install  ## install, then run the test suite
	.venv/bin/python -m pytest -q -p no:cacheprovider

lint:
	.venv/bin/ruff check .
