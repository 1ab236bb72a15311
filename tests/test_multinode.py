"""Several Ray nodes on this machine, worker nodes killed mid-job: ingest, training and a search go on.

The cluster is `ray.cluster_utils.Cluster`: a head node (1 logical CPU: the job drivers, Ray Train's
controllers) and worker nodes of 3 logical CPUs each, oversubscribed on purpose on a 2-core machine.
A Train worker of `train.cpus_per_worker: 2` fits a worker node once and never twice, so two Train
workers, or two trials' workers, always land on two different worker nodes.

The jobs run as their real entry points (`python -m p2es_dist.jobs.<name>`, as `ray job submit` runs
them) with RAY_ADDRESS naming the cluster. The test process only holds the cluster, never a driver of
its own, so it cannot collide with the session's `ray_local`; it kills a node with
`Cluster.remove_node` (raylet, object store and every worker of the node, at once) and finds which node
a Train worker is on from the GCS actor table. Shards, checkpoints and Tune state live in the session's
S3 store, so a lost node loses nothing.

The manual counterpart (separate `ray start` processes, `ray job submit`): cluster/local_multinode.sh.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from p2es_dist.storage import uri

pytestmark = pytest.mark.multinode

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER_CPUS = 3  # one 2-CPU Train worker per node, plus a CPU for Ray Data's and ingest's tasks
TRAIN_CPUS = 2
# The size is 20,000 windows (cluster/README.md runs that); here a tenth of it in the same number
# of tasks, so that the test stays within its share of CI on 2 cores (see the README for timings).
N_WINDOWS, SHARD_ROWS = 2_000, 200
JOB_TIMEOUT_S = 900


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


@contextmanager
def environ(**values: str) -> Iterator[None]:
    """os.environ with `values` for a block: what the cluster's processes inherit when they start."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass
