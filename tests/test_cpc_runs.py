"""infonce_cpc.py as users run it: one process, two gloo processes, resume, eval_linear.py on the
result, and the start-up checks of its own flags.

Runs use the synthetic image folder with 16-pixel crops (4-pixel patches every 2 pixels, a 7 x 7
grid), a ResNet-18 patch encoder and a global batch of 8 (3 steps per epoch).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import common
from conftest import describe_failure, read_metrics, run_script, run_torchrun

CPC_ARGS = ("--dataset", "folder", "--arch", "resnet18", "--image-size", "16", "--batch-size", "8",
            "--workers", "0", "--knn-every", "1", "--log-every", "1", "--epochs", "4")


def run_cpc(image_folder, output_dir, *extra: str):
    result = run_script("infonce_cpc.py", *CPC_ARGS, "--data-dir", str(image_folder), "--output-dir",
                        str(output_dir), *extra)
    assert result.returncode == 0, describe_failure(result)
    return result


def load(run_dir) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


def read_args(run_dir) -> dict:
    return json.loads((run_dir / "args.json").read_text())


def losses(run_dir) -> list[float]:
    return [line["loss"] for line in read_metrics(run_dir) if "loss" in line]


@pytest.fixture(scope="module")
def straight_run(image_folder, tmp_path_factory):
    """4 steps in one go: epoch 0 and one step of epoch 1."""
    run_dir = tmp_path_factory.mktemp("cpc_straight") / "run"
    result = run_cpc(image_folder, run_dir, "--max-steps", "4")
    return run_dir, result


@pytest.fixture(scope="module")
def split_run(image_folder, tmp_path_factory):
    """The straight run's flags, 2 steps, then a resume from that checkpoint to step 4 (mid-epoch)."""
    run_dir = tmp_path_factory.mktemp("cpc_split") / "run"
    run_cpc(image_folder, run_dir, "--max-steps", "2")
    first = load(run_dir)
    result = run_script("infonce_cpc.py", *CPC_ARGS, "--data-dir", str(image_folder), "--max-steps", "4",
                        "--resume", str(run_dir / "checkpoint.pt"))
    assert result.returncode == 0, describe_failure(result)
    return run_dir, first, result


def test_checkpoint_written(straight_run):
    run_dir, _ = straight_run
    state = load(run_dir)
    assert state["method"] == "infonce_cpc"
    assert state["step"] == 4
    assert state["backbone"]["patch_size"] == 4
    assert state["backbone"]["patch_stride"] == 2
    assert state["backbone"]["norm"] == "layer"
    assert (run_dir / "backbone.pt").is_file()


def test_no_batch_norm_in_model(straight_run):
    # Layer normalisation keeps the patches apart: no running statistics anywhere in the model.
    state = load(straight_run[0])
    assert not [name for name in state["model"] if "running_mean" in name]


def test_metrics_lines(straight_run):
    lines = read_metrics(straight_run[0])
    training = [line for line in lines if "loss" in line]
    assert [line["step"] for line in training] == [1, 2, 3, 4]
    for line in training:
        assert 0 <= line["contrast_acc"] <= 1
    knn = [line for line in lines if "knn_top1" in line]
    assert [line["step"] for line in knn] == [3, 4]


def test_args_json_records_grid(straight_run):
    args = read_args(straight_run[0])
    assert (args["patch_size"], args["patch_stride"], args["skip_rows"], args["grid_side"]) == (4, 2, 1, 7)
    assert args["cifar_stem"] is True
    assert args["lr"] == 2e-4


def test_start_up_names_grid(straight_run):
    assert "patches: 7 x 7 grid of 4 px every 2 px | predict 5 rows after skipping 1 | 392 candidates" \
        in straight_run[1].stdout


