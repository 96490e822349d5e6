#!/usr/bin/env bash
# The main job on the embedded default: set up, then `loraforge demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/loraforge demo "$@"