class LocalCluster:
    """A `Cluster` with named nodes, in its own temp dir, and the environment jobs on it run with."""

    temp_dir: str
    address: str = ""
    cluster: object = None
    nodes: dict = field(default_factory=dict)  # name -> ray._private.node.Node, the dead ones too
    killed: set = field(default_factory=set)

    def start(self) -> None:
        import ray
        from ray.cluster_utils import Cluster

        def head(temp_dir: str):
            port = free_port()
            # Every process of the cluster inherits RAY_ADDRESS (Ray Train's helpers look the cluster up by
            # it, see jobs/common.start_local_ray).
            self.address = f"{ray.util.get_node_ip_address()}:{port}"
            with environ(RAY_ADDRESS=self.address, RAY_TMPDIR=self.temp_dir):
                self.cluster = Cluster(initialize_head=True, head_node_args=dict(
                    num_cpus=1, resources={"head": 1}, temp_dir=temp_dir, gcs_server_port=port,
                    # The dashboard serves the State API, which Ray Train's placement-group cleaner asks.
                    include_dashboard=True, dashboard_port=free_port(), dashboard_agent_listen_port=free_port(),
                    object_store_memory=200 * 1024**2,
                    # A dead node is declared dead after ~10 s instead of ~15 s. Not less: at 3 s a live node
                    # of a loaded 2-core machine (make test beside make demo) missed its heartbeats and died.
                    _system_config={"health_check_period_ms": 1000, "health_check_failure_threshold": 10}))
            return self.cluster.head_node

        self.nodes["head"] = self._start("head", head)

    def add_worker(self, name: str) -> None:
        def worker(temp_dir: str):
            with environ(RAY_ADDRESS=self.address, RAY_TMPDIR=self.temp_dir):
                return self.cluster.add_node(num_cpus=WORKER_CPUS, resources={name: 1}, temp_dir=temp_dir,
                                             object_store_memory=200 * 1024**2)

        self.nodes[name] = self._start(name, worker)

    def _start(self, name: str, start: Callable[[str], object]) -> object:
        """`start(temp dir)`, tried twice. Each node (and each try) has its own temp dir, which names its
        processes. RAY_TMPDIR keeps Ray's "current cluster" file in this cluster's folder, not in /tmp/ray
        where other Rays on the machine read it."""
        for attempt in (1, 2):
            temp_dir = os.path.join(self.temp_dir, f"{name}-{attempt}")
            try:
                return start(temp_dir)
            except Exception as exc:
                # Ray gives a raylet 30 s to register (ray/_private/node.py); a machine whose CPUs are taken by
                # other jobs can miss that once. Whatever that try started goes, then one more try.
                if "timed out during startup" not in str(exc) or attempt == 2:
                    raise
                kill_processes(temp_dir)
        raise AssertionError("unreachable")

    def alive_workers(self) -> list[str]:
        return [name for name in self.nodes if name != "head" and name not in self.killed]

    def ensure_workers(self, count: int) -> None:
        while len(self.alive_workers()) < count:
            self.add_worker(f"w{len(self.nodes) - 1}")

    def kill(self, name: str) -> None:
        """SIGKILL every process of the node: what a lost machine looks like to the rest of the cluster."""
        self.cluster.remove_node(self.nodes[name], allow_graceful=False)
        self.killed.add(name)

    def name_of(self, node_id: str) -> str:
        return next(name for name, node in self.nodes.items() if node.node_id == node_id)

    def titles_on(self, name: str) -> list[str]:
        """Process titles of the node's workers (`ray::run_task` while one runs that task)."""
        from ray._private import ray_constants

        raylet = self.nodes[name].all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        titles = []
        for child in psutil.Process(raylet).children():
            try:
                titles.append(" ".join(child.cmdline()))
            except psutil.Error:
                continue
        return titles

    def train_workers(self) -> list[dict]:
        """Ray Train's worker actors, dead ones included: {"pid", "node", "state", "start"}."""
        actors = self.cluster.global_state.actor_table(None)
        return [{"pid": a["Pid"], "node": self.name_of(a["Address"]["NodeID"]), "state": a["State"],
                 "start": a["StartTime"] / 1000} for a in actors.values() if a["ActorClassName"] == "RayTrainWorker"]

    def job(self, module: str, *args: str, log: Path) -> subprocess.Popen:
        """`python -m p2es_dist.jobs.<module> ...` as a driver on this cluster (on the head's node)."""
        env = {**os.environ, "RAY_ADDRESS": self.address, "P2ES_LOG_LEVEL": "INFO"}
        with log.open("w") as handle:  # the job writes through its own copy of the descriptor
            return subprocess.Popen([sys.executable, "-m", f"p2es_dist.jobs.{module}", *args], cwd=REPO_ROOT,
                                    env=env, stdout=handle, stderr=subprocess.STDOUT, text=True)

    def shutdown(self) -> None:
        if self.cluster is not None:
            for name in self.alive_workers():
                self.kill(name)
            self.cluster.remove_node(self.cluster.head_node, allow_graceful=False)
        kill_processes(self.temp_dir)  # anything of this cluster that outlived its node
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def kill_processes(temp_dir: str) -> None:
    """SIGKILL the processes whose command line names `temp_dir` (a node's raylet, agents, GCS) and their
    children (its workers, whose titles say `ray::...` instead), and those started with RAY_TMPDIR=`temp_dir`
    (the head's dashboard and runtime-env agents retitle themselves and outlived their node when orphaned):
    this cluster's, never another Ray's."""
    marker = f"RAY_TMPDIR={temp_dir}\0".encode()
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error, OSError):
            # The raw /proc file: psutil.environ() parses a retitled process's environment as empty.
            if temp_dir in " ".join(process.info["cmdline"] or ()) or \
                    marker in Path(f"/proc/{process.pid}/environ").read_bytes():
                for victim in [*process.children(recursive=True), process]:
                    with contextlib.suppress(psutil.Error):
                        victim.kill()


@pytest.fixture(scope="module")
def multinode_cluster(s3_store) -> Iterator[LocalCluster]:
    """Head + two worker nodes; the S3 variables are in os.environ before any node starts (s3_store)."""
    # A short path: Ray's socket paths live under it and a Unix socket path has ~107 characters at most.
    temp_dir = tempfile.mkdtemp(prefix="p2es-mn-")
    os.makedirs(os.path.join(temp_dir, "ray"))
    cluster = LocalCluster(temp_dir)
    try:
        cluster.start()
        cluster.ensure_workers(2)
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def bucket(s3_store) -> Iterator[str]:
    name = f"s3://multinode-{os.getpid()}"
    uri.ensure_bucket(name)
    yield name
    uri.rm(name, recursive=True)


