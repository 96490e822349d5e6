#!/usr/bin/env bash
# The test command: set up, lint, check the import layers (pyproject's [tool.importlinter]),
# type-check, run the whole suite against real PostgreSQL
# (the machine's on 127.0.0.1:5432 when it answers, else an embedded one), real Ray, a real
# S3-protocol server and real transformers + peft.
# pytest runs on LORAFORGE_TEST_WORKERS workers (pytest-xdist; 2 by default, 0 runs it in this
# process): on a 2-core machine the suite waits on subprocesses, sockets and the database about
# half of its time, so two workers keep both cores busy. tests/conftest.py orders the modules.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/hadolint Dockerfile
.venv/bin/lint-imports --no-cache
.venv/bin/mypy
.venv/bin/python -m pytest -n "${LORAFORGE_TEST_WORKERS:-2}" --dist worksteal "$@"
