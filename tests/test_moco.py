"""MoCo's pieces against hand computations and plain-loop references: queue, loss, momentum update,
BatchNorm splits, shuffling BN in one process, learning-rate schedule and queue-size check."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common
from moco import MoCo, SplitBatchNorm2d, check_queue_size, encode_keys, learning_rate, moco_loss


def tiny_moco(K: int = 8, dim: int = 2, mlp: bool = False) -> MoCo:
    """A MoCo whose backbone is a linear map of 6 inputs to 5 features, without BatchNorm."""
    torch.manual_seed(0)
    return MoCo(nn.Linear(6, 5), feature_dim=5, dim=dim, K=K, mlp=mlp)


# ---------------------------------------------------------------------------------------------
# Queue
# ---------------------------------------------------------------------------------------------


def test_queue_matches_circular_buffer():
    # K=8, a batch of 4 keys per step, 3 steps; key j is the vector (j, -j).
    model = tiny_moco(K=8)
    initial = model.queue.clone()
    reference = [row.clone() for row in initial]  # plain circular buffer of rows
    pointer = 0
    for step in range(3):
        numbers = torch.arange(4 * step + 1, 4 * step + 5, dtype=torch.float32)  # 1-4, 5-8, 9-12
        keys = torch.stack([numbers, -numbers], dim=1)  # (4, 2)
        model.enqueue(keys)
        for row in keys:
            reference[pointer] = row
            pointer = (pointer + 1) % 8
        torch.testing.assert_close(model.queue, torch.stack(reference), rtol=0, atol=0, msg=f"step {step + 1}")
        assert int(model.queue_ptr) == pointer, f"step {step + 1}"
    # The final state written out: keys 9-12 in slots 0-3, keys 5-8 in slots 4-7, pointer 4.
    assert model.queue[:, 0].tolist() == [9, 10, 11, 12, 5, 6, 7, 8]
    assert int(model.queue_ptr) == 4


def test_queue_after_first_step_keeps_random_rows():
    model = tiny_moco(K=8)
    initial = model.queue.clone()
    model.enqueue(torch.ones(4, 2))
    assert torch.equal(model.queue[4:], initial[4:])
    assert int(model.queue_ptr) == 4


def test_initial_queue_rows_unit_norm():
    torch.manual_seed(1)
    model = MoCo(nn.Linear(6, 5), feature_dim=5, dim=128, K=4096)
    norms = torch.linalg.vector_norm(model.queue, dim=1)
    torch.testing.assert_close(norms, torch.ones(4096))
    assert model.queue.shape == (4096, 128)
    assert model.queue_ptr.dtype == torch.long
    assert int(model.queue_ptr) == 0


def test_queue_and_pointer_in_state_dict():
    state = tiny_moco().state_dict()
    assert "queue" in state
    assert "queue_ptr" in state
    assert any(key.startswith("key_encoder.") for key in state)


@pytest.mark.parametrize("K, batch, symmetric, expected", [
    (6, 4, False, "--queue-size 6 must be a positive multiple of the 4 keys enqueued per step"),
    (6, 4, False, "use for example --queue-size 4 or 8"),
    (4096, 96, False, "use for example --queue-size 4032 or 4128"),
    (2, 4, False, "use for example --queue-size 4"),
    (0, 4, False, "use for example --queue-size 4"),
    (12, 4, True, "twice the global batch --batch-size 4, because --symmetric"),
    (12, 4, True, "use for example --queue-size 8 or 16"),
], ids=["K 6 batch 4", "nearest sizes", "K 4096 batch 96", "K below batch", "K 0", "symmetric", "symmetric sizes"])
def test_queue_size_check_rejects(K, batch, symmetric, expected):
    with pytest.raises(common.ConfigError) as error:
        check_queue_size(K, batch * (2 if symmetric else 1), symmetric)
    assert expected in str(error.value)


@pytest.mark.parametrize("K, keys_per_step", [(8, 4), (65536, 256), (4096, 4096)])
def test_queue_size_check_accepts(K, keys_per_step):
    check_queue_size(K, keys_per_step, False)


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


def loop_moco_loss(q, k, queue, tau) -> tuple[float, float]:
    """Plain-loop InfoNCE: for each query, -log(exp(q.k+/tau) / (exp(q.k+/tau) + sum_j exp(q.n_j/tau)))."""
    total, correct = 0.0, 0
    for i in range(q.shape[0]):
        positive = sum(float(q[i, d]) * float(k[i, d]) for d in range(q.shape[1])) / tau
        negatives = [sum(float(q[i, d]) * float(n[d]) for d in range(q.shape[1])) / tau for n in queue]
        denominator = math.exp(positive) + sum(math.exp(value) for value in negatives)
        total += -(positive - math.log(denominator))
        correct += positive > max(negatives)
    return total / q.shape[0], correct / q.shape[0]


@pytest.mark.parametrize("tau", [0.07, 0.2, 1.0])
def test_loss_matches_loop_reference(tau):
    generator = torch.Generator().manual_seed(3)
    q = F.normalize(torch.randn(5, 4, generator=generator, dtype=torch.float64), dim=1)
    k = F.normalize(q + 0.5 * torch.randn(5, 4, generator=generator, dtype=torch.float64), dim=1)
    queue = F.normalize(torch.randn(7, 4, generator=generator, dtype=torch.float64), dim=1)
    loss, accuracy = moco_loss(q.float(), k.float(), queue.float(), tau)
    expected_loss, expected_accuracy = loop_moco_loss(q, k, queue, tau)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    assert accuracy.item() == pytest.approx(expected_accuracy)


def test_loss_hand_value():
    # q = k+ and every queue entry orthogonal to q: loss = -log(e^(1/tau) / (e^(1/tau) + K)).
    tau = 0.5
    q = torch.tensor([[1.0, 0.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
    loss, accuracy = moco_loss(q, q, queue, tau)
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + 3))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert accuracy.item() == 1.0


def test_logits_within_bounds(monkeypatch):
    tau = 0.07
    generator = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(16, 8, generator=generator), dim=1)
    k = F.normalize(torch.randn(16, 8, generator=generator), dim=1)
    queue = torch.cat([q, -q, F.normalize(torch.randn(32, 8, generator=generator), dim=1)])  # extremes +-1
    captured = []
    original = F.cross_entropy

    def capturing_cross_entropy(logits, labels, *args, **kwargs):
        captured.append(logits.detach())
        return original(logits, labels, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", capturing_cross_entropy)
    moco_loss(q, k, queue, tau)
    logits = captured[0]
    assert logits.shape == (16, 1 + 64)
    assert logits.max().item() <= 1 / tau + 1e-4
    assert logits.min().item() >= -1 / tau - 1e-4
    assert logits.max().item() == pytest.approx(1 / tau, rel=1e-5)  # q against its own copy in the queue


def test_loss_gradient_only_to_queries():
    q = F.normalize(torch.randn(4, 3), dim=1).requires_grad_()
    k = F.normalize(torch.randn(4, 3), dim=1)
    queue = F.normalize(torch.randn(8, 3), dim=1)
    loss, _ = moco_loss(q, k, queue, 0.2)
    loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert not k.requires_grad
    assert not queue.requires_grad


def test_loss_finite_under_autocast():
    q = F.normalize(torch.randn(4, 8), dim=1).to(torch.bfloat16)
    queue = F.normalize(torch.randn(16, 8), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = moco_loss(q, q.float(), queue, 0.01)
    assert loss.dtype == torch.float32
    assert math.isfinite(loss.item())


# ---------------------------------------------------------------------------------------------
# Encoders and momentum update
# ---------------------------------------------------------------------------------------------


def test_key_encoder_starts_as_copy():
    model = tiny_moco(mlp=True)
    query = list(model.backbone.parameters()) + list(model.head.parameters())
    key = list(model.key_encoder.parameters())
    assert len(query) == len(key)
    for theta_q, theta_k in zip(query, key):
        assert torch.equal(theta_q, theta_k)
        assert theta_q.data_ptr() != theta_k.data_ptr(), "f_k must be a copy, not the same tensors"
        assert not theta_k.requires_grad


@pytest.mark.parametrize("m", [0.999, 0.5, 0.0])
def test_momentum_update_hand_value(m):
    model = tiny_moco()
    with torch.no_grad():
        model.backbone.weight.fill_(2.0)
        model.key_encoder[0].weight.fill_(-1.0)
        model.head.bias.fill_(0.25)
        model.key_encoder[1].bias.fill_(4.0)
    model.momentum_update(m)
    # theta_k <- m*theta_k + (1-m)*theta_q
    torch.testing.assert_close(model.key_encoder[0].weight, torch.full((5, 6), m * -1.0 + (1 - m) * 2.0))
    torch.testing.assert_close(model.key_encoder[1].bias, torch.full((2,), m * 4.0 + (1 - m) * 0.25))
    assert torch.equal(model.backbone.weight, torch.full((5, 6), 2.0)), "f_q must not change"


def test_momentum_update_leaves_key_buffers():
    # BatchNorm running statistics are buffers: the update is over parameters only.
    backbone = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5))
    model = MoCo(backbone, feature_dim=5, dim=2, K=8)
    with torch.no_grad():
        model.backbone[1].running_mean.fill_(3.0)
    model.momentum_update(0.5)
    assert torch.equal(model.key_encoder[0][1].running_mean, torch.zeros(5))


def test_key_encoder_gets_no_gradient():
    model = tiny_moco()
    x_q, x_k = torch.randn(4, 6), torch.randn(4, 6)
    q = F.normalize(model(x_q), dim=1)
    k, _ = encode_keys(model.key_encoder, x_k)
    loss, _ = moco_loss(q, k, model.queue, 0.2)
    loss.backward()
    assert all(p.grad is None for p in model.key_encoder.parameters())
    assert all(p.grad is not None for p in model.backbone.parameters())
    assert not k.requires_grad


# ---------------------------------------------------------------------------------------------
# BatchNorm splits and shuffling BN in one process
# ---------------------------------------------------------------------------------------------


def test_split_batchnorm_matches_per_group_reference():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4) * 2 + 1
    split = SplitBatchNorm2d(3, num_splits=4)
    with torch.no_grad():
        split.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        split.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    y = split(x)
    expected, means, variances = [], [], []
    for group in x.split(2):  # groups of consecutive images
        plain = nn.BatchNorm2d(3)
        plain.load_state_dict({k: v for k, v in split.state_dict().items() if k != "num_batches_tracked"},
                              strict=False)
        plain.running_mean.zero_()
        plain.running_var.fill_(1.0)
        expected.append(plain(group))
        means.append(plain.running_mean)
        variances.append(plain.running_var)
    torch.testing.assert_close(y, torch.cat(expected))
    torch.testing.assert_close(split.running_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(split.running_var, torch.stack(variances).mean(0))


def test_split_batchnorm_channels_last():
    x = torch.randn(8, 3, 4, 4)
    split = SplitBatchNorm2d(3, num_splits=2)
    y_contiguous = split(x)
    y_channels_last = SplitBatchNorm2d(3, num_splits=2)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y_channels_last, y_contiguous)
    assert y_channels_last.is_contiguous(memory_format=torch.channels_last)


def test_split_batchnorm_eval_is_plain():
    split = SplitBatchNorm2d(3, num_splits=4)
    split(torch.randn(8, 3, 4, 4))
    plain = nn.BatchNorm2d(3)
    plain.load_state_dict(split.state_dict())
    x = torch.randn(5, 3, 4, 4)  # 5 images: not a multiple of the splits, fine in eval mode
    torch.testing.assert_close(split.eval()(x), plain.eval()(x))


def test_split_backbone_loads_into_torchvision():
    norm_layer = lambda channels: SplitBatchNorm2d(channels, num_splits=2)  # noqa: E731
    backbone, _ = common.build_backbone("resnet18", cifar_stem=False, norm_layer=norm_layer)
    assert any(isinstance(module, SplitBatchNorm2d) for module in backbone.modules())
    reference = torchvision.models.resnet18()
    reference.fc = nn.Identity()
    reference.load_state_dict(backbone.state_dict(), strict=True)


class ConvBN(nn.Module):
    """A per-pixel encoder whose only cross-image interaction is BatchNorm: 1x1 conv, BN, pool."""

    def __init__(self, num_splits: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=1)
        self.bn = SplitBatchNorm2d(4, num_splits=num_splits)

    def forward(self, x):
        return self.bn(self.conv(x)).mean(dim=(2, 3))  # (N, 4)


def dependencies(encode, x: torch.Tensor) -> list[set[int]]:
    """For each output row i, the set of input images j whose change changes row i."""
    base = encode(x)
    found = [set() for _ in range(x.shape[0])]
    for j in range(x.shape[0]):
        changed = x.clone()
        changed[j] += 3.0 * torch.randn_like(changed[j])
        moved = (encode(changed) - base).abs().amax(dim=1) > 1e-5
        for i in torch.nonzero(moved).flatten().tolist():
            found[i].add(j)
    return found


@pytest.mark.parametrize("num_splits, expect_leak", [(4, False), (1, True)], ids=["splits 4", "splits 1"])
def test_shuffle_emulation_statistics(num_splits, expect_leak):
    # q_i is normalised with the images of its query group, and k_i with the images that the
    # shuffle puts in its key group. With splits these sets differ for every image. Without splits
    # (the naive shuffle in one process) both are the whole batch, so q_i and k_i share statistics.
    torch.manual_seed(0)
    model = MoCo(ConvBN(num_splits), feature_dim=4, dim=4, K=16).train()
    x = torch.randn(16, 3, 2, 2)
    query_sets = dependencies(lambda images: model(images), x)

    def encode_with_fixed_shuffle(images):
        torch.manual_seed(1)  # the same permutation for every probe
        return encode_keys(model.key_encoder, images)[0]

    key_sets = dependencies(encode_with_fixed_shuffle, x)
    if expect_leak:
        assert all(query_sets[i] == key_sets[i] == set(range(16)) for i in range(16))
    else:
        assert all(len(query_sets[i]) == len(key_sets[i]) == 4 for i in range(16))
        same = [i for i in range(16) if query_sets[i] == key_sets[i]]
        assert same == [], f"q and k of images {same} are normalised with the same images"


def test_encode_keys_restores_order():
    # A key encoder without batch statistics gives the same keys whatever the shuffle.
    torch.manual_seed(0)
    key_encoder = nn.Linear(6, 3)
    x = torch.randn(10, 6)
    k, k_all = encode_keys(key_encoder, x)
    expected = F.normalize(key_encoder(x), dim=1)
    torch.testing.assert_close(k, expected)
    torch.testing.assert_close(k_all, expected)
    assert not k.requires_grad


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("epoch, expected", [(0, 0.03), (119, 0.03), (120, 0.003), (159, 0.003), (160, 0.0003),
                                             (199, 0.0003)])
def test_step_schedule(epoch, expected):
    assert learning_rate(epoch, 200, 0.03, cos=False, lr_drops=(120, 160)) == pytest.approx(expected)


@pytest.mark.parametrize("epoch, expected", [(0, 0.06), (100, 0.03), (150, 0.06 * 0.5 * (1 + math.cos(0.75 * math.pi)))])
def test_cosine_schedule(epoch, expected):
    assert learning_rate(epoch, 200, 0.06, cos=True, lr_drops=(120, 160)) == pytest.approx(expected)
