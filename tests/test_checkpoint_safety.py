"""Loading never runs code from a file: training checkpoints (manifest + weights-only) and bundle SHA256SUMS.

The training checkpoints are written by the real save path (`engine.save_training_checkpoint`, what every
Ray Train worker calls) around a tiny DeepSpeed engine on CPU (gloo, one rank, in this process).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

from p2es_dist.errors import UserError
from p2es_dist.models import checkpoint as ckpt
from p2es_dist.storage import uri as uri_lib
from p2es_dist.train.checkpoint_manifest import manifest_name, sha256_file, verify_manifest
from p2es_dist.train.config import TrainSection

MODEL_STATES = "checkpoint/mp_rank_00_model_states.pt"
OPTIM_STATES = "checkpoint/zero_pp_rank_0_mp_rank_00_optim_states.pt"


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        value = ((self.layer(batch["x"]) - 1.0) ** 2).mean()
        return value, {"mse": value.detach()}


class Payload:
    """Unpickling this runs `exec`: what an attacker would write over a checkpoint file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


@pytest.fixture(scope="module")
def one_rank_group():
    """DeepSpeed initialises torch.distributed from these (one rank, gloo on CPU) on its first engine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": str(port)}.items():
            mp.setenv(name, value)
        yield


def make_engine(stage: int, seed: int):
    from p2es_dist.train.engine import build_engine

    train = TrainSection(max_steps=10, warmup_steps=1, precision="fp32")
    train.deepspeed.zero_stage = stage
    torch.manual_seed(seed)
    return build_engine(Tiny(), train, batch_size=4)


def train_steps(engine, steps: int, seed: int = 7) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss, _ = engine({"x": torch.randn(4, 3, generator=generator)})
        engine.backward(loss)
        engine.step()


def weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.model.state_dict().items()}


def saved_checkpoint(folder: Path, stage: int):
    """An engine trained 3 steps and its checkpoint, as a worker saves it (rank 0 of 1)."""
    from p2es_dist.train.engine import save_training_checkpoint

    engine = make_engine(stage, seed=0)
    train_steps(engine, 3)
    save_training_checkpoint(engine, folder, step=3, rank=0, world_size=1, train_state={"step": 3})
    return engine


def rewrite_manifest(folder: Path) -> None:
    """An attacker who can write the whole folder also re-hashes the manifest."""
    path = folder / manifest_name(0)
    manifest = json.loads(path.read_text())
    manifest["files"] = {rel: sha256_file(folder / rel) for rel in manifest["files"]}
    path.write_text(json.dumps(manifest))


# --- training checkpoints ---------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [0, 1])
def test_untampered_checkpoint_resumes_with_identical_weights(one_rank_group, tmp_path, stage):
    from p2es_dist.train.engine import consolidated_state_dict, load_training_checkpoint

    folder = tmp_path / "step-00000003"
    original = saved_checkpoint(folder, stage)
    listed = verify_manifest(folder)
    assert MODEL_STATES in listed and "latest" in listed and "train_state.json" in listed
    assert (OPTIM_STATES in listed) == (stage > 0)

    resumed = make_engine(stage, seed=1)  # other initial weights: the load must replace every one
    assert not torch.equal(weights(resumed)["layer.weight"], weights(original)["layer.weight"])
    assert load_training_checkpoint(resumed, folder) == 3
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # the override ends with the load
    for name, value in weights(original).items():
        assert torch.equal(weights(resumed)[name], value), name
    # Optimizer and LR schedule came back too: one more identical step keeps the weights identical.
    train_steps(original, 1, seed=11)
    train_steps(resumed, 1, seed=11)
    for name, value in weights(original).items():
        assert torch.equal(weights(resumed)[name], value), name
    consolidated = consolidated_state_dict(folder, stage)
    assert set(consolidated) == {"layer.weight", "layer.bias"}
    # `original` has moved one step on since the save; compare with the weights the checkpoint holds.
    fresh = make_engine(stage, seed=2)
    load_training_checkpoint(fresh, folder)
    for name, value in weights(fresh).items():
        assert torch.equal(consolidated[name], value), name


@pytest.mark.parametrize(("stage", "victim"), [(0, MODEL_STATES), (1, OPTIM_STATES)])
def test_malicious_pickle_is_refused_and_never_runs(one_rank_group, tmp_path, stage, victim):
    from p2es_dist.train.engine import consolidated_state_dict, load_training_checkpoint

    # The payload is live: an ordinary (unsafe) torch.load runs it.
    probe = tmp_path / "probe"
    torch.save(Payload(probe), tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe.read_text() == "code ran"

    folder = tmp_path / "step-00000003"
    saved_checkpoint(folder, stage)
    marker = tmp_path / "marker"
    torch.save(Payload(marker), folder / victim)
    engine = make_engine(stage, seed=1)

    # The manifest refuses the changed file before anything is unpickled...
    with pytest.raises(UserError, match=f"{victim}: sha256 does not match the checkpoint manifest"):
        load_training_checkpoint(engine, folder)
    with pytest.raises(UserError, match=f"{victim}: sha256 does not match"):
        consolidated_state_dict(folder, stage)
    assert not marker.exists()

    # ...and with the manifest forged to match, weights-only unpickling still refuses it.
    rewrite_manifest(folder)
    with pytest.raises(UserError, match=f"{victim}: holds objects other than tensors"):
        load_training_checkpoint(engine, folder)
    with pytest.raises(UserError, match="objects other than tensors"):
        consolidated_state_dict(folder, stage)
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None


def test_manifest_detects_a_changed_byte_and_any_unlisted_file(one_rank_group, tmp_path):
    folder = tmp_path / "step-00000003"
    saved_checkpoint(folder, 0)
    victim = folder / MODEL_STATES
    data = bytearray(victim.read_bytes())
    original = bytes(data)
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"{MODEL_STATES}: sha256 does not match the checkpoint manifest"):
        verify_manifest(folder)
    victim.write_bytes(original)
    verify_manifest(folder)

    (folder / "checkpoint" / "extra.pt").write_bytes(b"x")  # a file no rank wrote
    with pytest.raises(UserError, match="checkpoint/extra.pt: not listed in the checkpoint manifest"):
        verify_manifest(folder)
    (folder / "checkpoint" / "extra.pt").unlink()

    # What `p2es train` exports beside a finished checkpoint is safetensors and JSON: allowed.
    (folder / "model.json").write_text("{}")
    verify_manifest(folder)

    (folder / "latest").unlink()
    with pytest.raises(UserError, match="latest: listed in the checkpoint manifest but missing"):
        verify_manifest(folder)


def test_manifest_refuses_links_paths_outside_and_missing_ranks(one_rank_group, tmp_path):
    folder = tmp_path / "step-00000003"
    saved_checkpoint(folder, 0)
    manifest_path = folder / manifest_name(0)
    manifest = json.loads(manifest_path.read_text())

    (folder / "checkpoint" / "link.pt").symlink_to(folder / MODEL_STATES)
    with pytest.raises(UserError, match="link.pt: not a regular file"):
        verify_manifest(folder)
    (folder / "checkpoint" / "link.pt").unlink()

    moved = tmp_path / "elsewhere.json"  # the manifest itself as a link (it could point at /dev/zero)
    manifest_path.rename(moved)
    manifest_path.symlink_to(moved)
    with pytest.raises(UserError, match=f"{manifest_name(0)}: not a regular file"):
        verify_manifest(folder)
    manifest_path.unlink()

    for outside in ("../outside.pt", "/etc/hostname", "checkpoint/../../x"):
        manifest_path.write_text(json.dumps({**manifest, "files": {**manifest["files"], outside: "0" * 64}}))
        with pytest.raises(UserError, match="is not a file path inside the checkpoint"):
            verify_manifest(folder)

    manifest_path.write_text(json.dumps({**manifest, "world_size": 2}))  # rank 1's manifest is missing
    with pytest.raises(UserError, match=f"{manifest_name(1)}: the checkpoint manifests do not cover ranks 0..1"):
        verify_manifest(folder)

    manifest_path.unlink()
    with pytest.raises(UserError, match="no checkpoint manifest"):
        verify_manifest(folder)


# --- bundle SHA256SUMS -------------------------------------------------------------------------------------
@pytest.fixture
def reads(monkeypatch):
    """Every URI the bundle reader opens; /dev/zero is refused here too so a regression fails, not hangs."""
    opened: list[str] = []

    def record(original):
        def wrapper(uri, *args, **kwargs):
            opened.append(str(uri))
            if str(uri).startswith("/dev/"):
                raise AssertionError(f"read {uri}")
            return original(uri, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(uri_lib, "open_input", record(uri_lib.open_input))
    monkeypatch.setattr(uri_lib, "read_bytes", record(uri_lib.read_bytes))
    return opened


def bundle(folder: Path, extra_line: str = "") -> Path:
    folder.mkdir()
    files = {ckpt.WEIGHTS: b"weights", ckpt.BUNDLE_CONFIG: b"{}"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / ckpt.SUMS).write_text(ckpt.format_sums(files) + extra_line)
    return folder


@pytest.mark.parametrize("name", ["/etc/hostname", "../x", "sub/x", "/dev/zero", "..", "*/etc/hostname"])
def test_sums_naming_a_path_are_refused_without_reading_it(tmp_path, reads, name):
    (tmp_path / "x").write_bytes(b"outside")
    folder = bundle(tmp_path / "bundle", f"{'0' * 64}  {name}\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "x").write_bytes(b"inside a subfolder")
    with pytest.raises(UserError, match=r"SHA256SUMS line 3: .* is not a plain file name inside the bundle"):
        ckpt.load_pretrained(folder)
    assert reads == [str(folder / ckpt.SUMS)]  # only the sums themselves were read


@pytest.mark.parametrize("target", ["/dev/zero", "/etc/hostname"])
def test_sums_listing_a_link_out_of_the_bundle_are_refused(tmp_path, reads, target):
    folder = bundle(tmp_path / "bundle", f"{'0' * 64}  linked\n")
    (folder / "linked").symlink_to(target)
    with pytest.raises(UserError, match="linked: not a regular file"):
        ckpt.verify_bundle(str(folder))
    assert str(folder / "linked") not in reads

    reads.clear()
    (folder / ckpt.SUMS).unlink()
    (folder / ckpt.SUMS).symlink_to(target)  # the sums file itself
    with pytest.raises(UserError, match="SHA256SUMS: not a regular file"):
        ckpt.load_pretrained(folder)
    assert reads == []


def test_oversized_bundle_file_is_refused_before_reading(tmp_path, reads, monkeypatch):
    folder = bundle(tmp_path / "bundle")
    monkeypatch.setattr(ckpt, "MAX_BUNDLE_FILE_BYTES", 3)  # "weights" is 7 bytes
    with pytest.raises(UserError, match=f"{ckpt.WEIGHTS}: 7 bytes, over the 3-byte limit"):
        ckpt.verify_bundle(str(folder))
    assert str(folder / ckpt.WEIGHTS) not in reads


def test_plain_bundle_still_verifies(tmp_path, reads):
    folder = bundle(tmp_path / "bundle")
    assert ckpt.verify_bundle(str(folder)) == {ckpt.WEIGHTS: b"weights", ckpt.BUNDLE_CONFIG: b"{}"}
