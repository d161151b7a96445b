#!/bin/sh
# Container entrypoint for kubeai_train jobs (TFJob / PyTorchJob pods).
#
#   entrypoint.sh script.py [args...]
#   entrypoint.sh -m package.module [args...]
#
# Runs the script with an unbuffered python, or under torchrun when the PyTorchJob asks for
# several processes per pod (PET_NPROC_PER_NODE > 1 or "auto"): torchrun reads PET_NNODES,
# PET_NODE_RANK, PET_NPROC_PER_NODE and PET_MASTER_ADDR/PORT, which the training-operator sets.
# The exit code is the script's (or torchrun's), so the operator's restart policy sees it.
set -eu

if [ "$#" -eq 0 ]; then
    echo "entrypoint.sh: give the training script (or -m module) and its arguments" >&2
    exit 2
fi

PYTHON="${PYTHON:-python}"
TORCHRUN="${TORCHRUN:-torchrun}"
nproc="${PET_NPROC_PER_NODE:-1}"

case "$nproc" in
    auto) exec "$TORCHRUN" "$@" ;;
    ''|*[!0-9]*)
        echo "entrypoint.sh: PET_NPROC_PER_NODE must be a number or auto, got '$nproc'" >&2
        exit 2 ;;
esac

if [ "$nproc" -gt 1 ]; then
    exec "$TORCHRUN" "$@"
fi
exec "$PYTHON" -u "$@"
