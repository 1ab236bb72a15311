"""`load_model`: checkpoint folders, job summaries and clear errors (bundles are tested with export)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from p2es_dist.config import load_config
from p2es_dist.errors import UserError
from p2es_dist.models.checkpoint import load_model, load_pretrained, sha256_bytes
from p2es_dist.models.registry import build_model


def _checkpoint(folder, model_section):
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    model = build_model(model_section)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "model.json").write_text(json.dumps(model_section))
    return model


def test_checkpoint_folder_result_json_and_out_folder_load_the_same_weights(tmp_path):
    section = load_config("smoke")["model"]
    original = _checkpoint(tmp_path / "ckpt", section)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "result.json").write_text(json.dumps({"checkpoint": str(tmp_path / "ckpt")}))
    loaded = [load_model(str(tmp_path / "ckpt")), load_model(str(tmp_path / "out")),
              load_model(str(tmp_path / "out" / "result.json"))]
    digest = sha256_bytes((tmp_path / "ckpt" / "model.safetensors").read_bytes())
    for item in loaded:
        assert (item.kind, item.name, item.digest, item.uri) == ("checkpoint", "p2es", digest, str(tmp_path / "ckpt"))
        assert not item.model.training
        for key, value in original.state_dict().items():
            assert torch.equal(item.model.state_dict()[key], value), key


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="no model.safetensors"):
        load_model(str(tmp_path))
    with pytest.raises(UserError, match="only loads bundles"):
        load_pretrained(tmp_path)
    _checkpoint(tmp_path / "dct", {"name": "dct"})
    (tmp_path / "dct" / "model.json").write_text(json.dumps({"name": "unet"}))
    with pytest.raises(UserError, match="do not fit model 'unet'"):
        load_model(str(tmp_path / "dct"))
    (tmp_path / "dct" / "model.safetensors").write_bytes(b"\x00\x01truncated")
    with pytest.raises(UserError, match="not a readable safetensors"):
        load_model(str(tmp_path / "dct"))
    (tmp_path / "r.json").write_text("{}")
    with pytest.raises(UserError, match="no 'checkpoint' field"):
        load_model(str(tmp_path / "r.json"))
