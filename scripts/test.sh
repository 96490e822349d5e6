#!/usr/bin/env bash
# The test command: set up, lint, check the import layers (pyproject's [tool.importlinter]),
# type-check, run the whole suite against real PostgreSQL
# (the machine's on 127.0.0.1:5432 when it answers, else an embedded one), real Ray, a real
# S3-protocol server and real transformers + peft.
# pytest runs on two workers (pytest-xdist; tests/conftest.py orders the modules, heaviest
# first) where the machine has two cores or more: about 23 minutes against 33 in one process on
# a 2-core AVX2-only VM. LORAFORGE_TEST_WORKERS sets the count; 0 runs it in this process (as
# `--pdb` needs), the default on a single core.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/hadolint Dockerfile
.venv/bin/lint-imports --no-cache
.venv/bin/mypy
workers=0
# The cores this process may use (`nproc` would follow OMP_NUM_THREADS instead).
cores=$(.venv/bin/python -c 'import os; print(len(os.sched_getaffinity(0)))')
if [ "$cores" -ge 2 ]; then workers=2; fi
.venv/bin/python -m pytest -n "${LORAFORGE_TEST_WORKERS:-$workers}" --dist worksteal "$@"
