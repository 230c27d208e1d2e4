"""moco.py as users run it: one process, two gloo processes, resume, MoCo v2 options, eval_linear.py
on the result, and the start-up checks of its flags.

Runs use the synthetic image folder, ResNet-18 with 16-pixel crops, a global batch of 8 (3 steps
per epoch) and a queue of 16 keys, so the queue wraps around every two steps.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import describe_failure, read_metrics, run_script, run_torchrun

COMMON_ARGS = ("--dataset", "folder", "--arch", "resnet18", "--image-size", "16", "--batch-size", "8",
               "--workers", "0", "--knn-every", "1", "--log-every", "1", "--epochs", "4")
MOCO_ARGS = (*COMMON_ARGS, "--queue-size", "16")


def run_moco(image_folder, output_dir, *extra: str):
    result = run_script("moco.py", *MOCO_ARGS, "--data-dir", str(image_folder), "--output-dir", str(output_dir),
                        *extra)
    assert result.returncode == 0, describe_failure(result)
    return result


def load(run_dir) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


def read_args(run_dir) -> dict:
    return json.loads((run_dir / "args.json").read_text())


@pytest.fixture(scope="module")
def straight_run(image_folder, tmp_path_factory):
    """4 steps in one go (epoch 0 and one step of epoch 1)."""
    run_dir = tmp_path_factory.mktemp("moco_straight") / "run"
    result = run_moco(image_folder, run_dir, "--max-steps", "4")
    return run_dir, result


@pytest.fixture(scope="module")
def split_run(image_folder, tmp_path_factory):
    """2 steps, then a resume from that checkpoint to step 4 (the resume starts mid-epoch)."""
    run_dir = tmp_path_factory.mktemp("moco_split") / "run"
    run_moco(image_folder, run_dir, "--max-steps", "2")
    first = load(run_dir)
    result = run_script("moco.py", *MOCO_ARGS, "--data-dir", str(image_folder), "--max-steps", "4",
                        "--resume", str(run_dir / "checkpoint.pt"))
    assert result.returncode == 0, describe_failure(result)
    return run_dir, first, result


@pytest.fixture(scope="module")
def two_process_run(image_folder, tmp_path_factory):
    """The README's command shape, `torchrun --nproc_per_node=2 moco.py --queue-size K`, for 3 steps."""
    run_dir = tmp_path_factory.mktemp("moco_two_process") / "run"
    result = run_torchrun("moco.py", "--queue-size", "16", *COMMON_ARGS, "--data-dir", str(image_folder),
                          "--max-steps", "3", "--output-dir", str(run_dir))
    assert result.returncode == 0, describe_failure(result)
    return run_dir, result


def test_resume_bit_identical(straight_run, split_run):
    # With --workers 0 the augmentation draws from the restored main-process random state, so the
    # resumed run must repeat the uninterrupted one exactly.
    straight, resumed = load(straight_run[0]), load(split_run[0])
    assert straight["step"] == resumed["step"] == 4
    different = [name for name, value in straight["model"].items() if not torch.equal(value, resumed["model"][name])]
    assert different == [], f"entries differ after resume: {different[:5]}"
    assert torch.equal(straight["model"]["queue"], resumed["model"]["queue"])
    assert int(straight["model"]["queue_ptr"]) == int(resumed["model"]["queue_ptr"]) == 4 * 8 % 16


