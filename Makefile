# The two commands the README names: `make install` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# test processes (pytest-xdist), each given whole test files; 0: one process
TEST_WORKERS ?= 2

.PHONY: install test

install:
	bash scripts/install.sh $(VENV)

test:
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline OMP_NUM_THREADS=2 \
		$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests
