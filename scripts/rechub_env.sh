#!/usr/bin/env bash
# Create an isolated venv holding torch-rechub 0.9.0, the peer reference for the Census accuracy
# benchmark (bench/rechub_reference.py). Deliberately separate from .venv: torch-rechub is never a
# dependency of the mptrec package. Default location runs/.rechub-venv (git-ignored); override with
# RECHUB_VENV=/some/dir. Idempotent: a stamp holding the hash of the pins makes a re-run instant.
#
#   bash scripts/rechub_env.sh
#   runs/.rechub-venv/bin/python bench/rechub_reference.py --data DIR --seed N --out FILE.json
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${RECHUB_VENV:-runs/.rechub-venv}"
py="${PYTHON:-python3}"
# torch is always pinned: an open range would pull a multi-GB CUDA build instead of the CPU wheel.
pins=(
  torch==2.13.0
  torch-rechub==0.9.0
  numpy==2.4.6
  pandas==3.1.1
  scikit-learn==1.9.1
  pyarrow==26.0.1
  tqdm==4.70.1
)
stamp="$venv/.rechub-stamp"
want="$(printf '%s\n' "${pins[@]}" "$($py --version 2>&1)" | sha256sum | cut -d' ' -f1)"
if [[ -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
  echo "rechub_env: $venv is up to date"
  exit 0
fi
if [[ ! -x $venv/bin/python ]]; then
  echo "rechub_env: creating $venv with $($py --version)"
  mkdir -p "$(dirname "$venv")"
  "$py" -m venv "$venv"
fi
echo "rechub_env: installing ${pins[*]} into $venv (a few minutes on a fresh machine)"
"$venv/bin/python" -m pip install -q "${pins[@]}"
"$venv/bin/python" - <<'EOF'
import importlib.metadata as md

import torch
import torch_rechub  # noqa: F401

print("rechub_env: torch", torch.__version__, "| torch-rechub", md.version("torch-rechub"))
assert not torch.version.cuda, f"expected the CPU build of torch, got CUDA {torch.version.cuda}"
EOF
echo "$want" > "$stamp"
