#!/usr/bin/env bash
# One-shot check of the service on an NVIDIA GPU host, from a checkout, in one command:
#   bash benchmarks/gpu_check.sh          (or: make gpu-check)
# Refuses at once (exit 2) without an NVIDIA GPU. Otherwise installs the serving and CUDA extras into
# .venv (no torch; `make` rule of `make serve SERVE_EXTRAS=serve,cuda`) and wrk (Debian package) when
# missing, then runs benchmarks/gpu_check.py: both models on CUDA, answers equal to the CPU provider's,
# P1/P2 at 32 and 128 connections and /dehaze MP/s, written to benchmarks/results/gpu_check-<time>.json.
# Within 8 minutes on a host whose package downloads are fast (the CUDA wheels are about 2 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -e /proc/driver/nvidia/version ] && ! compgen -G "/dev/nvidia[0-9]*" > /dev/null; then
  echo "gpu_check: no NVIDIA GPU on this machine (no /proc/driver/nvidia, no /dev/nvidia*): this check" \
       "measures the service on CUDA and needs one; nothing was installed or run." >&2
  exit 2
fi
make --no-print-directory SERVE_EXTRAS=serve,cuda .venv/.serve-installed-serve,cuda
exec timeout --signal=INT 420 .venv/bin/python -m benchmarks.gpu_check "$@"
