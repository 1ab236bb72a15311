"""Faults: stable run names and resumption, storage retries, one-line errors, one Ray per job on a shared machine."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from p2es_dist.config import load_config
from p2es_dist.errors import UserError
from p2es_dist.storage import uri
from p2es_dist.train.config import parse_job_config
from p2es_dist.train.trainer import fit_with_storage_retries, run_name

REPO_ROOT = Path(__file__).resolve().parents[1]
RAY_CONFUSION = ("multiple active Ray instances", "Failed to query")


def job(*overrides: str, storage: Path | None = None):
    extra = [f"train.storage_path={storage}"] if storage else []
    return parse_job_config(load_config("smoke", ["data.uris=[/data/syn]", *extra, *overrides]))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- run names -----------------------------------------------------------------------------------------------


def test_the_same_command_gets_the_same_run_name_and_another_config_another(tmp_path):
    out = str(tmp_path / "out")
    name = run_name(job(), out=out)
    assert name.startswith("p2es-") and name == run_name(job(), out=out)
    # Written differently, the same run: a default spelled out, where the run lives, how failures are handled.
    assert run_name(job("train.seed=0", "train.max_failures=4", "train.storage_path=/elsewhere"), out=out) == name
    assert run_name(job(), out=str(tmp_path / "out" / ".." / "out")) == name
    # What is trained, or where its result goes, changes the name.
    assert run_name(job("train.lr=0.002"), out=out) != name
    assert run_name(job("model.dilation_depth=2"), out=out) != name
    assert run_name(job("data.uris=[/data/other]"), out=out) != name
    assert run_name(job(), out=str(tmp_path / "other")) != name


def test_fresh_gives_a_new_name_and_refuses_a_fixed_one(tmp_path):
    out = str(tmp_path / "out")
    stable = run_name(job(), out=out)
    first, second = run_name(job(), out=out, fresh=True), run_name(job(), out=out, fresh=True)
    assert len({stable, first, second}) == 3 and first.startswith(stable)
    assert run_name(job("train.run_name=mine"), out=out) == "mine"
    with pytest.raises(UserError, match="--fresh .* train.run_name=mine"):
        run_name(job("train.run_name=mine"), out=out, fresh=True)


def test_train_cli_rejects_fresh_with_a_fixed_name_before_ray_starts(capsys):
    from p2es_dist.cli import main

    assert main(["train", "--config", "smoke", "--set", "train.run_name=mine", "--fresh"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--fresh" in err and "Traceback" not in err


# --- retries of a run whose storage failed -----------------------------------------------------------------


def controller_error(text: str):
    from ray.train import ControllerError

    return ControllerError(OSError(text))


UNREACHABLE = "When uploading 'checkpoint_manager_snapshot.json': AWS Error NETWORK_CONNECTION during PutObject " \
              "operation: curlCode: 7, Couldn't connect to server"


def test_a_storage_failure_is_fitted_again_and_resumes_from_the_snapshot(tmp_path, capsys):
    """The first fit dies on an unreachable store after checkpointing step 3; the second one resumes."""
    spec = job("train.storage_retry_delay_s=5", storage=tmp_path / "runs")
    name = run_name(spec, out=None)
    calls, sleeps = [], []

    def fit():
        calls.append(1)
        if len(calls) == 1:
            snapshot = tmp_path / "runs" / name / "checkpoint_manager_snapshot.json"
            snapshot.parent.mkdir(parents=True)
            snapshot.write_text(json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "step-00000003",
                                                                         "metrics": {"step": 3}}}))
            raise controller_error(UNREACHABLE)
        return "result"

    assert fit_with_storage_retries(fit, spec, name, sleep=sleeps.append) == "result"
    assert len(calls) == 2 and sleeps == [5.0]
    err = capsys.readouterr().err
    assert f"starting run {name}" in err and f"resuming run {name} from step 3" in err


def test_storage_retries_run_out_into_one_line_and_other_failures_are_not_retried(monkeypatch):
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from p2es_dist.train import trainer

    spec = job("train.storage_retries=2", "train.storage_retry_delay_s=1", "train.storage_path=s3://p2es-runs/x")
    monkeypatch.setattr(trainer, "resumable_step", lambda job, name: None)  # no store to ask here
    sleeps = []

    def down():
        raise controller_error(UNREACHABLE)

    with pytest.raises(UserError) as caught:
        fit_with_storage_retries(down, spec, "r", sleep=sleeps.append)
    message = str(caught.value)
    assert sleeps == [1.0, 2.0] and "\n" not in message
    assert "after 2 storage retries" in message and "s3://p2es-runs/x/r: cannot reach S3 endpoint" in message

    bug = ValueError("shapes (8, 3) and (4,) do not align")
    worker = UserExceptionWithTraceback(bug, f"Traceback (most recent call last):\n  ...\nValueError: {bug}")
    sleeps.clear()

    def broken():
        raise WorkerGroupError("worker 1 failed", {1: worker})

    with pytest.raises(UserError, match=r"stopped: ValueError: shapes \(8, 3\) and \(4,\) do not align") as caught:
        fit_with_storage_retries(broken, spec, "r", sleep=sleeps.append)
    assert sleeps == [] and "\n" not in str(caught.value)


# --- one-line errors -------------------------------------------------------------------------------------------


def run_failing(error: BaseException, tmp_path, monkeypatch, capsys) -> tuple[int, str]:
    from p2es_dist.cli import run_main

    monkeypatch.setenv("P2ES_LOG_DIR", str(tmp_path / "logs"))

    def entry(argv):
        raise error

    code = run_main(entry, [], prog="p2es train")
    return code, capsys.readouterr().err


def test_a_nested_ray_error_prints_its_root_cause_in_one_line_with_the_log_path(tmp_path, monkeypatch, capsys):
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError

    code, err = run_failing(ControllerError(OSError(UNREACHABLE)), tmp_path, monkeypatch, capsys)
    logs = list((tmp_path / "logs").glob("p2es-train-*.log"))
    assert code == 1 and err.count("\n") == 1 and len(logs) == 1
    assert err.startswith("p2es train: error: OSError: When uploading") and f"(full traceback: {logs[0]})" in err
    assert "ControllerError" in logs[0].read_text() and "Root cause" in logs[0].read_text()

    # A task's UserError (as ingest's tasks raise them) is one line without the remote traceback around it.
    remote = "Traceback (most recent call last):\n  File \"ingest.py\", line 1, in run_task\n" * 20
    cause = uri.UnreachableError("s3://p2es/bidmc: cannot reach S3 endpoint http://127.0.0.1:8333")
    wrapped = RayTaskError("run_task", remote, cause).as_instanceof_cause()
    assert isinstance(wrapped, UserError) and str(wrapped).count("\n") > 20
    code, err = run_failing(wrapped, tmp_path, monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"p2es train: error: {cause} (full traceback: {tmp_path / 'logs'}")


def test_a_plain_user_error_stays_one_line_without_a_log(tmp_path, monkeypatch, capsys):
    code, err = run_failing(UserError("data.uris: expected a list"), tmp_path, monkeypatch, capsys)
    assert (code, err) == (2, "p2es train: error: data.uris: expected a list\n")
    assert not (tmp_path / "logs").exists()


# --- S3 retries ------------------------------------------------------------------------------------------------


@pytest.fixture
def busy_endpoint(monkeypatch):
    """An S3 endpoint that answers every request with 503 Service Unavailable, and the requests it got."""
    hits: list[str] = []

    class Busy(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            hits.append(self.command)
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = b"<Error><Code>ServiceUnavailable</Code><Message>busy</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_PUT = do_HEAD = do_POST = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "P2ESTESTKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "P2ESTESTSECRET")
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()


@pytest.mark.slow
def test_s3_clients_retry_a_busy_store(busy_endpoint, monkeypatch):
    import botocore.retries.standard

    endpoint, hits = busy_endpoint
    fs, _ = uri.filesystem("s3://bucket/x", endpoint_url=endpoint)
    fs.connect()
    assert fs.s3.meta.config.retries == {"total_max_attempts": uri.S3_RETRY_ATTEMPTS, "mode": "standard"}
    # The client actually makes that many attempts (backoff waits removed: the count is the point).
    monkeypatch.setattr(botocore.retries.standard.ExponentialBackoff, "delay_amount", lambda self, context: 0)
    with pytest.raises(UserError) as caught:
        uri.read_bytes("s3://bucket/x", endpoint_url=endpoint)
    assert len(hits) == uri.S3_RETRY_ATTEMPTS == 5 and uri.is_transient(caught.value)

    hits.clear()
    filesystem, path = uri.pyarrow_filesystem("s3://bucket/x", endpoint_url=endpoint)
    with pytest.raises(OSError) as caught:
        filesystem.get_file_info(path)
    assert len(hits) == uri.S3_RETRY_ATTEMPTS and uri.is_transient(caught.value)


def test_which_storage_errors_are_worth_retrying():
    assert uri.is_transient(OSError(UNREACHABLE))
    assert uri.is_transient(uri.UnreachableError("s3://b: cannot reach"))
    assert not uri.is_transient(uri.MissingObjectError("s3://b/x: no such file or object"))
    assert not uri.is_transient(OSError("AWS Error ACCESS_DENIED during PutObject operation"))
    assert not uri.is_transient(ValueError("timed out"))  # not a storage error


# --- isolation from another Ray on the machine -------------------------------------------------------------


def processes_of(marker: str) -> set[int]:
    """Processes whose command line names `marker`, and their descendants (the ones this module started)."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry)] = (parent, command)
    found = {pid for pid, (_, command) in table.items() if marker in command and pid != os.getpid()}
    grown = True
    while grown:
        children = {pid for pid, (parent, _) in table.items() if parent in found} - found
        found |= children
        grown = bool(children)
    return found


