#!/usr/bin/env bash
# Submit a kubeai_train job file to Kubernetes, e.g. from a scheduler's shell node (DataWorks).
#
#   launchers/submit.sh JOB_FILE [launcher flags...] [-- script args...]
#   launchers/submit.sh launchers/jobs/tf_ps_ctr.yaml --name ctr-20261129 --image reg/ctr:1.4 -- --epochs 3
#
# Launcher flags are those of `python -m kubeai_train.launch` (--name, --namespace, --image, --wait,
# --dry-run, --kubeconfig, --context, --queue, ...). The manifest is validated strictly (the installed
# typed models) and against the operator's webhook rules before anything is sent, then the API server
# dry-runs it (dryRun=All: the cluster's own CRD) before creating it. Exit codes: 0 created (or printed
# with --dry-run; with --wait: the job Succeeded), 2 bad job file or flags (one line on stderr),
# 1 the API refused or is unreachable (with --wait: the job Failed), 124 --wait --timeout S expired.
# Environment: PYTHON (default python3), KUBECONFIG.
set -euo pipefail

if [ "$#" -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    [ "$#" -ge 1 ] && exit 0
    exit 2
fi

job="$1"
shift
if [ ! -r "$job" ]; then
    echo "submit.sh: job file '$job' is not readable" >&2
    exit 2
fi

exec "${PYTHON:-python3}" -m kubeai_train.launch --target k8s --job "$job" "$@"
