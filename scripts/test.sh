#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine (as root): installs and starts what is
# missing, lints, runs pytest. Extra arguments go to pytest, e.g. scripts/test.sh -k codec -x
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$PWD/.venv/bin:$PATH:/usr/local/sbin:/usr/sbin:/sbin"

bash scripts/setup-deps.sh

lint=()
for dir in src tests bench; do
    [[ -d $dir ]] && lint+=("$dir")
done
.venv/bin/python -m ruff check "${lint[@]}"
exec .venv/bin/python -m pytest -q "$@"