@pytest.fixture(scope="module")
def second_ray():
    """Another Ray on this machine, as `ray start --head` leaves one: stopped (only it) afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="p2es-2nd-")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={free_port()}",
               f"--temp-dir={temp_dir}", f"--dashboard-port={free_port()}", "--num-cpus=1", "--disable-usage-stats"]
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=300)
    yield temp_dir
    # Not `ray stop`: it stops every Ray on the machine.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_of(temp_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        time.sleep(3)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.ray
def test_a_training_job_beside_another_ray_uses_its_own(second_ray, smoke_shards, tmp_path):
    """`p2es train` starts its own Ray while another runs: Ray Train's placement-group cleaner must query
    that instance, not find several and fail (or remove the live run's placement group)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["P2ES_LOG_DIR"] = str(tmp_path / "logs")
    command = [sys.executable, "-m", "p2es_dist.cli", "train", "--config", "smoke", "--out", str(tmp_path / "out"),
               "--set", f"data.uris=[{smoke_shards}]", "--set", f"train.storage_path={tmp_path / 'runs'}",
               "--set", "train.max_steps=4", "--set", "train.checkpoint_every=2", "--set", "train.eval_every=2"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert not [text for text in RAY_CONFUSION if text in output], output[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 4 and Path(summary["weights"]).is_file()
    name = Path(summary["run"]).name
    assert f"starting run {name}" in done.stderr

    # The same command again resumes that run (finished: nothing left to train) rather than starting over.
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert f"resuming run {name} from step 4" in again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["checkpoint"] == summary["checkpoint"]


@pytest.fixture(scope="module")
def smoke_shards(ray_local, tmp_path_factory):
    from p2es_dist.data.ingest import run_ingest

    output = str(tmp_path_factory.mktemp("faults") / "syn")
    run_ingest("synthetic", None, output, {"ingest": {"shard_rows": 512}, "synthetic": {"n_windows": 600, "seed": 2}})
    return output


@pytest.mark.ray
def test_the_session_ray_answers_the_state_api_beside_another(second_ray, ray_local):
    """What the cleaner does, from here: RAY_ADDRESS names this instance, whose State API knows its actors."""
    import ray
    from ray.util.state import get_actor

    assert os.environ["RAY_ADDRESS"] == ray.get_runtime_context().gcs_address

    @ray.remote(num_cpus=0)
    class Probe:
        def actor_id(self) -> str:
            return ray.get_runtime_context().get_actor_id()

    probe = Probe.remote()
    actor_id = ray.get(probe.actor_id.remote())
    state = get_actor(actor_id, timeout=30)
    assert state is not None and state.state == "ALIVE"
    ray.kill(probe)


def test_tune_summary_counts_retried_trials():
    from types import SimpleNamespace

    from p2es_dist.tune.search import TrialRecord, _CountRetries, summarise
    from p2es_dist.tune.spaces import TuneSettings

    counter = _CountRetries()
    for trial_id in ("a", "a", "b"):  # Tune restarted `a` twice and `b` once; `b` failed for good anyway
        counter.on_trial_recover(iteration=1, trials=[], trial=SimpleNamespace(trial_id=trial_id))
    trials = [TrialRecord("a", {}, [{"val_x0_mse": 0.2}]), TrialRecord("b", {}, [], error="OSError: store down"),
              TrialRecord("c", {}, [{"val_x0_mse": 0.3}])]
    best = summarise(trials, settings=TuneSettings(), base_config={}, searched_keys=[],
                     storage_root="/tmp", experiment_uri="/tmp/x", retries=counter.retries)
    assert (best["trials_failed"], best["trials_retried"], best["trial_retries"]) == (1, 2, 3)
    assert [t["retries"] for t in best["all_trials"]] == [2, 1, 0]
