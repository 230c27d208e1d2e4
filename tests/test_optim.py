"""LARS and its parameter groups, the learning-rate schedule and scaling, and the batch split."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import common
from simclr import SimCLR


def small_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),  # 0: weight and bias
        nn.BatchNorm2d(4),  # 1
        nn.Flatten(),
        nn.Linear(4, 5),  # 3: weight and bias
        nn.BatchNorm1d(5),  # 4
    )


def param_ids(params) -> set[int]:
    return {id(p) for p in params}


def test_lars_groups_split_weights():
    model = small_model()
    optimizer = common.build_optimizer("lars", model, lr=0.5, momentum=0.9, weight_decay=1e-4)
    weights, others = optimizer.param_groups
    assert param_ids(weights["params"]) == param_ids([model[0].weight, model[3].weight])
    assert weights["weight_decay"] == 1e-4
    assert weights["lars"] is True
    assert param_ids(others["params"]) == param_ids(
        [model[0].bias, model[1].weight, model[1].bias, model[3].bias, model[4].weight, model[4].bias])
    assert others["weight_decay"] == 0.0
    assert others["lars"] is False


def test_lars_groups_simclr_model():
    backbone, feature_dim = common.build_backbone("resnet18", cifar_stem=True)
    model = SimCLR(backbone, feature_dim, 128, head_bn=True)
    optimizer = common.build_optimizer("lars", model, lr=1.0, momentum=0.9, weight_decay=1e-6)
    adapted, excluded = param_ids(optimizer.param_groups[0]["params"]), param_ids(optimizer.param_groups[1]["params"])
    for name, parameter in model.named_parameters():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        if not parameter.requires_grad:
            assert id(parameter) not in adapted | excluded, f"frozen {name} is in the optimiser"
        elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d) or name.endswith("bias"):
            assert id(parameter) in excluded, f"{name} should be excluded from LARS and weight decay"
        else:
            assert id(parameter) in adapted, f"{name} should be adapted by LARS"
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["projector.4.bias"], "the head's last BatchNorm shift should be the only frozen parameter"


def test_sgd_single_group():
    model = small_model()
    optimizer = common.build_optimizer("sgd", model, lr=0.5, momentum=0.9, weight_decay=1e-4)
    assert isinstance(optimizer, torch.optim.SGD)
    assert len(optimizer.param_groups) == 1
    assert param_ids(optimizer.param_groups[0]["params"]) == param_ids(model.parameters())
    assert optimizer.param_groups[0]["weight_decay"] == 1e-4


def test_unknown_optimizer_rejected():
    with pytest.raises(common.ConfigError, match="unknown --optimizer 'adam'; choose lars or sgd"):
        common.build_optimizer("adam", small_model(), lr=0.5, momentum=0.9, weight_decay=0.0)


def lars_on(w: torch.Tensor, weight_decay: float, lars: bool, lr: float, momentum: float = 0.9):
    return common.LARS([{"params": [w], "weight_decay": weight_decay, "lars": lars}], lr=lr, momentum=momentum)


def test_lars_step_hand_formula():
    w = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    optimizer = lars_on(w, weight_decay=0.1, lars=True, lr=0.5, momentum=0.9)

    # Step 1: g' = g + wd*w = [1.3, -1.6], trust = 0.001*||w||/||g'|| = 0.005/sqrt(4.25), v = lr*trust*g'.
    w.grad = torch.tensor([1.0, -2.0], dtype=torch.float64)
    optimizer.step()
    trust1 = 0.001 * 5.0 / math.sqrt(1.3**2 + 1.6**2)
    v1 = [0.5 * trust1 * 1.3, 0.5 * trust1 * -1.6]
    w1 = [3.0 - v1[0], 4.0 - v1[1]]
    assert w.tolist() == pytest.approx(w1, rel=1e-12)

    # Step 2 at another learning rate: the rate enters the buffer, v = m*v + lr*trust*g'.
    optimizer.param_groups[0]["lr"] = 0.2
    w.grad = torch.tensor([0.5, 0.25], dtype=torch.float64)
    optimizer.step()
    g2 = [0.5 + 0.1 * w1[0], 0.25 + 0.1 * w1[1]]
    trust2 = 0.001 * math.hypot(*w1) / math.hypot(*g2)
    v2 = [0.9 * v1[i] + 0.2 * trust2 * g2[i] for i in range(2)]
    assert w.tolist() == pytest.approx([w1[0] - v2[0], w1[1] - v2[1]], rel=1e-12)


def test_lars_zero_weight_trust_one():
    w = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    optimizer = lars_on(w, weight_decay=0.1, lars=True, lr=0.5)
    w.grad = torch.tensor([1.0, 2.0], dtype=torch.float64)
    optimizer.step()
    assert w.tolist() == [-0.5, -1.0], "a zero weight should take a plain step of lr * g"


def test_lars_zero_gradient_trust_one():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))
    optimizer = lars_on(w, weight_decay=0.0, lars=True, lr=0.5)
    w.grad = torch.zeros(2)
    optimizer.step()
    assert w.tolist() == [3.0, 4.0], "a zero gradient should leave the weight unchanged (and finite)"


def test_lars_excluded_group_plain_momentum():
    w = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    optimizer = lars_on(w, weight_decay=0.0, lars=False, lr=0.5, momentum=0.9)
    w.grad = torch.tensor([1.0, -2.0], dtype=torch.float64)
    optimizer.step()
    optimizer.step()
    # v1 = lr*g = [0.5, -1], v2 = 0.9*v1 + lr*g = [0.95, -1.9]; w = w0 - v1 - v2.
    assert w.tolist() == pytest.approx([3.0 - 0.5 - 0.95, 4.0 + 1.0 + 1.9], rel=1e-12)


def test_lars_skips_parameters_without_grad():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))
    optimizer = lars_on(w, weight_decay=0.1, lars=True, lr=0.5)
    optimizer.step()
    assert w.tolist() == [3.0, 4.0]


@pytest.mark.parametrize("step, expected", [
    (0, 0.0),  # warm-up starts at 0
    (5, 1.0),  # halfway through the warm-up
    (10, 2.0),  # end of warm-up: the peak
    (35, 2.0 * 0.5 * (1 + math.cos(math.pi / 4))),  # a quarter of the decay
    (60, 1.0),  # halfway through the decay: half the peak
    (110, 0.0),  # end of the schedule
    (130, 0.0),  # past the end: stays at 0
])
def test_warmup_cosine_values(step, expected):
    assert common.warmup_cosine_lr(step, total_steps=110, warmup_steps=10, peak_lr=2.0) == pytest.approx(
        expected, abs=1e-12)


def test_warmup_cosine_no_warmup():
    assert common.warmup_cosine_lr(0, total_steps=100, warmup_steps=0, peak_lr=2.0) == 2.0


@pytest.mark.parametrize("scaling, batch, expected", [
    ("linear", 256, 0.3),
    ("linear", 512, 0.6),
    ("linear", 4096, 4.8),
    ("sqrt", 4096, 0.3 * 64),
    ("sqrt", 256, 0.3 * 16),
])
def test_scale_lr_values(scaling, batch, expected):
    assert common.scale_lr(0.3, batch, scaling) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("global_batch, world_size, per_process", [(512, 1, 512), (512, 8, 64), (6, 3, 2)])
def test_per_process_batch_split(global_batch, world_size, per_process):
    assert common.per_process_batch(global_batch, world_size) == per_process


@pytest.mark.parametrize("global_batch, world_size, suggestion", [
    (10, 3, "--batch-size 9 or 12"),
    (0, 2, "--batch-size 2 or 4"),
    (-4, 1, "--batch-size 1 or 2"),
    (7, 8, "--batch-size 8 or 16"),
])
def test_per_process_batch_errors(global_batch, world_size, suggestion):
    with pytest.raises(common.ConfigError) as error:
        common.per_process_batch(global_batch, world_size)
    message = str(error.value)
    assert f"--batch-size {global_batch} is the global batch" in message
    assert f"number of processes ({world_size})" in message
    assert suggestion in message


def test_check_positive_names_invalid_flags():
    with pytest.raises(common.ConfigError) as error:
        common.check_positive(epochs=0, lr=0.1, knn_k=-1, temperature=float("nan"))
    message = str(error.value)
    assert "--epochs 0" in message
    assert "--knn-k -1" in message
    assert "--temperature nan" in message, "NaN is not positive"
    assert "--lr" not in message, "a valid flag should not be named"


def test_check_positive_accepts_positive():
    common.check_positive(epochs=1, lr=1e-9)
