"""`p2es bench infer` prints one JSON line with the keys `p2es_dist/bench/infer.py` documents
(no assertion on time)."""

from __future__ import annotations

import json

import pytest
import torch

from p2es_dist.bench.infer import main
from p2es_dist.config import load_config
from p2es_dist.models import build_model
from p2es_dist.models.checkpoint import save_checkpoint
from p2es_dist.models.student import Student, StudentConfig

KEYS = {"bench", "student_ms_per_window", "teacher_ms_per_window", "speedup", "student_bytes", "onnx_max_abs_diff"}


def test_bench_infer_prints_one_json_line(tmp_path, capsys, one_torch_thread):
    torch.manual_seed(0)
    student = Student(config=StudentConfig(channels=8, c1_channels=5))
    torch.nn.init.normal_(student.generator.weight, std=0.05)
    section = {"name": "student", "channels": 8, "c1_channels": 5}
    save_checkpoint(student, section, str(tmp_path / "student"))
    teacher_section = load_config("smoke")["model"]
    save_checkpoint(build_model(teacher_section), teacher_section, str(tmp_path / "teacher"))

    code = main(["--model", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"), "--windows", "4",
                 "--batch-size", "2", "--teacher-windows", "1", "--steps", "2", "--repeats", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(lines) == 1
    report = json.loads(lines[0])
    assert set(report) >= KEYS and report["bench"] == "infer"
    assert report["onnx_max_abs_diff"] <= 1e-4 and report["int8_bytes"] < report["student_onnx_bytes"]
    assert report["student_bytes"] == (tmp_path / "student" / "model.safetensors").stat().st_size
    assert report["teacher_sampler"] == "ddim" and report["teacher_steps"] == 2
    assert report["speedup"] == pytest.approx(report["teacher_ms_per_window"] / report["student_ms_per_window"],
                                              rel=0.01)
