"""dcl.py as users run it: DCL and DCLW on one process, two gloo processes, resume, eval_linear.py on
the result, and the start-up checks of its own flags.

Runs use the synthetic image folder, ResNet-18 with 16-pixel crops and a global batch of 8 (3 steps
per epoch). Everything but the loss is simclr.py's, which test_simclr_runs.py covers in depth.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import common
from conftest import describe_failure, read_metrics, run_script, run_torchrun

DCL_ARGS = ("--dataset", "folder", "--arch", "resnet18", "--image-size", "16", "--batch-size", "8",
            "--workers", "0", "--knn-every", "1", "--log-every", "1", "--epochs", "4", "--warmup-epochs", "1")


def run_dcl(image_folder, output_dir, *extra: str):
    result = run_script("dcl.py", *DCL_ARGS, "--data-dir", str(image_folder), "--output-dir", str(output_dir), *extra)
    assert result.returncode == 0, describe_failure(result)
    return result


def load(run_dir) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


def read_args(run_dir) -> dict:
    return json.loads((run_dir / "args.json").read_text())


def losses(run_dir) -> list[float]:
    return [line["loss"] for line in read_metrics(run_dir) if "loss" in line]


@pytest.fixture(scope="module", params=[False, True], ids=["dcl", "dclw"])
def straight_run(request, image_folder, tmp_path_factory):
    """4 steps in one go (epoch 0 and one step of epoch 1), of DCL or DCLW."""
    weighted = ("--weighted",) if request.param else ()
    run_dir = tmp_path_factory.mktemp("dcl_straight") / "run"
    result = run_dcl(image_folder, run_dir, "--max-steps", "4", *weighted)
    return run_dir, result, weighted


@pytest.fixture(scope="module")
def split_run(straight_run, image_folder, tmp_path_factory):
    """The straight run's flags, 2 steps, then a resume from that checkpoint to step 4 (mid-epoch)."""
    weighted = straight_run[2]
    run_dir = tmp_path_factory.mktemp("dcl_split") / "run"
    run_dcl(image_folder, run_dir, "--max-steps", "2", *weighted)
    first = load(run_dir)
    result = run_script("dcl.py", *DCL_ARGS, "--data-dir", str(image_folder), "--max-steps", "4",
                        "--resume", str(run_dir / "checkpoint.pt"), *weighted)
    assert result.returncode == 0, describe_failure(result)
    return run_dir, first, result


def test_checkpoint_written(straight_run):
    run_dir, _, _ = straight_run
    state = load(run_dir)
    assert state["method"] == "dcl"
    assert state["step"] == 4
    assert (run_dir / "backbone.pt").is_file()


def test_metrics_lines(straight_run):
    lines = read_metrics(straight_run[0])
    training = [line for line in lines if "loss" in line]
    assert [line["step"] for line in training] == [1, 2, 3, 4]
    for line in training:
        assert 0 <= line["contrast_acc"] <= 1
    knn = [line for line in lines if "knn_top1" in line]
    assert [line["step"] for line in knn] == [3, 4]


def test_args_json_records_loss(straight_run):
    args = read_args(straight_run[0])
    weighted = bool(straight_run[2])
    assert args["weighted"] is weighted
    assert args["sigma"] == (0.5 if weighted else None)
    assert args["temperature"] == 0.1
    assert args["peak_lr"] == pytest.approx(common.scale_lr(1.0, 8, "linear"))


def test_start_up_names_loss(straight_run):
    expected = "loss DCLW, sigma 0.5, tau 0.1" if straight_run[2] else "loss DCL, tau 0.1"
    assert expected in straight_run[1].stdout


