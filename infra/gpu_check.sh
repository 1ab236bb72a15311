#!/usr/bin/env bash
# One-command GPU readiness check (docs/GPU.md): PASS/FAIL per check, exit 1 on any failure, 2 without CUDA.
#   infra/gpu_check.sh [--work DIR] [--timeout SECONDS]
# Uses the repository's .venv when there is one, else the python on PATH (with p2es_dist installed).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="python3"
if [[ -x "$root/.venv/bin/python" ]]; then
  python="$root/.venv/bin/python"
fi
exec "$python" -m p2es_dist.bench.gpu_check "$@"