def test_resume_optimizer_identical(straight_run, split_run):
    straight, resumed = load(straight_run[0]), load(split_run[0])
    for index, state in straight["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], resumed["optimizer"]["state"][index]["momentum_buffer"])


def test_resume_logs_same_losses(straight_run, split_run):
    straight = [line["loss"] for line in read_metrics(straight_run[0]) if "loss" in line]
    resumed = [line["loss"] for line in read_metrics(split_run[0]) if "loss" in line]
    assert resumed == straight


def test_checkpoint_after_two_steps(split_run):
    _, first, _ = split_run
    assert first["step"] == 2
    assert first["method"] == "moco"
    assert int(first["model"]["queue_ptr"]) == 0, "two batches of 8 fill a queue of 16 and wrap to 0"


def test_checkpoint_contents(straight_run):
    state = load(straight_run[0])
    model = state["model"]
    assert model["queue"].shape == (16, 128)
    torch.testing.assert_close(torch.linalg.vector_norm(model["queue"], dim=1), torch.ones(16))
    assert any(name.startswith("key_encoder.") for name in model)
    # f_k moves towards f_q but is not f_q after updates with m = 0.999.
    assert not torch.equal(model["key_encoder.0.conv1.weight"], model["backbone.conv1.weight"])


def test_backbone_file_is_query_backbone(straight_run):
    backbone = torch.load(straight_run[0] / "backbone.pt", weights_only=True)
    model = load(straight_run[0])["model"]
    assert set(backbone) == {name[len("backbone."):] for name in model if name.startswith("backbone.")}
    assert torch.equal(backbone["conv1.weight"], model["backbone.conv1.weight"])


def test_metrics_lines(straight_run):
    lines = read_metrics(straight_run[0])
    training = [line for line in lines if "loss" in line]
    assert [line["step"] for line in training] == [1, 2, 3, 4]
    for line in training:
        assert 0 <= line["contrast_acc"] <= 1
        assert line["lr"] == pytest.approx(0.03 * 8 / 256)  # step schedule, no drop within 4 epochs
    knn = [line for line in lines if "knn_top1" in line]
    assert [line["step"] for line in knn] == [3, 4]


def test_args_json_resolved(straight_run):
    args = read_args(straight_run[0])
    assert args["temperature"] == 0.07
    assert args["bn_splits"] == 8
    assert args["momentum"] == 0.999
    assert (args["mlp"], args["aug_plus"], args["cos"]) == (False, False, False)
    assert args["keys_per_step"] == 8
    assert args["peak_lr"] == pytest.approx(0.03 * 8 / 256)


def test_start_up_notes(straight_run):
    output = straight_run[1].stdout
    assert ("note: --lr-drops 120 160 lie at or after --epochs 4, so the learning rate does not drop there; "
            "pass earlier --lr-drops, or --cos for a cosine decay") in output
    assert "BatchNorm splits 8 | K 16, m 0.999, tau 0.07" in output


def test_two_process_run(two_process_run):
    run_dir, result = two_process_run
    args = read_args(run_dir)
    assert (args["world_size"], args["batch_per_process"], args["bn_splits"]) == (2, 4, 1)
    state = load(run_dir)
    assert state["step"] == 3
    assert state["world_size"] == 2
    assert int(state["model"]["queue_ptr"]) == 3 * 8 % 16
    steps = [line["step"] for line in read_metrics(run_dir) if "loss" in line]
    assert steps == [1, 2, 3]


def test_v2_symmetric_run(image_folder, tmp_path):
    run_dir = tmp_path / "run"
    result = run_moco(image_folder, run_dir, "--v2", "--symmetric", "--queue-size", "32", "--max-steps", "2",
                      "--image-size", "72", "--bn-splits", "2")
    args = read_args(run_dir)
    assert (args["mlp"], args["aug_plus"], args["cos"], args["temperature"]) == (True, True, True, 0.2)
    assert args["keys_per_step"] == 16
    assert args["blur"] is True
    model = load(run_dir)["model"]
    assert int(model["queue_ptr"]) == 0, "two steps of 16 keys fill a queue of 32"
    assert "head.2.weight" in model, "--v2 must give the MLP head"
    assert "cosine" in result.stdout


def test_v2_temperature_override(image_folder, tmp_path):
    run_dir = tmp_path / "run"
    run_moco(image_folder, run_dir, "--v2", "--temperature", "0.5", "--max-steps", "1", "--knn-every", "0")
    assert read_args(run_dir)["temperature"] == 0.5


def test_eval_linear_scores_moco(straight_run):
    result = run_script("eval_linear.py", "--checkpoint", str(straight_run[0] / "checkpoint.pt"), "--epochs", "5",
                        "--workers", "0")
    assert result.returncode == 0, describe_failure(result)
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert scores["method"] == "moco"
    assert scores["step"] == 4
    assert 0 <= scores["knn_top1"] <= 1
    assert 0 <= scores["linear_top1"] <= 1


def test_eval_linear_moco_protocol(straight_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(straight_run[0], run_dir)
    result = run_script("eval_linear.py", "--checkpoint", str(run_dir / "checkpoint.pt"), "--protocol", "moco",
                        "--epochs", "2", "--batch-size", "8", "--workers", "0")
    assert result.returncode == 0, describe_failure(result)
    assert "probe epoch 2/2: loss" in result.stdout
    assert "probe: moco protocol, 2 epochs, lr 30.0 per 256 images, augment True" in result.stdout
    probe = json.loads((run_dir / "eval_moco.json").read_text())["probe"]
    assert probe["protocol"] == "moco"
    assert probe["lr"] == 30.0
    assert probe["augment"] is True


# ---------------------------------------------------------------------------------------------
# Start-up checks: each stops before anything is written.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, expected", [
    (("--queue-size", "6", "--batch-size", "4"),
     "--queue-size 6 must be a positive multiple of the 4 keys enqueued per step (the global batch "
     "--batch-size 4), so that every batch fits before the end of the queue; use for example --queue-size 4 or 8"),
    (("--queue-size", "24", "--symmetric"), "use for example --queue-size 16 or 32"),
    (("--bn-splits", "3"), "--bn-splits 3 must be a positive divisor of the per-process batch of 8 images"),
    (("--momentum", "1.0"), "--momentum 1.0 (the key encoder's m) must be from 0 (inclusive) to 1 (exclusive)"),
    (("--sgd-momentum", "1.0"), "--sgd-momentum 1.0 must be between 0 (inclusive) and 1 (exclusive)"),
    (("--temperature", "0"), "--temperature 0.0 must be a positive finite number"),
    (("--batch-size", "4"), "--bn-splits 8 (the default with one process) must be a positive divisor of the "
                            "per-process batch of 4 images"),
    (("--lr-drops", "0", "3"), "--lr-drops 0 3 must be positive epochs in increasing order, each once"),
    (("--lr-drops", "5", "5", "3"), "--lr-drops 5 5 3 must be positive epochs in increasing order, each once"),
    (("--min-crop-scale", "0"), "--min-crop-scale 0.0 must be above 0 and at most 1"),
    (("--image-size", "8", "--bn-splits", "8"),
     "BatchNorm groups of 1 image(s) (--bn-splits 8, 8 images per process) see one value per channel at the "
     "last stage (1x1 for 8-px images)"),
    (("--v2", "--no-mlp"), "--no-mlp"),
], ids=["queue 6 batch 4", "queue symmetric", "bn splits", "key momentum", "sgd momentum", "temperature",
        "default bn splits", "lr drops", "lr drops order", "crop scale", "bn group of one", "v2 no mlp"])
