# The two commands a new user needs (see README.md):
#   make train   set up .venv and run the main job
#   make test    set up .venv and run the test suite
#   make test-fast   only the in-process unit tests (tests/unit/, a couple of minutes)
# Data: TFF_DPMED_DATA_DIR (or DATA_DIR=...) points at a folder of MedMNIST .npz
# files; without it, files are downloaded to the user cache folder.

PY := .venv/bin/python
DATA_DIR ?= $(TFF_DPMED_DATA_DIR)
DATA_FLAG := $(if $(DATA_DIR),--data_dir=$(DATA_DIR),)
TRAIN_FLAGS ?= --noise_multiplier=1.1

.PHONY: setup train test test-fast bench clean
setup:
	@bash scripts/bootstrap.sh

train: setup
	$(PY) -m tff_dpmed.train $(TRAIN_FLAGS) $(DATA_FLAG)

# Two test files at a time (pytest-xdist): most tests wait on a subprocess.
TEST_PROCESSES ?= 2

test: setup
	$(PY) -m pytest -q -n $(TEST_PROCESSES) --dist loadfile $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not e2e" tests/unit $(PYTEST_ARGS)

bench: setup
	$(PY) -m benchmarks.run_all $(DATA_FLAG)

clean:
	rm -rf .venv build *.egg-info