def wait_for(condition: Callable[[], object], job: subprocess.Popen, log: Path, what: str,
             timeout: float = JOB_TIMEOUT_S) -> object:
    """Poll `condition` until it returns something truthy; fail when the job exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if job.poll() is not None:
            pytest.fail(f"the job exited ({job.returncode}) before {what}:\n{tail(log)}")
        time.sleep(0.3)
    job.kill()
    pytest.fail(f"timed out waiting for {what}:\n{tail(log)}")


def finish(job: subprocess.Popen, log: Path) -> dict:
    """Wait for the job; its last stdout line is its JSON summary."""
    try:
        job.wait(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        job.kill()
        pytest.fail(f"the job did not finish in {JOB_TIMEOUT_S} s:\n{tail(log)}")
    assert job.returncode == 0, tail(log)
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def tail(log: Path, n: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def s3_json(path: str) -> dict | None:
    try:
        return json.loads(uri.read_text(path))
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------------------
# ingest


@pytest.fixture(scope="module")
def ingested(multinode_cluster, bucket, tmp_path_factory) -> dict:
    """`p2es ingest` of a synthetic set; worker node w1 is killed while it runs an ingest task. Returns what
    the test checks."""
    cluster, output = multinode_cluster, f"{bucket}/synthetic"
    log = tmp_path_factory.mktemp("ingest") / "ingest.log"
    n_tasks = -(-N_WINDOWS // SHARD_ROWS)
    begin = time.monotonic()
    job = cluster.job("ingest", "--source", "synthetic", "--output", output,
                      "--set", f"synthetic.n_windows={N_WINDOWS}", "--set", "synthetic.seed=3",
                      "--set", f"ingest.shard_rows={SHARD_ROWS}", log=log)

    def markers() -> list[str]:
        return [path for work in uri.ls(f"{output}/_work", missing_ok=True)
                for path in uri.ls(work, suffix=".json", missing_ok=True) if Path(path).name.startswith("task-")]

    def running_on_w1() -> bool:
        return any("ray::run_task" in title for title in cluster.titles_on("w1"))

    wait_for(running_on_w1, job, log, "an ingest task running on w1")
    done_at_kill = len(markers())
    cluster.kill("w1")
    killed_after = time.monotonic() - begin
    summary = finish(job, log)
    return {"output": output, "summary": summary, "log": log.read_text(), "tasks": n_tasks,
            "done_at_kill": done_at_kill, "killed_after_s": killed_after, "duration_s": time.monotonic() - begin}


def test_ingest_completes_after_losing_a_worker_node(ingested):
    from p2es_dist.data.read import read_manifest, read_table

    output = ingested["output"]
    assert ingested["done_at_kill"] < ingested["tasks"], "the node was not killed mid-ingest"
    # Ray retried the task the node was running, on another node.
    assert "Task run_task failed" in ingested["log"] and "node it was running on is dead" in ingested["log"]
    manifest = read_manifest(output)
    assert sum(manifest["n_windows"].values()) == N_WINDOWS == sum(ingested["summary"]["n_windows"].values())
    assert len(manifest["shards"]) == ingested["tasks"] == ingested["summary"]["shards"]
    # Exactly the windows of the set: every row once, none twice (a retried task rewrote its own shard).
    ids = read_table([output], ["window_id"]).column("window_id").to_pylist()
    assert len(ids) == N_WINDOWS and len(set(ids)) == N_WINDOWS
    listed = sorted(Path(p).name for p in uri.ls(f"{output}/shards", suffix=".parquet"))
    assert listed == sorted(Path(s["path"]).name for s in manifest["shards"])
    print(f"ingest: {N_WINDOWS} windows in {ingested['duration_s']:.0f} s, w1 killed after "
          f"{ingested['killed_after_s']:.0f} s with {ingested['done_at_kill']}/{ingested['tasks']} tasks done")


# ---------------------------------------------------------------------------------------------------------
# training


def test_training_survives_losing_the_node_of_rank_1(multinode_cluster, ingested, bucket, tmp_path):
    """2 workers (ZeRO-2, gloo) on 2 nodes; the node of rank 1 dies after the step-10 checkpoint; a new
    node joins; Ray Train restarts the worker group from the last checkpoint and the run reaches max_steps."""
    cluster = multinode_cluster
    cluster.ensure_workers(2)
    runs, max_steps, every = f"{bucket}/runs", 20, 10
    run_uri = f"{runs}/multinode"
    log, out = tmp_path / "train.log", tmp_path / "out"
    begin = time.monotonic()
    job = cluster.job("train", "--config", "smoke", "--out", str(out),
                      "--set", f"data.uris=[{ingested['output']}]", "--set", f"train.storage_path={runs}",
                      "--set", "train.run_name=multinode", "--set", "train.num_workers=2",
                      "--set", f"train.cpus_per_worker={TRAIN_CPUS}", "--set", "train.deepspeed.zero_stage=2",
                      "--set", f"train.max_steps={max_steps}", "--set", f"train.checkpoint_every={every}",
                      "--set", f"train.eval_every={every}", "--set", "train.val_batches=1",
                      "--set", "train.max_failures=2", log=log)

    def latest_step() -> int:
        snapshot = s3_json(f"{run_uri}/checkpoint_manager_snapshot.json") or {}
        return int(((snapshot.get("latest_checkpoint_result") or {}).get("metrics") or {}).get("step", 0))

    step_at_kill = wait_for(latest_step, job, log, "the first checkpoint")
    checkpointed_after = time.monotonic() - begin
    attempts = uri.ls(f"{run_uri}/attempts", suffix=".json")
    assert len(attempts) == 1
    rank0_pid = s3_json(attempts[0])["pid"]
    alive = [w for w in cluster.train_workers() if w["state"] == "ALIVE"]
    assert len(alive) == 2 and len({w["node"] for w in alive}) == 2, alive  # one worker per node
    assert "head" not in {w["node"] for w in alive}
    rank1_node = next(w["node"] for w in alive if w["pid"] != rank0_pid)
    assert any(w["pid"] == rank0_pid for w in alive)
    cluster.kill(rank1_node)
    killed_at = time.time()
    cluster.ensure_workers(2)  # the replacement node
    summary = finish(job, log)
    duration = time.monotonic() - begin

    assert summary["steps"] == max_steps and summary["failures"] == 1
    restored = summary["restored_from_step"]
    assert restored % every == 0 and step_at_kill <= restored < max_steps, (restored, step_at_kill)
    assert summary["checkpoint"].startswith(f"{run_uri}/") and summary["weights"].startswith("s3://")
    # The restarted group ran on the surviving worker node and the replacement, never on the dead one.
    restarted = {w["node"] for w in cluster.train_workers() if w["start"] > killed_at}
    assert restarted == set(cluster.alive_workers()), restarted
    print(f"train: {rank1_node} (rank 1) killed at checkpoint step {step_at_kill} after {checkpointed_after:.0f} s; "
          f"resumed from step {restored}, {summary['steps']} steps, {summary['failures']} failure, {duration:.0f} s")


# ---------------------------------------------------------------------------------------------------------
# tune


SPACE = """\
tune:
  num_samples: 1
  max_concurrent_trials: 2
  metric: val_x0_mse
  mode: min
  scheduler: fifo
  search_alg: random
  seed: 0