def test_resume_bit_identical(straight_run, split_run):
    # With --workers 0 the augmentation draws from the restored main-process random state, so the
    # resumed run must repeat the uninterrupted one exactly.
    straight, resumed = load(straight_run[0]), load(split_run[0])
    assert split_run[1]["step"] == 2
    assert straight["step"] == resumed["step"] == 4
    different = [name for name, value in straight["model"].items() if not torch.equal(value, resumed["model"][name])]
    assert different == [], f"entries differ after resume: {different[:5]}"
    for index, state in straight["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], resumed["optimizer"]["state"][index]["momentum_buffer"])
    assert losses(split_run[0]) == losses(straight_run[0])


def test_weighted_loss_differs(image_folder, tmp_path):
    # Same seed, data and weights at step 1: only the loss differs between DCL and DCLW.
    plain = tmp_path / "plain"
    weighted = tmp_path / "weighted"
    run_dcl(image_folder, plain, "--max-steps", "2", "--knn-every", "0")
    run_dcl(image_folder, weighted, "--max-steps", "2", "--knn-every", "0", "--weighted")
    assert losses(plain)[0] != losses(weighted)[0]
    name = "backbone.conv1.weight"
    assert not torch.equal(load(plain)["model"][name], load(weighted)["model"][name])


def test_two_process_run(image_folder, tmp_path):
    run_dir = tmp_path / "run"
    result = run_torchrun("dcl.py", "--no-sync-bn", "--weighted", *DCL_ARGS, "--data-dir", str(image_folder),
                          "--max-steps", "3", "--output-dir", str(run_dir))
    assert result.returncode == 0, describe_failure(result)
    args = read_args(run_dir)
    assert (args["world_size"], args["batch_per_process"]) == (2, 4)
    assert load(run_dir)["step"] == 3
    assert [line["step"] for line in read_metrics(run_dir) if "loss" in line] == [1, 2, 3]


def test_eval_linear_scores_dcl(straight_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(straight_run[0], run_dir)
    result = run_script("eval_linear.py", "--checkpoint", str(run_dir / "checkpoint.pt"), "--epochs", "5",
                        "--workers", "0")
    assert result.returncode == 0, describe_failure(result)
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert scores["method"] == "dcl"
    assert scores["step"] == 4
    assert 0 <= scores["knn_top1"] <= 1
    assert 0 <= scores["linear_top1"] <= 1


@pytest.mark.parametrize("extra, expected", [
    (("--sigma", "0", "--weighted"), "--sigma 0.0 must be a positive finite number (default 0.5)"),
    (("--sigma", "nan", "--weighted"), "--sigma nan must be a positive finite number (default 0.5)"),
    (("--sigma", "0.2"), "--sigma 0.2 sets the DCLW weights, which only --weighted uses; add --weighted, or "
                         "leave --sigma out for DCL"),
    (("--temperature", "-0.1"), "--temperature -0.1 must be a positive finite number"),
], ids=["sigma zero", "sigma nan", "sigma without weighted", "temperature"])
def test_bad_flag_rejected(image_folder, tmp_path, extra, expected):
    result = run_script("dcl.py", *DCL_ARGS, "--data-dir", str(image_folder), "--output-dir", str(tmp_path / "out"),
                        *extra)
    assert result.returncode == 2, describe_failure(result)
    assert expected in result.stderr, describe_failure(result)
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_simclr_checkpoint_rejected(pretrained_run, image_folder):
    result = run_script("dcl.py", *DCL_ARGS, "--data-dir", str(image_folder), "--resume",
                        str(pretrained_run.checkpoint), "--max-steps", "4")
    assert result.returncode == 2, describe_failure(result)
    assert f"{pretrained_run.checkpoint} was written by simclr.py, not dcl.py" in result.stderr


def test_resume_with_weighting_changed(split_run, image_folder, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(split_run[0], run_dir)
    args = read_args(run_dir)
    flip = () if args["weighted"] else ("--weighted",)
    result = run_script("dcl.py", *DCL_ARGS, "--data-dir", str(image_folder), "--resume",
                        str(run_dir / "checkpoint.pt"), "--max-steps", "6", *flip)
    assert result.returncode == 2, describe_failure(result)
    assert f"--weighted {args['weighted']} -> {not args['weighted']}" in result.stderr, describe_failure(result)
    assert load(run_dir)["step"] == 4, "the checkpoint must stay as it was"


def test_help_names_symbols_and_units():
    result = run_script("dcl.py", "--help")
    assert result.returncode == 0, describe_failure(result)
    text = " ".join(result.stdout.split())
    for phrase in ("tau of the DCL loss", "sigma of the DCLW weights", "global batch size B in images",
                   "--weighted", "--sigma", "Unset: 0.5 (lightly's DCLWLoss"):
        assert phrase in text, f"--help lacks {phrase!r}"
