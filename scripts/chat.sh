#!/usr/bin/env bash
# Set up a virtual environment and chat with the default model (pulled on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check torch==2.13.0 -e .
exec lmforge chat "$@"
