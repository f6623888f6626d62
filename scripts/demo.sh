#!/usr/bin/env bash
# The end-to-end demo, from a fresh Debian 12 machine (as root): installs and starts what is
# missing (scripts/setup-deps.sh), then runs examples/demo.py.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup-deps.sh
exec .venv/bin/python examples/demo.py "$@"
