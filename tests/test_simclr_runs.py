"""Short simclr.py runs on the synthetic folder: files written, metrics, resume, two processes, --help."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
import torchvision
from torch import nn

import common
import dcl
import eval_linear
import moco
import simclr
from conftest import describe_failure, read_metrics, run_script

TRAINING_KEYS = {"epoch", "step", "loss", "contrast_acc", "lr", "img_per_s", "eta_s"}


def training_lines(run_dir) -> list[dict]:
    return [line for line in read_metrics(run_dir) if "loss" in line]


def knn_lines(run_dir) -> list[dict]:
    return [line for line in read_metrics(run_dir) if "knn_top1" in line]


def read_args(run_dir) -> dict:
    return json.loads((run_dir / "args.json").read_text())


def load_checkpoint(run_dir) -> dict:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("name", ["checkpoint.pt", "backbone.pt", "metrics.jsonl", "args.json"])
def test_run_writes_file(pretrained_run, name):
    assert (pretrained_run.dir / name).is_file(), f"{name} missing; files: {sorted(p.name for p in pretrained_run.dir.iterdir())}"


def test_run_leaves_no_temporary_files(pretrained_run):
    leftovers = [p.name for p in pretrained_run.dir.iterdir() if ".tmp-" in p.name or ".write-test-" in p.name]
    assert leftovers == []


def test_metrics_training_lines(pretrained_run):
    lines = training_lines(pretrained_run.dir)
    assert [line["step"] for line in lines] == [1, 2]
    assert [line["epoch"] for line in lines] == [0, 0]
    for line in lines:
        assert TRAINING_KEYS <= set(line), f"keys {sorted(line)}"
        assert line["loss"] > 0, f"loss {line['loss']} at step {line['step']}"
        assert 0 <= line["contrast_acc"] <= 1
        assert line["img_per_s"] > 0
        assert line["eta_s"] >= 0


def test_metrics_knn_line(pretrained_run):
    lines = knn_lines(pretrained_run.dir)
    assert [(line["epoch"], line["step"]) for line in lines] == [(0, 2)]
    assert 0 <= lines[0]["knn_top1"] <= 1


def test_metrics_lr_follows_schedule(pretrained_run):
    args = read_args(pretrained_run.dir)
    for line in training_lines(pretrained_run.dir):
        # The logged rate is the one of the step just taken, which started at step - 1.
        expected = common.warmup_cosine_lr(line["step"] - 1, args["total_steps"], args["warmup_steps"], args["peak_lr"])
        assert line["lr"] == pytest.approx(expected, rel=1e-12), f"step {line['step']}"


def test_metrics_printed(pretrained_run):
    assert "step 2 | loss" in pretrained_run.result.stdout
    assert "done at step 2" in pretrained_run.result.stdout


def test_args_json_values(pretrained_run):
    args = read_args(pretrained_run.dir)
    expected = {
        "dataset": "folder", "batch_size": 8, "image_size": 32, "world_size": 1, "batch_per_process": 8,
        "peak_lr": 1.0 * 8 / 256, "steps_per_epoch": 3, "total_steps": 12, "warmup_steps": 3, "stop_step": 2,
        "blur": False, "cifar_stem": True, "color_jitter_strength": 0.5, "workers": 0, "precision": "fp32",
        "output_dir": str(pretrained_run.dir),
        "normalization_mean": list(common.NORMALIZATION["folder"][0]),
        "normalization_std": list(common.NORMALIZATION["folder"][1]),
    }
    assert {key: args.get(key) for key in expected} == expected


def test_args_json_lists_every_flag(pretrained_run):
    args = read_args(pretrained_run.dir)
    missing = [field.name for field in dataclasses.fields(simclr.Args) if field.name not in args]
    assert missing == []


def test_checkpoint_header(pretrained_run):
    state = load_checkpoint(pretrained_run.dir)
    header = {key: state[key] for key in ("format", "version", "method", "step", "epoch", "world_size")}
    assert header == {"format": "contrastive-ssl-checkpoint", "version": 1, "method": "simclr", "step": 2,
                      "epoch": 0, "world_size": 1}
    assert state["backbone"] == {"arch": "resnet18", "cifar_stem": True, "feature_dim": 512}
    assert state["data"]["image_size"] == 32
    assert state["args"]["batch_size"] == 8
    assert len(state["rng"]) == 1


def test_checkpoint_loads_into_model(pretrained_run):
    state = load_checkpoint(pretrained_run.dir)
    backbone, feature_dim = common.build_backbone("resnet18", cifar_stem=True)
    model = simclr.SimCLR(backbone, feature_dim, 128, head_bn=True)
    model.load_state_dict(state["model"], strict=True)


def test_backbone_file_matches_checkpoint(pretrained_run):
    state = load_checkpoint(pretrained_run.dir)
    backbone = torch.load(pretrained_run.dir / "backbone.pt", map_location="cpu", weights_only=True)
    expected = {key[len("backbone."):]: value for key, value in state["model"].items() if key.startswith("backbone.")}
    assert sorted(backbone) == sorted(expected)
    changed = [key for key in expected if not torch.equal(backbone[key], expected[key])]
    assert changed == []


def test_backbone_file_in_torchvision(pretrained_run):
    reference = torchvision.models.resnet18()
    reference.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    reference.maxpool = nn.Identity()
    reference.fc = nn.Identity()
    reference.load_state_dict(torch.load(pretrained_run.dir / "backbone.pt", weights_only=True), strict=True)

    state = load_checkpoint(pretrained_run.dir)
    backbone, feature_dim = common.build_backbone("resnet18", cifar_stem=True)
    model = simclr.SimCLR(backbone, feature_dim, 128, head_bn=True)
    model.load_state_dict(state["model"])

    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.backbone.eval()(images)
        features = reference.eval()(images)
    assert features.shape == (4, 512)
    torch.testing.assert_close(features, expected, rtol=0, atol=0)


def test_resume_continues_steps(resumed_run):
    lines = training_lines(resumed_run.dir)
    assert [(line["epoch"], line["step"]) for line in lines] == [(0, 1), (0, 2), (0, 3), (1, 4)]
    # --knn-every 1: at the stop of the first run, at the end of epoch 0 and at the stop.
    assert [(line["epoch"], line["step"]) for line in knn_lines(resumed_run.dir)] == [(0, 2), (0, 3), (1, 4)]


def test_resume_lr_follows_schedule(resumed_run):
    args = read_args(resumed_run.dir)
    for line in training_lines(resumed_run.dir)[2:]:
        expected = common.warmup_cosine_lr(line["step"] - 1, args["total_steps"], args["warmup_steps"], args["peak_lr"])
        assert line["lr"] == pytest.approx(expected, rel=1e-12), f"step {line['step']}"


def test_resume_checkpoint_step(resumed_run):
    state = load_checkpoint(resumed_run.dir)
    assert (state["step"], state["epoch"]) == (4, 1)


def test_resume_prints_start_step(resumed_run):
    assert "starting at step 2" in resumed_run.result.stdout


def test_resume_changes_weights(pretrained_run, resumed_run):
    before, after = load_checkpoint(pretrained_run.dir)["model"], load_checkpoint(resumed_run.dir)["model"]
    key = "backbone.conv1.weight"
    assert not torch.equal(before[key], after[key]), "two more steps at a non-zero learning rate changed nothing"


def test_two_process_checkpoint(two_process_run):
    state = load_checkpoint(two_process_run.dir)
    assert (state["step"], state["world_size"]) == (2, 2)
    assert len(state["rng"]) == 2, "one random state per rank"


def test_two_process_metrics(two_process_run):
    assert [line["step"] for line in training_lines(two_process_run.dir)] == [1, 2], "only rank 0 should log"
    assert [line["step"] for line in knn_lines(two_process_run.dir)] == [2]


def test_two_process_batch_split(two_process_run):
    args = read_args(two_process_run.dir)
    assert (args["world_size"], args["batch_size"], args["batch_per_process"]) == (2, 8, 4)


def test_peak_lr_independent_of_processes(pretrained_run, two_process_run):
    one_process, two_processes = read_args(pretrained_run.dir), read_args(two_process_run.dir)
    assert one_process["peak_lr"] == two_processes["peak_lr"] == common.scale_lr(1.0, 8, "linear")
    assert one_process["steps_per_epoch"] == two_processes["steps_per_epoch"]


@pytest.mark.parametrize("script, args_type", [("simclr.py", simclr.Args), ("moco.py", moco.Args),
                                               ("dcl.py", dcl.Args), ("eval_linear.py", eval_linear.Args)])
def test_help_lists_every_flag(script, args_type):
    result = run_script(script, "--help")
    assert result.returncode == 0, describe_failure(result)
    missing = []
    for field in dataclasses.fields(args_type):
        flag = "--" + field.name.replace("_", "-")
        flags = [flag, "--no-" + flag[2:]] if field.type in ("bool", bool) else [flag]
        # A flag must not count as found inside a longer one (--lr in --lr-scaling).
        missing += [f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", result.stdout)]
    assert missing == [], f"--help of {script} does not mention {missing}"
