"""dcl.dcl_loss and dcl.dclw_weights against plain-loop references and values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from dcl import dcl_loss, dclw_weights
from simclr import nt_xent


def unit_rows(z: torch.Tensor) -> list[list[float]]:
    rows = []
    for row in z.double().tolist():
        norm = math.sqrt(sum(value * value for value in row))
        rows.append([value / norm for value in row])
    return rows


def reference_losses(z_all: torch.Tensor, anchors: range, positive_of, tau: float,
                     weights: list[float] | None = None) -> list[float]:
    """Per-anchor DCL(W) in float64 Python loops:
    l_i = -w_i s_ip/tau + log(sum over k not in {i, p(i)} of exp(s_ik/tau)), with w_i = 1 for DCL."""
    rows = unit_rows(z_all)
    losses = []
    for i in anchors:
        p = positive_of(i)
        logits = [sum(a * b for a, b in zip(rows[i], rows[k])) / tau for k in range(len(rows))]
        negatives = sum(math.exp(logits[k]) for k in range(len(rows)) if k not in (i, p))
        weight = 1.0 if weights is None else weights[i]
        losses.append(math.log(negatives) - weight * logits[p])
    return losses


def reference_weights(pair_similarities: list[float], sigma: float) -> list[float]:
    """w_i = 2 - exp(s_i/sigma) / mean_j exp(s_j/sigma), by Python loops."""
    exps = [math.exp(s / sigma) for s in pair_similarities]
    mean = sum(exps) / len(exps)
    return [2 - e / mean for e in exps]


def pair_similarities(z: torch.Tensor) -> list[float]:
    """Cosine similarity of image i's two views, rows i and i+N of one process's z."""
    rows = unit_rows(z)
    n = len(rows) // 2
    return [sum(a * b for a, b in zip(rows[i], rows[i + n])) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# DCL
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, d, tau", [(2, 3, 0.5), (4, 8, 0.1), (7, 16, 1.0), (5, 4, 0.01), (3, 128, 0.2)])
def test_loss_matches_loop_reference(n, d, tau):
    z = torch.randn(2 * n, d, generator=torch.Generator().manual_seed(n * 100 + d))
    loss, _ = dcl_loss(z, z, tau)
    expected = sum(reference_losses(z, range(2 * n), lambda i: (i + n) % (2 * n), tau)) / (2 * n)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("n", [2, 3, 8])
@pytest.mark.parametrize("tau", [0.1, 0.5, 2.0])
def test_identical_views_give_log_negatives(n, tau):
    # Every similarity is 1: l_i = -1/tau + log((2N-2) e^(1/tau)) = log(2N-2).
    z = torch.ones(2 * n, 5)
    loss, _ = dcl_loss(z, z, tau)
    assert loss.item() == pytest.approx(math.log(2 * n - 2), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("tau", [0.05, 0.1, 0.5, 1.0])
def test_orthogonal_identical_views_closed_form(tau):
    # Two images along e1 and e2, each view equal to its partner: the positive has similarity 1
    # and the two negatives 0, so l = -1/tau + log 2, where NT-Xent gives log(1 + 2 e^(-1/tau)).
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    loss, accuracy = dcl_loss(z, z, tau)
    assert loss.item() == pytest.approx(math.log(2) - 1 / tau, rel=1e-5)
    assert accuracy.item() == 1.0


@pytest.mark.parametrize("n, d, tau", [(2, 4, 0.5), (4, 8, 0.1), (6, 16, 0.3)])
def test_differs_from_nt_xent_by_positive_term(n, d, tau):
    # NT-Xent's l_i = -s_ip/tau + log(e^(s_ip/tau) + S_i) and DCL's -s_ip/tau + log S_i, where S_i
    # sums over the negatives, so NT-Xent - DCL = mean_i log(1 + e^(s_ip/tau) / S_i).
    z = torch.randn(2 * n, d, generator=torch.Generator().manual_seed(n))
    rows = unit_rows(z)
    gaps = []
    for i in range(2 * n):
        p = (i + n) % (2 * n)
        logits = [sum(a * b for a, b in zip(rows[i], rows[k])) / tau for k in range(2 * n)]
        negatives = sum(math.exp(logits[k]) for k in range(2 * n) if k not in (i, p))
        gaps.append(math.log(1 + math.exp(logits[p]) / negatives))
    dcl, _ = dcl_loss(z, z, tau)
    ntx, _ = nt_xent(z, z, tau)
    assert (ntx - dcl).item() == pytest.approx(sum(gaps) / (2 * n), rel=1e-5, abs=1e-7)
    assert (ntx - dcl).item() > 0


def test_accuracy_matches_nt_xent():
    z = torch.randn(18, 6, generator=torch.Generator().manual_seed(5))
    _, accuracy = dcl_loss(z, z, 0.5)
    _, expected = nt_xent(z, z, 0.5)
    assert accuracy.item() == expected.item()


def test_finite_at_small_temperature():
    z = torch.randn(16, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss, _ = dcl_loss(z, z, 0.01)
    loss.backward()
    assert torch.isfinite(loss), f"loss {loss.item()} at tau=0.01"
    assert torch.isfinite(z.grad).all(), "non-finite gradient at tau=0.01"
    expected = sum(reference_losses(z.detach(), range(16), lambda i: (i + 8) % 16, 0.01)) / 16
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("sigma", [None, 0.5])
def test_finite_under_bf16_autocast(sigma):
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(32, 16)
    x = torch.randn(16, 32, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = layer(x)  # (2N, D) in bfloat16
        loss, _ = dcl_loss(z, z, 0.01, sigma=sigma)
    loss.backward()
    assert z.dtype == torch.bfloat16, "the layer did not run in bfloat16, so the test checks nothing"
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss), f"loss {loss.item()} under bf16 autocast at tau=0.01"
    assert torch.isfinite(layer.weight.grad).all()
    z_float = z.detach().float()
    weights = None if sigma is None else reference_weights(pair_similarities(z_float), sigma) * 2
    expected = sum(reference_losses(z_float, range(16), lambda i: (i + 8) % 16, 0.01, weights)) / 16
    assert loss.item() == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# DCLW weights
# ---------------------------------------------------------------------------------------------


def test_weights_hand_computed():
    # N=4, sigma=0.5, pair similarities [1, -1, -1, -1]: exp(s/sigma) is e^2 once and e^-2 three
    # times, so w_0 = 2 - 4 e^2 / (e^2 + 3 e^-2) and w_1..3 = 2 - 4 e^-2 / (e^2 + 3 e^-2).
    weights = dclw_weights(torch.tensor([1.0, -1.0, -1.0, -1.0], dtype=torch.float64), 0.5)
    total = math.exp(2) + 3 * math.exp(-2)
    w_close = 2 - 4 * math.exp(2) / total
    w_far = 2 - 4 * math.exp(-2) / total
    assert weights.tolist() == pytest.approx([w_close, w_far, w_far, w_far], rel=1e-12)
    assert w_close == pytest.approx(-1.79166, abs=1e-5)
    assert w_far == pytest.approx(1.93055, abs=1e-5)


@pytest.mark.parametrize("b, sigma", [(2, 0.5), (4, 0.1), (64, 0.5), (256, 2.0)])
def test_weights_average_one(b, sigma):
    similarities = torch.rand(b, generator=torch.Generator().manual_seed(b), dtype=torch.float64) * 2 - 1
    weights = dclw_weights(similarities, sigma)
    assert weights.mean().item() == pytest.approx(1.0, abs=1e-12)
    assert weights.tolist() == pytest.approx(reference_weights(similarities.tolist(), sigma), rel=1e-10)


def test_weights_equal_pairs_give_one():
    weights = dclw_weights(torch.full((5,), 0.3), 0.5)
    torch.testing.assert_close(weights, torch.ones(5))


@pytest.mark.parametrize("n, d, tau, sigma", [(2, 3, 0.5, 0.5), (4, 8, 0.1, 0.5), (6, 16, 0.2, 1.0)])
def test_weighted_loss_matches_loop_reference(n, d, tau, sigma):
    z = torch.randn(2 * n, d, generator=torch.Generator().manual_seed(n * 10 + d))
    loss, _ = dcl_loss(z, z, tau, sigma=sigma)
    weights = reference_weights(pair_similarities(z), sigma)
    per_view = weights + weights  # views i and i+N share w_i
    expected = sum(reference_losses(z, range(2 * n), lambda i: (i + n) % (2 * n), tau, per_view)) / (2 * n)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_weighted_loss_equal_weights_is_dcl():
    # Pairs with the same similarity get w = 1, where DCLW equals DCL.
    z = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.6, 0.8]])
    pairs = pair_similarities(z)
    assert pairs[0] == pytest.approx(pairs[1])
    weighted, _ = dcl_loss(z, z, 0.3, sigma=0.5)
    plain, _ = dcl_loss(z, z, 0.3)
    assert weighted.item() == pytest.approx(plain.item(), rel=1e-6)


def test_weights_carry_no_gradient():
    # The weights are constants for the gradient: the gradient equals that of the loop formula
    # with w fixed at its value, and differs from the one where w is differentiated too.
    n, tau, sigma = 4, 0.2, 0.5
    z0 = torch.randn(2 * n, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    z = z0.clone().requires_grad_(True)
    loss, _ = dcl_loss(z, z, tau, sigma=sigma)
    loss.backward()

    def explicit_loss(z_in: torch.Tensor, detach_weights: bool) -> torch.Tensor:
        u = torch.nn.functional.normalize(z_in, dim=1)
        s = u @ u.T / tau
        positive = (torch.arange(2 * n) + n) % (2 * n)
        pair = (u[:n] * u[n:]).sum(dim=1)
        w = 2 - n * torch.softmax((pair.detach() if detach_weights else pair) / sigma, dim=0)
        w = w.repeat(2)
        total = 0
        for i in range(2 * n):
            keep = [k for k in range(2 * n) if k not in (i, int(positive[i]))]
            total = total + torch.logsumexp(s[i, keep], dim=0) - w[i] * s[i, positive[i]]
        return total / (2 * n)

    z_constant = z0.clone().requires_grad_(True)
    explicit_loss(z_constant, detach_weights=True).backward()
    z_through = z0.clone().requires_grad_(True)
    explicit_loss(z_through, detach_weights=False).backward()

    torch.testing.assert_close(z.grad.double(), z_constant.grad, rtol=1e-5, atol=1e-7)
    assert (z_through.grad - z_constant.grad).abs().max().item() > 1e-3, (
        "differentiating through w changes nothing here, so this test cannot tell the two apart")


def test_weights_use_global_batch():
    # Two ranks of N=2: each rank's loss uses the softmax over all B=4 pairs in z_all, so the two
    # halves average to the one-process loss on the same global batch.
    n, world_size, tau, sigma = 2, 2, 0.3, 0.5
    generator = torch.Generator().manual_seed(11)
    views1 = torch.randn(n * world_size, 5, generator=generator)
    views2 = torch.randn(n * world_size, 5, generator=generator)
    blocks = []
    for v1, v2 in zip(views1.chunk(world_size), views2.chunk(world_size)):
        blocks += [v1, v2]
    z_all = torch.cat(blocks)  # per rank: its first views, then its second views
    halves = [dcl_loss(z_all[r * 2 * n : (r + 1) * 2 * n], z_all, tau, offset=r * 2 * n, sigma=sigma)[0]
              for r in range(world_size)]
    z_global = torch.cat([views1, views2])
    full, _ = dcl_loss(z_global, z_global, tau, sigma=sigma)
    assert ((halves[0] + halves[1]) / 2).item() == pytest.approx(full.item(), rel=1e-6)
    # A rank that used only its own pairs would weight them differently.
    local = [dcl_loss(z_all[r * 2 * n : (r + 1) * 2 * n], z_all[r * 2 * n : (r + 1) * 2 * n], tau, sigma=sigma)[0]
             for r in range(world_size)]
    assert local[0].item() != pytest.approx(halves[0].item(), rel=1e-3)


@pytest.mark.parametrize("rows, all_rows", [(5, 5), (4, 6), (2, 2)], ids=["odd", "not a multiple", "one image"])
def test_bad_shapes_rejected(rows, all_rows):
    z_all = torch.randn(all_rows, 3)
    with pytest.raises(ValueError, match="dcl_loss needs z of 2N rows"):
        dcl_loss(z_all[:rows], z_all, 0.5)
