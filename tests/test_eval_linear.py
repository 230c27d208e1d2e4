"""eval_linear.py: its output files and JSON line, a frozen backbone, and the probe helpers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

import common
import eval_linear
from conftest import describe_failure, run_script

SCORES = ("linear_top1", "linear_top5", "knn_top1")


@pytest.fixture(scope="module")
def eval_dir(pretrained_run, tmp_path_factory):
    """A folder with a copy of the pretrained checkpoint, where the evaluations write their JSON files."""
    folder = tmp_path_factory.mktemp("eval")
    shutil.copy(pretrained_run.checkpoint, folder / "checkpoint.pt")
    return folder


@pytest.fixture(scope="module")
def eval_run(eval_dir):
    result = run_script("eval_linear.py", "--checkpoint", str(eval_dir / "checkpoint.pt"), "--epochs", "2",
                        "--workers", "0")
    assert result.returncode == 0, describe_failure(result)
    return result


@pytest.fixture(scope="module")
def random_init_run(eval_dir):
    result = run_script("eval_linear.py", "--checkpoint", str(eval_dir / "checkpoint.pt"), "--epochs", "2",
                        "--workers", "0", "--random-init")
    assert result.returncode == 0, describe_failure(result)
    return result


def last_json_line(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("score", SCORES)
def test_eval_score_is_fraction(eval_run, score):
    value = last_json_line(eval_run)[score]
    assert 0.0 <= value <= 1.0, f"{score} = {value}"


def test_eval_result_fields(eval_run, eval_dir):
    result = last_json_line(eval_run)
    assert {key: result[key] for key in ("method", "arch", "dataset", "step", "random_init", "checkpoint")} == {
        "method": "simclr", "arch": "resnet18", "dataset": "folder", "step": 2, "random_init": False,
        "checkpoint": str(eval_dir / "checkpoint.pt")}


def test_eval_top5_covers_three_classes(eval_run):
    # With 3 classes, the top-5 prediction contains every class.
    assert last_json_line(eval_run)["linear_top5"] == 1.0


def test_eval_writes_json_file(eval_run, eval_dir):
    assert json.loads((eval_dir / "eval.json").read_text()) == last_json_line(eval_run)


def test_random_init_writes_json_file(random_init_run, eval_dir):
    saved = json.loads((eval_dir / "eval_random_init.json").read_text())
    assert saved == last_json_line(random_init_run)
    assert saved["random_init"] is True
    for score in SCORES:
        assert 0.0 <= saved[score] <= 1.0, f"{score} = {saved[score]}"


@pytest.fixture
def captured_backbones(monkeypatch) -> list[nn.Module]:
    """Every backbone that common.build_backbone returns during the test."""
    backbones: list[nn.Module] = []
    original = common.build_backbone

    def capturing_build_backbone(*args, **kwargs):
        backbone, feature_dim = original(*args, **kwargs)
        backbones.append(backbone)
        return backbone, feature_dim

    monkeypatch.setattr(common, "build_backbone", capturing_build_backbone)
    return backbones


@pytest.mark.parametrize("augment, batch_size", [(False, 256), (True, 8)])
def test_main_keeps_backbone_state(eval_dir, captured_backbones, augment, batch_size):
    checkpoint = eval_dir / "checkpoint.pt"
    eval_linear.main(eval_linear.Args(checkpoint=str(checkpoint), epochs=1, workers=0, augment=augment,
                                      batch_size=batch_size))
    assert len(captured_backbones) == 1
    expected = common.backbone_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    state = captured_backbones[0].state_dict()
    assert sorted(state) == sorted(expected)
    assert any(key.endswith("running_mean") for key in state), "no BatchNorm statistics to compare"
    changed = [key for key in expected if not torch.equal(state[key], expected[key])]
    assert changed == [], f"backbone entries changed by evaluation: {changed[:5]}"
    assert captured_backbones[0].training is False


def test_main_detects_changed_backbone(eval_dir, captured_backbones, monkeypatch):
    # Evaluation that moved a BatchNorm statistic must be caught by the script's own check.
    original = eval_linear.train_probe_on_features

    def tampering_train_probe(*args, **kwargs):
        captured_backbones[0].bn1.running_mean += 1.0
        return original(*args, **kwargs)

    monkeypatch.setattr(eval_linear, "train_probe_on_features", tampering_train_probe)
    with pytest.raises(RuntimeError, match="the frozen backbone changed during evaluation: bn1.running_mean"):
        eval_linear.main(eval_linear.Args(checkpoint=str(eval_dir / "checkpoint.pt"), epochs=1, workers=0))


def test_main_arch_needs_random_init(eval_dir):
    with pytest.raises(common.ConfigError, match="contains resnet18 weights, so --arch resnet34 is invalid without --random-init"):
        eval_linear.main(eval_linear.Args(checkpoint=str(eval_dir / "checkpoint.pt"), arch="resnet34"))


def test_main_rejects_zero_epochs(eval_dir):
    with pytest.raises(common.ConfigError) as error:
        eval_linear.main(eval_linear.Args(checkpoint=str(eval_dir / "checkpoint.pt"), epochs=0, knn_temperature=-1.0))
    assert "--epochs 0" in str(error.value)
    assert "--knn-temperature -1.0" in str(error.value)
    assert "must be a positive finite number" in str(error.value)


def test_main_batch_not_divisible(eval_dir, monkeypatch):
    for name, value in {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "3"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(common.ConfigError, match=r"--batch-size 256 is the global batch .* \(3\); use for example "
                                                 r"--batch-size 255 or 258"):
        eval_linear.main(eval_linear.Args(checkpoint=str(eval_dir / "checkpoint.pt")))


def separable_features(samples_per_class: int = 20, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(classes).repeat_interleave(samples_per_class)
    features = 5.0 * nn.functional.one_hot(labels, 8).float() + 0.1 * torch.randn(len(labels), 8, generator=generator)
    return features, labels


def test_probe_learns_separable_features():
    features, labels = separable_features()
    args = eval_linear.Args(checkpoint="unused", epochs=30, batch_size=16)
    probe = eval_linear.train_probe_on_features(features, labels, 3, args, peak_lr=0.5)
    with torch.no_grad():
        accuracy = eval_linear.topk_accuracy(probe(features), labels, 1)
    assert accuracy == 1.0
    assert probe.training is False


def test_probe_leaves_features_unchanged():
    features, labels = separable_features()
    before = features.clone()
    eval_linear.train_probe_on_features(features, labels, 3, eval_linear.Args(checkpoint="unused", epochs=2), 0.1)
    assert torch.equal(features, before)


def test_probe_same_seed_same_weights():
    features, labels = separable_features()
    args = eval_linear.Args(checkpoint="unused", epochs=3, batch_size=16)
    first = eval_linear.train_probe_on_features(features, labels, 3, args, peak_lr=0.5)
    second = eval_linear.train_probe_on_features(features, labels, 3, args, peak_lr=0.5)
    assert torch.equal(first[1].weight, second[1].weight)


def test_linear_probe_layers():
    probe = eval_linear.linear_probe(16, 5)
    assert isinstance(probe[0], nn.BatchNorm1d) and probe[0].affine is False
    assert isinstance(probe[1], nn.Linear)
    assert (probe[1].in_features, probe[1].out_features) == (16, 5)


@pytest.mark.parametrize("k, expected", [(1, 1 / 3), (2, 2 / 3), (5, 1.0)])
def test_topk_accuracy_values(k, expected):
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0]])
    labels = torch.tensor([0, 2, 0])
    assert eval_linear.topk_accuracy(logits, labels, k) == pytest.approx(expected)
