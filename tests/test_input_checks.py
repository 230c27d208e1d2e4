"""Input checks that run before any work: shared training flags, image folders, resumption, and
eval_linear.py's overrides and probe flags. Also the error that stops a run at a non-finite loss."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common
import eval_linear
import simclr
from conftest import SMOKE_ARGS, describe_failure, run_script


def valid_args(**changes) -> simclr.Args:
    return dataclasses.replace(simclr.Args(), **changes)


@pytest.mark.parametrize("changes, fragment", [
    ({"batch_size": 1}, "--batch-size 1 must be at least 2"),
    ({"epochs": 0}, "--epochs 0 must be a positive finite number"),
    ({"lr": float("nan")}, "--lr nan must be a positive finite number"),
    ({"lr": float("inf")}, "--lr inf must be a positive finite number"),
    ({"momentum": -0.5}, r"--momentum -0.5 must be between 0 \(inclusive\) and 1 \(exclusive\)"),
    ({"momentum": 1.0}, r"--momentum 1.0 must be between 0 \(inclusive\) and 1 \(exclusive\)"),
    ({"momentum": float("nan")}, r"--momentum nan must be between 0"),
    ({"weight_decay": -1.0}, "--weight-decay -1.0 must be a finite number of 0 or more"),
    ({"weight_decay": float("nan")}, "--weight-decay nan must be a finite number of 0 or more"),
    ({"warmup_epochs": -1.0}, "--warmup-epochs -1.0 must be a finite number of 0 or more"),
    ({"knn_every": -1}, "--knn-every -1 must be a finite number of 0 or more"),
    ({"max_steps": 0}, "--max-steps 0 must be positive"),
    ({"workers": -1}, "--workers -1 must not be negative"),
    ({"epochs": 2, "warmup_epochs": 10.0}, "--warmup-epochs 10.0 is longer than --epochs 2"),
], ids=["batch 1", "epochs 0", "lr nan", "lr inf", "momentum negative", "momentum 1", "momentum nan",
        "weight decay", "weight decay nan", "warm-up", "knn", "max steps", "workers", "warm-up too long"])
def test_training_flag_rejected(changes, fragment):
    with pytest.raises(common.ConfigError, match=fragment):
        common.validate_training_args(valid_args(**changes))


def test_training_flags_default_valid():
    common.validate_training_args(valid_args())


def test_only_invalid_flags_named():
    with pytest.raises(common.ConfigError) as error:
        common.validate_training_args(valid_args(warmup_epochs=-1.0))
    assert "--knn-every" not in str(error.value)


def test_infinite_temperature_rejected():
    with pytest.raises(common.ConfigError, match="--temperature inf must be a positive finite number"):
        common.check_positive(temperature=float("inf"))


def write_images(folder: Path, count: int, side: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.full((side, side, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")


def test_linked_class_folders_read(tmp_path):
    write_images(tmp_path / "real" / "cats", 2, 32)
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "train" / "cats").symlink_to(tmp_path / "real" / "cats")
    info = common.describe_dataset("folder", str(tmp_path / "data"), None)
    assert info.image_size == 32


def test_tiny_images_need_image_size(tmp_path):
    write_images(tmp_path / "train" / "dots", 2, 7)
    with pytest.raises(common.ConfigError, match="are 7 px .*; pass --image-size 8 or more to upscale them"):
        common.describe_dataset("folder", str(tmp_path), None)
    assert common.describe_dataset("folder", str(tmp_path), 8).image_size == 8


def test_corrupt_image_named(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"not a jpeg")
    with pytest.raises(OSError, match=f"cannot read image {path}.*remove or replace the file"):
        common.load_rgb_image(str(path))


def test_resume_folder_rejected(tmp_path):
    with pytest.raises(common.ConfigError, match=f"checkpoint {tmp_path} is a folder; pass the file"):
        common.load_checkpoint(str(tmp_path))


@pytest.fixture
def saved_state(pretrained_run) -> dict:
    return torch.load(pretrained_run.checkpoint, weights_only=True)


def resolved_args_of(state: dict) -> simclr.Args:
    return simclr.Args(**state["args"])


def test_resume_same_settings_accepted(saved_state):
    common.check_resume(saved_state, resolved_args_of(saved_state), saved_state["steps_per_epoch"], "ckpt")


def test_resume_allowed_changes_accepted(saved_state):
    args = dataclasses.replace(resolved_args_of(saved_state), max_steps=99, workers=3, sync_bn=False,
                               precision="bf16", data_dir="/elsewhere", output_dir="/out")
    common.check_resume(saved_state, args, saved_state["steps_per_epoch"], "ckpt")


def test_resume_changed_image_size(saved_state):
    args = dataclasses.replace(resolved_args_of(saved_state), image_size=8)
    with pytest.raises(common.ConfigError, match="--image-size 32 -> 8"):
        common.check_resume(saved_state, args, saved_state["steps_per_epoch"], "ckpt")


def test_resume_unset_value_shown(saved_state):
    state = copy.deepcopy(saved_state)
    state["args"]["max_steps"] = None
    state["args"]["seed"] = None
    with pytest.raises(common.ConfigError, match="--seed unset -> 0"):
        common.check_resume(state, resolved_args_of(saved_state), saved_state["steps_per_epoch"], "ckpt")


def test_resume_max_steps_below_step(saved_state):
    args = dataclasses.replace(resolved_args_of(saved_state), max_steps=saved_state["step"] - 1)
    with pytest.raises(common.ConfigError, match=f"pass --max-steps {saved_state['step']} or more"):
        common.check_resume(saved_state, args, saved_state["steps_per_epoch"], "ckpt")


def test_resume_changed_data_size(saved_state):
    steps = saved_state["steps_per_epoch"]
    with pytest.raises(common.ConfigError, match=f"now gives {steps + 1} steps per epoch, but the checkpoint "
                                                 f"was trained with {steps}"):
        common.check_resume(saved_state, resolved_args_of(saved_state), steps + 1, "ckpt")


def test_resume_spelled_out_defaults(pretrained_run, image_folder, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(pretrained_run.dir, run_dir)
    result = run_script("simclr.py", *SMOKE_ARGS, "--data-dir", str(image_folder), "--max-steps", "3",
                        "--image-size", "32", "--color-jitter-strength", "0.5", "--knn-every", "0",
                        "--resume", str(run_dir / "checkpoint.pt"))
    assert result.returncode == 0, describe_failure(result)
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 3


def test_resume_finished_run(pretrained_run, image_folder, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(pretrained_run.dir, run_dir)
    args_before = (run_dir / "args.json").read_bytes()
    result = run_script("simclr.py", *SMOKE_ARGS, "--data-dir", str(image_folder), "--max-steps", "2",
                        "--resume", str(run_dir / "checkpoint.pt"))
    assert result.returncode == 0, describe_failure(result)
    assert "is at step 2, where this run stops" in result.stdout
    assert (run_dir / "args.json").read_bytes() == args_before


def test_resume_drops_later_log_lines(tmp_path):
    lines = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.9}, {"step": 2, "knn_top1": 0.3},
             {"step": 3, "loss": 4.8}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    common.prepare_output_dir(str(tmp_path), "ckpt", False, common.DistEnv(0, 0, 1, 1, torch.device("cpu")),
                              resume_step=2)
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == lines[:3]


def test_new_run_drops_old_scores(tmp_path):
    for name in ("metrics.jsonl", "eval.json", "eval_random_init.json"):
        (tmp_path / name).write_text("{}\n")
    common.prepare_output_dir(str(tmp_path), None, False, common.DistEnv(0, 0, 1, 1, torch.device("cpu")))
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_non_finite_loss_stops_run(image_folder, tmp_path):
    run_dir = tmp_path / "run"
    result = run_script("simclr.py", *SMOKE_ARGS, "--data-dir", str(image_folder), "--optimizer", "sgd",
                        "--lr", "1e30", "--warmup-epochs", "0", "--max-steps", "6", "--knn-every", "0",
                        "--output-dir", str(run_dir))
    assert result.returncode == 1, describe_failure(result)
    assert "Traceback" not in result.stderr, describe_failure(result)
    assert "error: loss is " in result.stderr, describe_failure(result)
    assert "the last finite logged loss was" in result.stderr
    assert "no checkpoint was written" in result.stderr
    assert not (run_dir / "checkpoint.pt").exists()


@pytest.fixture
def eval_checkpoint(pretrained_run, tmp_path) -> Path:
    shutil.copy(pretrained_run.checkpoint, tmp_path / "checkpoint.pt")
    return tmp_path / "checkpoint.pt"


def test_eval_other_dataset_needs_data_dir(eval_checkpoint):
    with pytest.raises(common.ConfigError, match="--dataset cifar10 differs from the checkpoint's dataset "
                                                 r"\(folder\).*pass --data-dir for cifar10"):
        eval_linear.main(eval_linear.Args(checkpoint=str(eval_checkpoint), dataset="cifar10"))


def test_eval_moved_data_hint(eval_checkpoint, tmp_path):
    state = torch.load(eval_checkpoint, weights_only=True)
    state["data"]["data_dir"] = str(tmp_path / "moved")
    torch.save(state, eval_checkpoint)
    with pytest.raises(common.ConfigError, match="comes from the checkpoint; if the data has moved, pass "
                                                 "--data-dir NEW_FOLDER"):
        eval_linear.main(eval_linear.Args(checkpoint=str(eval_checkpoint)))


def test_eval_batch_of_one_rejected(eval_checkpoint):
    with pytest.raises(common.ConfigError, match="--batch-size 1 must be at least 2"):
        eval_linear.main(eval_linear.Args(checkpoint=str(eval_checkpoint), batch_size=1))


@pytest.mark.parametrize("strength", [3.0, float("nan"), -0.5])
def test_color_strength_out_of_range(image_folder, strength):
    args = valid_args(dataset="folder", data_dir=str(image_folder), color_jitter_strength=strength)
    with pytest.raises(common.ConfigError, match=f"--color-jitter-strength {strength} must be between 0 and 2.5"):
        simclr.main(args)


def test_resume_before_checkpoint_step(pretrained_run, image_folder, tmp_path):
    new_dir = tmp_path / "new"
    result = run_script("simclr.py", *SMOKE_ARGS, "--data-dir", str(image_folder), "--max-steps", "1",
                        "--resume", str(pretrained_run.checkpoint), "--output-dir", str(new_dir))
    assert result.returncode == 2, describe_failure(result)
    assert "--max-steps 1 is below step 2 of" in result.stderr
    assert "pass --max-steps 2 or more" in result.stderr
    assert not new_dir.exists()


def test_resume_without_original_flags(pretrained_run, image_folder):
    # The checkpoint was trained at --batch-size 8; the default of 512 exceeds the 26 images, but
    # the changed flag is the error to report.
    result = run_script("simclr.py", "--dataset", "folder", "--data-dir", str(image_folder), "--workers", "0",
                        "--max-steps", "4", "--resume", str(pretrained_run.checkpoint))
    assert result.returncode == 2, describe_failure(result)
    assert "cannot resume" in result.stderr
    assert "--batch-size 8 -> 512" in result.stderr
    assert "fewer than one global batch" not in result.stderr


@pytest.mark.parametrize("changes, fragment", [
    ({"momentum": 0.0}, r"--momentum 0.0 must be between 0 \(exclusive, because Nesterov momentum needs it\)"),
    ({"momentum": 1.5}, r"--momentum 1.5 must be between 0"),
    ({"weight_decay": float("nan")}, "--weight-decay nan must be a finite number of 0 or more"),
    ({"weight_decay": -1.0}, "--weight-decay -1.0 must be a finite number of 0 or more"),
], ids=["momentum 0", "momentum 1.5", "weight decay nan", "weight decay negative"])
def test_eval_probe_flag_rejected(eval_checkpoint, changes, fragment):
    with pytest.raises(common.ConfigError, match=fragment) as error:
        eval_linear.main(eval_linear.Args(checkpoint=str(eval_checkpoint), **changes))
    assert "--momentum" not in str(error.value) or "momentum" in changes


def test_eval_large_knn_k_noted(eval_checkpoint, capsys):
    eval_linear.main(eval_linear.Args(checkpoint=str(eval_checkpoint), epochs=1, workers=0, knn_k=1000))
    printed = capsys.readouterr().out
    assert "note: --knn-k 1000 is more than the 26 training images, so the kNN vote uses all 26" in printed
    result = json.loads((eval_checkpoint.parent / "eval.json").read_text())
    assert result["knn"]["k"] == 26
