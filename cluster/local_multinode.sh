#!/usr/bin/env bash
# A 3-node Ray cluster on this machine (`ray start --head` + 2 x `ray start --address`, each node with its own
# --temp-dir, ports and custom resource), jobs sent with `ray job submit`, worker nodes killed mid-job:
#
#   1. `p2es ingest` of N_WINDOWS synthetic windows; the raylet of w1 is killed while it runs an ingest task;
#      the ingest completes, and the manifest and the shards hold every window exactly once;
#   2. a replacement node w3 joins; `p2es train` (smoke config, 2 workers of 2 CPUs: one per worker node,
#      ZeRO-2 on CPU/gloo, checkpoints in S3); after the step-10 checkpoint the raylet of the node of rank 1
#      is killed and a replacement node w4 joins; Ray Train restarts the worker group from the checkpoint.
#
# Usage (from anywhere; it runs in the repository root):
#   cluster/local_multinode.sh                     # N_WINDOWS=20000 MAX_STEPS=30
#   N_WINDOWS=2000 KEEP=1 cluster/local_multinode.sh
#
# S3 is the repository's embedded store (`p2es objectstore`), started in the work dir on a free port, so a
# lost node loses nothing. Teardown touches only this script's processes: those whose command line names its
# work dir (every Ray process of its nodes does, through --temp-dir) and their children. Never `ray stop`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && source .venv/bin/activate  # the nodes, hence the jobs, inherit this PATH
N_WINDOWS=${N_WINDOWS:-20000}
MAX_STEPS=${MAX_STEPS:-30}
WORK=$(mktemp -d /tmp/p2es-lmn-XXXXXX)  # short: Ray's Unix socket paths live under it
export RAY_TMPDIR=$WORK                 # `ray start` writes its "current cluster" file here, not in /tmp/ray
# Token authentication with this run's own token (not ~/.ray/auth_token, which other Rays on the machine
# share): every node, `ray job submit` and the checks below read it from the environment.
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(32))')
BUCKET=s3://p2es-local
T0=$(date +%s)

log() { echo "[$(($(date +%s) - T0)) s] $*" >&2; }
free_port() { python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }
node_pids() { pgrep -f -- "$WORK/$1/" || true; }  # every process of node $1 (raylet, agents, GCS, dashboard)
raylet_of() { pgrep -f -- "raylet.*$WORK/$1/" | head -n 1; }

teardown() {
  local pids
  pids=$(pgrep -f -- "$WORK/(head|w[0-9]+)/" || true)
  for pid in $pids; do pkill -KILL -P "$pid" 2>/dev/null || true; done  # their workers (titled ray::...)
  [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
  python -m p2es_dist.storage.objectstore stop --dir "$WORK/s3" >/dev/null 2>&1 || true
  if [ "${KEEP:-0}" = 1 ]; then log "kept $WORK (logs: $WORK/<node>/session_latest/logs)"; else rm -rf "$WORK"; fi
}
trap teardown EXIT

eval "$(python -m p2es_dist.storage.objectstore start --dir "$WORK/s3" --port 0 | grep '^export')"
log "object store at $AWS_ENDPOINT_URL"

GCS_PORT=$(free_port); DASH_PORT=$(free_port)
ray start --head --temp-dir "$WORK/head" --port "$GCS_PORT" --num-cpus 1 --resources '{"head": 1}' \
  --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" \
  --ray-client-server-port "$(free_port)" --dashboard-agent-listen-port "$(free_port)" \
  --metrics-export-port "$(free_port)" --disable-usage-stats >"$WORK/head.log" 2>&1
export RAY_ADDRESS=$(python -c 'import ray; print(ray.util.get_node_ip_address())'):$GCS_PORT

add_worker() {  # a node of 3 logical CPUs: one 2-CPU Train worker fits, two never do
  ray start --address "$RAY_ADDRESS" --temp-dir "$WORK/$1" --num-cpus 3 --resources "{\"$1\": 1}" \
    --dashboard-agent-listen-port "$(free_port)" --metrics-export-port "$(free_port)" \
    --disable-usage-stats >"$WORK/$1.log" 2>&1
  log "node $1 started"
}
add_worker w1
add_worker w2
# No env_vars in a --runtime-env-json here: the drivers inherit the S3 variables from the head node, and
# `connect_ray` refuses a job runtime env that sets AWS_ENDPOINT_URL too (see cluster/README.md).
JOBS=(ray job submit --address "http://127.0.0.1:$DASH_PORT" --working-dir . --no-wait)

job_status() {  # $1: submission id -> PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED
  python -c "import sys; from ray.job_submission import JobSubmissionClient
print(JobSubmissionClient('http://127.0.0.1:$DASH_PORT').get_job_status(sys.argv[1]).value)" "$1"
}
job_failed() {  # $1: submission id; true (after printing its log's end) when it failed or was stopped
  case $(job_status "$1") in
    FAILED|STOPPED) ray job logs --address "http://127.0.0.1:$DASH_PORT" "$1" | tail -n 40; return 0 ;;
  esac
  return 1
}
wait_job() {  # $1: submission id; exits the script unless the job succeeds
  local status
  until status=$(job_status "$1"); [ "$status" = SUCCEEDED ]; do
    if job_failed "$1"; then log "$1 did not succeed"; exit 1; fi
    sleep 2
  done
}