train.lr: {grid: [1.0e-3, 2.0e-3]}
"""


def test_tune_trials_run_on_different_nodes(multinode_cluster, ingested, bucket, tmp_path):
    """Two trials at once, each one 2-CPU Train worker: no worker node holds both."""
    cluster = multinode_cluster
    cluster.ensure_workers(2)
    space, log, out = tmp_path / "space.yaml", tmp_path / "tune.log", tmp_path / "out"
    space.write_text(SPACE)
    job = cluster.job("tune", "--space", str(space), "--config", "smoke", "--out", str(out),
                      "--set", f"data.uris=[{ingested['output']}]", "--set", f"train.storage_path={bucket}/tune",
                      "--set", f"train.cpus_per_worker={TRAIN_CPUS}", "--set", "train.max_steps=5",
                      "--set", "train.eval_every=5", "--set", "train.checkpoint_every=5",
                      "--set", "train.val_batches=1", log=log)
    finish(job, log)
    best = json.loads((out / "best.json").read_text())
    assert best["trials"] == 2 and best["trials_failed"] == 0
    assert best["experiment_path"].startswith(f"{bucket}/tune/")
    # Each trial's rank 0 leaves its pid in its Train run's folder; the actor table says on which node it ran.
    workers = cluster.train_workers()
    nodes = {}
    for trial in best["all_trials"]:
        markers = uri.ls(f"{best['experiment_path']}/train-{trial['trial_id']}/attempts", suffix=".json")
        pids = {s3_json(marker)["pid"] for marker in markers}
        nodes[trial["trial_id"]] = {w["node"] for w in workers if w["pid"] in pids}
    assert all(len(where) == 1 for where in nodes.values()), nodes
    placed = [next(iter(where)) for where in nodes.values()]
    assert len(set(placed)) == 2 and "head" not in placed, nodes
    print(f"tune: trials ran on {nodes}")
