#!/usr/bin/env bash
# Create .venv (once) and install loraforge with its test extras into it.
# torch is pinned to 2.13.0: on a machine without it, pip takes the CPU build from the index.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.loraforge-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[test]"
  touch "$stamp"
fi
# The browser tests (tests/browser) drive Debian's chromium; install it where we can. Elsewhere
# they fail naming what is missing (set LORAFORGE_CHROMIUM to another Chromium binary).
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
