"""simclr.nt_xent against a plain-loop reference, closed-form values and its masking and offset rules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from simclr import nt_xent


def reference_losses(z_all: torch.Tensor, anchors: range, positive_of, tau: float) -> list[float]:
    """Per-anchor NT-Xent in float64 Python loops: l_i = -log(exp(s_ip/tau) / sum_{k != i} exp(s_ik/tau))."""
    rows = []
    for row in z_all.double().tolist():
        norm = math.sqrt(sum(value * value for value in row))
        rows.append([value / norm for value in row])
    losses = []
    for i in anchors:
        logits = [sum(a * b for a, b in zip(rows[i], rows[k])) / tau for k in range(len(rows))]
        denominator = sum(math.exp(logits[k]) for k in range(len(rows)) if k != i)
        losses.append(math.log(denominator) - logits[positive_of(i)])
    return losses


def reference_accuracy(z_all: torch.Tensor, anchors: range, positive_of) -> float:
    """Fraction of anchors whose most cosine-similar other row is their positive, by Python loops."""
    rows = []
    for row in z_all.double().tolist():
        norm = math.sqrt(sum(value * value for value in row))
        rows.append([value / norm for value in row])
    hits = 0
    for i in anchors:
        others = [k for k in range(len(rows)) if k != i]
        best = max(others, key=lambda k: sum(a * b for a, b in zip(rows[i], rows[k])))
        hits += best == positive_of(i)
    return hits / len(anchors)


def rank_layout(views1: torch.Tensor, views2: torch.Tensor, world_size: int) -> torch.Tensor:
    """Rows as gather_with_grad concatenates them: per rank, its first views then its second views."""
    blocks = []
    for v1, v2 in zip(views1.chunk(world_size), views2.chunk(world_size)):
        blocks += [v1, v2]
    return torch.cat(blocks)


@pytest.mark.parametrize("n, d, tau", [(1, 3, 0.5), (4, 8, 0.1), (7, 16, 1.0), (5, 4, 0.01), (3, 128, 0.2)])
def test_loss_matches_loop_reference(n, d, tau):
    z = torch.randn(2 * n, d, generator=torch.Generator().manual_seed(n * 100 + d))
    loss, _ = nt_xent(z, z, tau)
    expected = sum(reference_losses(z, range(2 * n), lambda i: (i + n) % (2 * n), tau)) / (2 * n)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("n, d", [(4, 8), (9, 3)])
def test_accuracy_matches_loop_reference(n, d):
    z = torch.randn(2 * n, d, generator=torch.Generator().manual_seed(n))
    _, accuracy = nt_xent(z, z, 0.5)
    expected = reference_accuracy(z, range(2 * n), lambda i: (i + n) % (2 * n))
    assert accuracy.item() == pytest.approx(expected)


@pytest.mark.parametrize("tau", [0.05, 0.1, 0.5, 1.0, 2.0])
def test_orthogonal_identical_views_closed_form(tau):
    # Two images along e1 and e2, each view equal to its partner. For every anchor the positive
    # has similarity 1 and the two negatives 0, so l = -log(e^(1/tau) / (e^(1/tau) + 2)).
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    loss, accuracy = nt_xent(z, z, tau)
    assert loss.item() == pytest.approx(math.log(1 + 2 * math.exp(-1 / tau)), rel=1e-5, abs=1e-7)
    assert accuracy.item() == 1.0


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_opposite_views_closed_form(tau):
    # Each view is the negative of its partner: the positive has similarity -1, the two negatives
    # 0, so l = -log(e^(-1/tau) / (e^(-1/tau) + 2)) = log(1 + 2 e^(1/tau)).
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    loss, accuracy = nt_xent(z, z, tau)
    assert loss.item() == pytest.approx(math.log(1 + 2 * math.exp(1 / tau)), rel=1e-5)
    assert accuracy.item() == 0.0


def test_loss_ignores_row_scale():
    # Three orthogonal pairs with views of different lengths: cosine similarity ignores the
    # length, so l = log(1 + 4 e^(-1/tau)) for 2N-2 = 4 negatives.
    tau = 0.5
    z = torch.cat([torch.eye(3) * torch.tensor([[2.0], [0.5], [7.0]]), torch.eye(3) * 3.0])
    loss, _ = nt_xent(z, z, tau)
    assert loss.item() == pytest.approx(math.log(1 + 4 * math.exp(-1 / tau)), rel=1e-6)


def test_finite_at_small_temperature():
    z = torch.randn(16, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss, _ = nt_xent(z, z, 0.01)
    loss.backward()
    assert torch.isfinite(loss), f"loss {loss.item()} at tau=0.01"
    assert torch.isfinite(z.grad).all(), "non-finite gradient at tau=0.01"


def test_finite_under_bf16_autocast():
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(32, 16)
    x = torch.randn(16, 32, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = layer(x)  # (2N, D) in bfloat16
        loss, _ = nt_xent(z, z, 0.01)
    loss.backward()
    assert z.dtype == torch.bfloat16, "the layer did not run in bfloat16, so the test checks nothing"
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss), f"loss {loss.item()} under bf16 autocast at tau=0.01"
    assert torch.isfinite(layer.weight.grad).all()
    expected = sum(reference_losses(z.detach().float(), range(16), lambda i: (i + 8) % 16, 0.01)) / 16
    assert loss.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("offset", [0, 6])
def test_self_similarity_gets_no_gradient(monkeypatch, offset):
    captured = []
    original_cross_entropy = F.cross_entropy

    def capturing_cross_entropy(logits, target, *args, **kwargs):
        logits.retain_grad()
        captured.append(logits)
        return original_cross_entropy(logits, target, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", capturing_cross_entropy)
    z_all = torch.randn(12, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)
    z = z_all[offset : offset + 6]
    loss, _ = nt_xent(z, z_all, 0.5, offset=offset)
    loss.backward()

    assert len(captured) == 1, "nt_xent no longer calls F.cross_entropy once; update this test"
    logits = captured[0]  # (2N, 2B)
    rows = torch.arange(6)
    self_logits = logits[rows, offset + rows]
    self_grads = logits.grad[rows, offset + rows]
    assert torch.isneginf(self_logits).all(), f"self-similarity logits {self_logits.tolist()}"
    assert (self_grads == 0).all(), f"self-similarity gradients {self_grads.tolist()}"
    other_grads = logits.grad.clone()
    other_grads[rows, offset + rows] = 0
    assert (other_grads != 0).sum() == 6 * 11, "every other logit should get a gradient"
    assert torch.isfinite(z_all.grad).all()


def test_invariant_to_pair_order():
    generator = torch.Generator().manual_seed(2)
    views1, views2 = torch.randn(6, 8, generator=generator), torch.randn(6, 8, generator=generator)
    permutation = torch.randperm(6, generator=generator)
    z = torch.cat([views1, views2])
    z_permuted = torch.cat([views1[permutation], views2[permutation]])
    loss, _ = nt_xent(z, z, 0.3)
    loss_permuted, _ = nt_xent(z_permuted, z_permuted, 0.3)
    assert loss_permuted.item() == pytest.approx(loss.item(), rel=1e-6)


def test_offset_slice_gives_anchor_losses():
    # Two ranks of N=3 images each: z_all contains rank 0's views, then rank 1's, as gather_with_grad
    # returns them. Each rank's loss covers its own 6 anchors; their positives stay in its block.
    n, world_size, tau = 3, 2, 0.4
    generator = torch.Generator().manual_seed(3)
    views1 = torch.randn(n * world_size, 8, generator=generator)
    views2 = torch.randn(n * world_size, 8, generator=generator)
    z_all = rank_layout(views1, views2, world_size)  # (2B, D)

    def positive_of(i):
        block_start = i // (2 * n) * (2 * n)
        return block_start + (i - block_start + n) % (2 * n)

    for rank in range(world_size):
        offset = rank * 2 * n
        loss, _ = nt_xent(z_all[offset : offset + 2 * n], z_all, tau, offset=offset)
        anchor_losses = reference_losses(z_all, range(offset, offset + 2 * n), positive_of, tau)
        assert loss.item() == pytest.approx(sum(anchor_losses) / (2 * n), rel=1e-5), f"rank {rank}"


def test_offset_halves_average_to_full():
    n, world_size, tau = 4, 2, 0.5
    generator = torch.Generator().manual_seed(4)
    views1 = torch.randn(n * world_size, 16, generator=generator)
    views2 = torch.randn(n * world_size, 16, generator=generator)
    z_all = rank_layout(views1, views2, world_size)
    losses = [nt_xent(z_all[r * 2 * n : (r + 1) * 2 * n], z_all, tau, offset=r * 2 * n)[0] for r in range(2)]
    z_global = torch.cat([views1, views2])  # one process: all first views, then all second views
    full_loss, _ = nt_xent(z_global, z_global, tau)
    assert ((losses[0] + losses[1]) / 2).item() == pytest.approx(full_loss.item(), rel=1e-6)
