#!/usr/bin/env bash
# Autoscaling checked on this machine: a head of 1 CPU with cluster/local_autoscale.yaml (Ray's fake
# multi-node provider, 0-2 worker nodes of 2 CPUs); `p2es ingest` of N_WINDOWS synthetic windows asks for
# more CPUs than the head has, the autoscaler starts worker nodes, the ingest finishes on them, and once
# they are idle for 15 s the autoscaler stops them again. `ray status` is printed at each stage.
#
#   cluster/local_autoscale.sh               # N_WINDOWS=8000 (8 tasks of 1 CPU)
#
# Only this script's processes are stopped at the end (found by its work dir, as in local_multinode.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && source .venv/bin/activate
N_WINDOWS=${N_WINDOWS:-8000}
WORK=$(mktemp -d /tmp/p2es-las-XXXXXX)
export RAY_TMPDIR=$WORK  # `ray start` writes its "current cluster" file here, not in /tmp/ray
# Token authentication with this run's own token (not ~/.ray/auth_token, which other Rays on the machine
# share): every node, `ray job submit` and the checks below read it from the environment.
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(32))')
T0=$(date +%s)

log() { echo "[$(($(date +%s) - T0)) s] $*" >&2; }
free_port() { python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }
teardown() {
  local pids
  pids=$(pgrep -f -- "$WORK/" || true)  # the head's processes and the nodes the autoscaler started
  for pid in $pids; do pkill -KILL -P "$pid" 2>/dev/null || true; done
  [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap teardown EXIT
workers() {  # active worker nodes, from the "Active:" block of `ray status`
  ray status --address "$RAY_ADDRESS" 2>/dev/null \
    | awk '/^Active:/ {a = 1; next} /^Pending:/ {a = 0} a && /ray.worker.cpu/ {n += $1} END {print n + 0}'
}
wait_for() {  # $1: what, $2: command that succeeds when it is so
  local deadline=$(($(date +%s) + 600))
  until eval "$2"; do
    [ "$(date +%s)" -lt "$deadline" ] || { log "timed out waiting for $1"; exit 1; }
    sleep 1
  done
}

GCS_PORT=$(free_port)
export RAY_ADDRESS=$(python -c 'import ray; print(ray.util.get_node_ip_address())'):$GCS_PORT
python - cluster/local_autoscale.yaml "$WORK/autoscale.yaml" "$RAY_ADDRESS" <<'EOF'
import sys, yaml
config = yaml.safe_load(open(sys.argv[1]))
config["provider"]["gcs_address"] = sys.argv[3]
yaml.safe_dump(config, open(sys.argv[2], "w"))
EOF
RAY_FAKE_CLUSTER=1 AUTOSCALER_UPDATE_INTERVAL_S=1 ray start --head --temp-dir "$WORK/head" --port "$GCS_PORT" \
  --num-cpus 1 --autoscaling-config "$WORK/autoscale.yaml" --include-dashboard false \
  --ray-client-server-port "$(free_port)" --dashboard-agent-listen-port "$(free_port)" \
  --metrics-export-port "$(free_port)" --disable-usage-stats >"$WORK/head.log" 2>&1
log "head started; worker nodes: $(workers)"
ray status --address "$RAY_ADDRESS"

START=$(date +%s)
python -m p2es_dist.jobs.ingest --source synthetic --output "$WORK/shards" --set synthetic.n_windows="$N_WINDOWS" \
  --set ingest.shard_rows=1000 >"$WORK/ingest.log" 2>&1 &
INGEST=$!
wait_for "worker nodes to be added" '[ "$(workers)" -ge 1 ]'
log "scaled up while the ingest runs:"
ray status --address "$RAY_ADDRESS"
wait "$INGEST" || { tail -n 30 "$WORK/ingest.log"; exit 1; }
log "ingest done in $(($(date +%s) - START)) s: $(tail -n 1 "$WORK/ingest.log")"
ray status --address "$RAY_ADDRESS"
wait_for "idle worker nodes to be removed" '[ "$(workers)" -eq 0 ]'
log "scaled down:"
ray status --address "$RAY_ADDRESS"
