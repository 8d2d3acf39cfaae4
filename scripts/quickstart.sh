#!/usr/bin/env bash
# Install everything, start freshrec embedded, replay MovieLens-100K through the REST API,
# show how one user's recommendations change, and leave the API up (Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/freshrec quickstart "$@"