def test_bad_flag_rejected(image_folder, tmp_path, extra, expected):
    result = run_script("moco.py", *MOCO_ARGS, "--data-dir", str(image_folder), "--output-dir",
                        str(tmp_path / "out"), *extra)
    assert result.returncode == 2, describe_failure(result)
    assert expected in result.stderr, describe_failure(result)
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_resume_other_process_count_names_splits(two_process_run, image_folder, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_process_run[0], run_dir)
    result = run_script("moco.py", *MOCO_ARGS, "--data-dir", str(image_folder), "--resume",
                        str(run_dir / "checkpoint.pt"), "--max-steps", "4")
    assert result.returncode == 2, describe_failure(result)
    assert "was trained with --bn-splits 1 on 2 process(es); the default for 1 process(es) is 8. " \
           "Pass --bn-splits 1 to resume" in result.stderr


def test_resume_changed_batch_named_first(split_run, image_folder, tmp_path):
    # The queue no longer fits the new batch either, but the changed flag is the error to fix.
    run_dir = tmp_path / "run"
    shutil.copytree(split_run[0], run_dir)
    result = run_script("moco.py", *MOCO_ARGS, "--batch-size", "12", "--data-dir", str(image_folder),
                        "--resume", str(run_dir / "checkpoint.pt"), "--max-steps", "6")
    assert result.returncode == 2, describe_failure(result)
    assert "--batch-size 8 -> 12" in result.stderr


def test_simclr_checkpoint_rejected(pretrained_run, image_folder, tmp_path):
    result = run_script("moco.py", *MOCO_ARGS, "--data-dir", str(image_folder), "--resume",
                        str(pretrained_run.checkpoint), "--max-steps", "4")
    assert result.returncode == 2, describe_failure(result)
    assert f"{pretrained_run.checkpoint} was written by simclr.py, not moco.py" in result.stderr


def test_resume_with_other_queue_size(split_run, image_folder, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(split_run[0], run_dir)
    result = run_script("moco.py", *MOCO_ARGS, "--queue-size", "32", "--data-dir", str(image_folder),
                        "--resume", str(run_dir / "checkpoint.pt"), "--max-steps", "6")
    assert result.returncode == 2, describe_failure(result)
    assert "--queue-size 16 -> 32" in result.stderr
    assert load(run_dir)["step"] == 4, "the checkpoint must stay as it was"


def test_help_names_symbols_and_units():
    result = run_script("moco.py", "--help")
    assert result.returncode == 0, describe_failure(result)
    text = " ".join(result.stdout.split())
    for phrase in ("number of negative keys K", "key-encoder momentum m", "tau of the InfoNCE loss",
                   "global batch size B in images", "learning rate per 256 images", "width D of the keys",
                   "side of the training crops in pixels"):
        assert phrase in text, f"--help lacks {phrase!r}"
