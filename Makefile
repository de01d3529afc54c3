# make demo : set up .venv and run the main job on the default model and sample data
# make test : set up .venv and run the whole test suite (fast and real-model tests)
.PHONY: setup demo test test-fast bench

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider tests

test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow" tests

bench: setup
	.venv/bin/python bench/merge.py --quick
	.venv/bin/python bench/pack.py
	.venv/bin/python bench/train.py