def test_resume_bit_identical(straight_run, split_run):
    # With --workers 0 the augmentation draws from the restored main-process random state, so the
    # resumed run must repeat the uninterrupted one exactly.
    straight, resumed = load(straight_run[0]), load(split_run[0])
    assert split_run[1]["step"] == 2
    assert straight["step"] == resumed["step"] == 4
    different = [name for name, value in straight["model"].items() if not torch.equal(value, resumed["model"][name])]
    assert different == [], f"entries differ after resume: {different[:5]}"
    for index, state in straight["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], resumed["optimizer"]["state"][index][key]), f"{key} of parameter {index}"
    assert losses(split_run[0]) == losses(straight_run[0])


def test_two_process_run(image_folder, tmp_path):
    run_dir = tmp_path / "run"
    result = run_torchrun("infonce_cpc.py", *CPC_ARGS, "--data-dir", str(image_folder), "--max-steps", "3",
                          "--output-dir", str(run_dir))
    assert result.returncode == 0, describe_failure(result)
    args = read_args(run_dir)
    assert (args["world_size"], args["batch_per_process"]) == (2, 4)
    assert load(run_dir)["step"] == 3
    assert [line["step"] for line in read_metrics(run_dir) if "loss" in line] == [1, 2, 3]


def test_eval_linear_scores_cpc(straight_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(straight_run[0], run_dir)
    result = run_script("eval_linear.py", "--checkpoint", str(run_dir / "checkpoint.pt"), "--epochs", "5",
                        "--workers", "0")
    assert result.returncode == 0, describe_failure(result)
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert scores["method"] == "infonce_cpc"
    assert scores["step"] == 4
    # The last kNN monitor and eval_linear.py encode the same images with the same grid and weights.
    monitor = [line["knn_top1"] for line in read_metrics(run_dir) if "knn_top1" in line][-1]
    assert scores["knn_top1"] == pytest.approx(monitor, abs=1e-9)
    assert 0 <= scores["linear_top1"] <= 1


def test_eval_encoder_averages_patches(straight_run):
    # eval_linear.py's encoder, rebuilt from the checkpoint, against a loop over the 49 patches.
    state = load(straight_run[0])
    encoder, backbone, feature_dim = common.build_encoder(state["backbone"], state["backbone"]["arch"])
    backbone.load_state_dict(common.backbone_state_dict(state["model"]))
    encoder.eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        pooled = encoder(images)
        patches = [backbone(images[:, :, 2 * i : 2 * i + 4, 2 * j : 2 * j + 4]) for i in range(7) for j in range(7)]
    assert pooled.shape == (2, feature_dim)
    torch.testing.assert_close(pooled, torch.stack(patches).mean(dim=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra, expected", [
    (("--pred-steps", "6"), "the 16-pixel image gives a grid of 7 x 7 patches (--patch-size 4, --patch-stride 2), "
                            "too few rows for --pred-steps 6 with 1 skipped rows: that needs at least 8 rows. "
                            "Lower --pred-steps to 5 or less"),
    (("--patch-size", "20"), "--patch-size 20 is larger than the 16-pixel image"),
    (("--patch-stride", "0"), "--patch-stride 0 must be positive"),
    (("--patch-size", "0"), "--patch-size 0 must be positive"),
    (("--skip-rows", "6"), "the 16-pixel image gives a grid of 7 x 7 patches (--patch-size 4, --patch-stride 2), too "
                           "few rows to predict even one row after 6 skipped rows: that needs at least 8 rows"),
    (("--skip-rows", "-1"), "--skip-rows -1 must not be negative"),
    (("--temperature", "0"), "--temperature 0.0 must be a positive finite number"),
    (("--crop-fraction", "1.5"), "--crop-fraction 1.5 must be at most 1"),
    (("--color-drop-prob", "2"), "--color-drop-prob 2.0 must be a probability between 0 and 1"),
    (("--patch-jitter", "1"), "--patch-jitter 1.0 must be at least 0 and below 1"),
], ids=["too many steps", "patch too large", "stride zero", "patch zero", "no step fits", "negative skip", "temperature", "crop fraction",
        "probability", "jitter"])
def test_bad_flag_rejected(image_folder, tmp_path, extra, expected):
    result = run_script("infonce_cpc.py", *CPC_ARGS, "--data-dir", str(image_folder), "--output-dir",
                        str(tmp_path / "out"), *extra)
    assert result.returncode == 2, describe_failure(result)
    assert expected in result.stderr, describe_failure(result)
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("image_size, patch_size, stride, skip", [(16, 4, 2, 1), (20, 5, 2, 2), (16, 6, 1, 5)])
def test_default_skip_clears_context_row(image_folder, tmp_path, image_size, patch_size, stride, skip):
    # The first target row, i+1+skip, starts at pixel (i+1+skip)*stride, at or below the last pixel
    # of row i, which ends at i*stride + patch_size.
    flags = ("--image-size", str(image_size), "--patch-size", str(patch_size), "--patch-stride", str(stride),
             "--pred-steps", "1")
    run_dir = tmp_path / "run"
    result = run_script("infonce_cpc.py", *CPC_ARGS, *flags, "--data-dir", str(image_folder), "--output-dir",
                        str(run_dir), "--max-steps", "1", "--knn-every", "0")
    assert result.returncode == 0, describe_failure(result)
    assert read_args(run_dir)["skip_rows"] == skip
    assert (1 + skip) * stride >= patch_size
    assert skip * stride < patch_size, "one row fewer would already clear the context row"


def test_uneven_batch_rejected(image_folder, tmp_path):
    result = run_torchrun("infonce_cpc.py", *CPC_ARGS, "--data-dir", str(image_folder), "--batch-size", "7",
                          "--output-dir", str(tmp_path / "out"))
    assert result.returncode != 0, describe_failure(result)
    assert "--batch-size 7 is the global batch and must be a positive multiple of the number of processes (2)" \
        in result.stderr, describe_failure(result)
    assert not (tmp_path / "out").exists()


def test_simclr_checkpoint_rejected(pretrained_run, image_folder):
    result = run_script("infonce_cpc.py", *CPC_ARGS, "--data-dir", str(image_folder), "--resume",
                        str(pretrained_run.checkpoint), "--max-steps", "4")
    assert result.returncode == 2, describe_failure(result)
    assert f"{pretrained_run.checkpoint} was written by simclr.py, not infonce_cpc.py" in result.stderr


def test_eval_rejects_image_below_patch(image_folder, tmp_path):
    run_dir = tmp_path / "run"
    run_cpc(image_folder, run_dir, "--patch-size", "10", "--patch-stride", "2", "--skip-rows", "0", "--pred-steps",
            "1", "--max-steps", "1", "--knn-every", "0")
    checkpoint = run_dir / "checkpoint.pt"
    result = run_script("eval_linear.py", "--checkpoint", str(checkpoint), "--image-size", "8", "--workers", "0")
    assert result.returncode == 2, describe_failure(result)
    assert f"{checkpoint} encodes 10-pixel patches, which do not fit in 8-pixel images; use --image-size 10 or " \
           f"more" in result.stderr, describe_failure(result)


def test_help_names_symbols_and_units():
    result = run_script("infonce_cpc.py", "--help")
    assert result.returncode == 0, describe_failure(result)
    text = " ".join(result.stdout.split())
    for phrase in ("side P of the square patches in pixels", "patch encoder g_enc", "context network g_ar",
                   "divide the scores z^T W_k c by tau", "global batch B in images", "Adam learning rate",
                   "--pred-steps", "--skip-rows"):
        assert phrase in text, f"--help lacks {phrase!r}"
