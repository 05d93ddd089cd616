#!/usr/bin/env bash
# Create .venv and install the pinned stack. Fast when nothing changed (a stamp holds the hash
# of the requirement files and setup.cfg). MPTREC_DEVICE=cuda installs the CUDA builds instead.
set -euo pipefail
cd "$(dirname "$0")/.."
device="${MPTREC_DEVICE:-cpu}"
case "$device" in
  cpu) req=requirements/cpu.txt; index_args=() ;;
  cuda) req=requirements/cuda.txt
        index_args=(--extra-index-url "${MPTREC_TORCH_INDEX:-https://download.pytorch.org/whl/cu128}") ;;
  *) echo "setup_env: MPTREC_DEVICE must be 'cpu' or 'cuda', got '$device'" >&2; exit 2 ;;
esac
py="${PYTHON:-python3}"
stamp=.venv/.mptrec-stamp
want="$device $(cat "$req" requirements/nodeps.txt setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)"
if [[ -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
  echo "setup_env: .venv is up to date ($device)"
  exit 0
fi
if [[ ! -x .venv/bin/python ]]; then
  echo "setup_env: creating .venv with $($py --version)"
  "$py" -m venv .venv
fi
echo "setup_env: installing $req (device=$device); this takes about a minute on a fresh machine"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${index_args[@]}" -r "$req"
.venv/bin/python -m pip install -q --no-deps -r requirements/nodeps.txt
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
.venv/bin/python -c "import torch, torchrec, fbgemm_gpu, mptrec.models; print('setup_env: torch', torch.__version__, '| torchrec', torchrec.__version__)"
echo "$want" > "$stamp"
