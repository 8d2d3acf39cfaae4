#!/usr/bin/env bash
# Set up freshrec in ./.venv on a Debian machine with Python 3.11 (idempotent).
#   scripts/setup.sh          runtime dependencies (for the quickstart)
#   scripts/setup.sh --dev    plus test tools, redis-server and the Kafka-protocol test broker
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
dev=0; [[ "${1:-}" == "--dev" ]] && dev=1

apt_pkgs=()
"$PY" -c 'import ensurepip, venv' 2>/dev/null || apt_pkgs+=(python3-venv)
((dev)) && ! command -v redis-server >/dev/null && apt_pkgs+=(redis-server)
# jemalloc for the long-running roles (config `allocator`): glibc's malloc kept growing under load
/sbin/ldconfig -p 2>/dev/null | grep -q libjemalloc.so.2 || apt_pkgs+=(libjemalloc2)
if ((${#apt_pkgs[@]})); then
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo=sudo
  echo "installing system packages: ${apt_pkgs[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${apt_pkgs[@]}" >/dev/null
fi

[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
pip_install() {
  # this workplace's pip config names local mirrors that may be absent: hide those warnings only
  .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v 'is ignored: it is neither' || true; }
  return "${PIPESTATUS[0]}"
}
# Torch first, pinned: a bare `torch` requirement on a machine without it pulls a multi-GB CUDA build.
.venv/bin/python -c 'import torch' 2>/dev/null || pip_install torch==2.13.0
if ((dev)); then pip_install -e ".[dev]"; else pip_install -e .; fi
