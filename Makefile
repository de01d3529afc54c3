# make demo : set up .venv and run the main job on the default model and sample data
# make test : set up .venv and run the whole test suite (fast and real-model tests)
# CI runs make test and make test-py313
.PHONY: setup demo test test-fast test-py313 test-aarch64 bench bench-scale docs

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist load --maxschedchunk 1 --durations=25 tests
	.venv/bin/lint-imports --no-cache
	.venv/bin/mkdocs build --strict --quiet

test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow" tests

# The device part of the suite under Debian 13's Python 3.13 (chroot; needs root).
test-py313: setup
	bash scripts/check_python313.sh

# Training on emulated aarch64 (chroot + qemu-user-static; needs root, ~15 minutes the first time).
test-aarch64: setup
	bash scripts/check_aarch64.sh

docs: setup
	.venv/bin/mkdocs build --strict

bench: setup
	.venv/bin/python bench/merge.py --quick
	.venv/bin/python bench/pack.py
	.venv/bin/python bench/train.py --rounds 2 --compile --plain-side
	.venv/bin/python bench/train.py --seq 64 --steps 24 --compile --no-chunks-side --plain-side
	.venv/bin/python bench/matmul.py
	.venv/bin/python bench/attention.py
	.venv/bin/python bench/bf16.py

# A Phi-3-mini-shaped model (3.8B parameters, random weights) end to end on an int4 base:
# export, train, eval, merge, pack, generate; about 30 GB of disk in /var/tmp/edgetune-scale.
bench-scale: setup
	.venv/bin/python bench/scale.py
	.venv/bin/python bench/convert_gguf.py
