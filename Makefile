PY ?= python3

.PHONY: install install-dev demo sample test test-all lint

install:
	bash scripts/install.sh

install-dev:
	bash scripts/install.sh --dev

demo: install
	chaintune demo

sample: install
	chaintune sample --model builtin:digits --num 64 --out out/samples --overwrite

# the CI test command: the fast, representative suite (slow end-to-end tests are marked `slow`)
test: install-dev
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

test-all: install-dev
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint:
	ruff check chaintune tests benchmarks
