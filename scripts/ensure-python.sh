#!/usr/bin/env bash
# Create the virtualenv; on Debian, python3 -m venv needs the python3-venv package.
set -euo pipefail
python=${1:-python3}
venv=${2:-.venv}

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "Python 3.11 or newer is needed; $python is $("$python" --version 2>&1)" >&2
    exit 1
fi
if "$python" -m venv "$venv" 2>/dev/null; then
    exit 0
fi
rm -rf "$venv"
scripts/ensure-apt.sh "python3-venv"
"$python" -m venv "$venv"
