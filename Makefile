# The two commands of the README's quick start, and a few helpers.
.PHONY: install run test lint bench

# The side-by-side benchmarks `make bench` runs, each at its defaults; pick some with `make bench BENCH="filter dedup"`.
BENCH ?= ingest dedup filter tokenize train generate finetune serve

install:
	bash scripts/install.sh

run: install  ## install, then run the whole pipeline on the bundled sample corpus
	.venv/bin/refinery run

test: install  ## install, then run the test suite
	.venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile

lint: install  ## ruff over the whole repository (CI runs it before the tests)
	.venv/bin/ruff check .

bench:  ## install the peers (datatrove...), then run each benchmark side by side; add --record by hand to keep results
	REFINERY_EXTRAS=test,bench bash scripts/install.sh
	set -e; for b in $(BENCH); do echo "== python -m bench.$$b"; .venv/bin/python -m bench.$$b; done
