#!/usr/bin/env bash
# Run the test suite (arguments go to pytest), setting up the environment first if needed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$REPO"
exec "$MRNGAN_PY" -m pytest "$@"