wait_for() {  # $1: what, $2: command that succeeds when it is so, $3: the job that must not fail meanwhile
  local deadline=$(($(date +%s) + 900)) polls=0
  until eval "$2"; do
    [ "$(date +%s)" -lt "$deadline" ] || { log "timed out waiting for $1"; exit 1; }
    polls=$((polls + 1))
    if [ $((polls % 20)) = 0 ] && [ "$(job_status "$3")" != RUNNING ] && [ "$(job_status "$3")" != PENDING ]; then
      log "$3 ended before $1"; exit 1
    fi
    sleep 0.3
  done
}

# --- 1. ingest, w1 lost mid-ingest ---------------------------------------------------------------------------
INGEST_ID=ingest-$$; START=$(date +%s)
"${JOBS[@]}" --submission-id "$INGEST_ID" -- python -m p2es_dist.jobs.ingest --source synthetic \
  --output "$BUCKET/synthetic" --set synthetic.n_windows="$N_WINDOWS" >/dev/null
W1=$(raylet_of w1)
wait_for "an ingest task on w1" 'pgrep -P "$W1" -f "ray::run_task" >/dev/null' "$INGEST_ID"
kill -KILL "$W1"; log "killed the raylet of w1 (pid $W1) while it ran an ingest task"
wait_job "$INGEST_ID"
log "ingest done in $(($(date +%s) - START)) s"
python - "$BUCKET/synthetic" "$N_WINDOWS" <<'EOF'
import sys
from p2es_dist.data.read import read_manifest, read_table
folder, expected = sys.argv[1], int(sys.argv[2])
ids = read_table([folder], ["window_id"]).column("window_id").to_pylist()
rows = sum(read_manifest(folder)["n_windows"].values())
print(f"ingest: manifest {rows} windows, shards {len(ids)} rows, {len(set(ids))} distinct window ids")
assert rows == len(ids) == len(set(ids)) == expected, "rows lost or duplicated"
EOF
kill -KILL $(node_pids w1) 2>/dev/null || true  # what is left of w1 (agents that outlived their raylet)

# --- 2. training, the node of rank 1 lost mid-run ------------------------------------------------------------
add_worker w3
TRAIN_ID=train-$$; RUN=$BUCKET/runs/local-multinode; START=$(date +%s)
"${JOBS[@]}" --submission-id "$TRAIN_ID" -- python -m p2es_dist.jobs.train --config smoke \
  --out "$WORK/out/train" --set "data.uris=[$BUCKET/synthetic]" --set "train.storage_path=$BUCKET/runs" \
  --set train.run_name=local-multinode --set train.num_workers=2 --set train.cpus_per_worker=2 \
  --set train.deepspeed.zero_stage=2 --set train.max_steps="$MAX_STEPS" --set train.checkpoint_every=10 \
  --set train.eval_every=10 --set train.val_batches=1 --set train.max_failures=2 >/dev/null
checkpointed() { python -c "import json, sys; from p2es_dist.storage import uri
s = json.loads(uri.read_text('$RUN/checkpoint_manager_snapshot.json'))
sys.exit(0 if s['latest_checkpoint_result']['metrics']['step'] >= 10 else 1)" 2>/dev/null; }
wait_for "the step-10 checkpoint" checkpointed "$TRAIN_ID"
# Rank 0 writes its pid into the run's attempt marker; rank 1 is the other Train worker.
RANK0=$(python -c "import json; from p2es_dist.storage import uri
print(json.loads(uri.read_text(uri.ls('$RUN/attempts', suffix='.json')[0]))['pid'])")
VICTIM=""
for node in w2 w3; do
  for pid in $(pgrep -P "$(raylet_of $node)" -f RayTrainWorker || true); do
    [ "$pid" != "$RANK0" ] && VICTIM=$node
  done
done
[ -n "$VICTIM" ] || { log "no rank-1 Train worker found on w2 or w3"; exit 1; }
kill -KILL "$(raylet_of "$VICTIM")"; log "killed the raylet of $VICTIM, the node of rank 1 (rank 0 is pid $RANK0)"
add_worker w4  # the replacement the restarted worker group lands on
wait_job "$TRAIN_ID"
log "training done in $(($(date +%s) - START)) s"
python -c "import json; r = json.load(open('$WORK/out/train/result.json'))
print('train:', {k: r[k] for k in ('steps', 'restored_from_step', 'failures', 'checkpoint')})
assert r['steps'] == $MAX_STEPS and r['failures'] >= 1 and r['checkpoint'].startswith('s3://')"
log "all done"
