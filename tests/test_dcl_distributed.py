"""The DCL and DCLW losses on two gloo processes against one process on the same global batch."""

from __future__ import annotations

import pytest
import torch

from conftest import describe_failure, run_torchrun
from dcl import dcl_loss
from dist_worker import make_mlp

WORLD_SIZE = 2
IMAGES_PER_RANK = 3  # N
TAU = 0.2
SIGMA = 0.5
VARIANTS = {"dcl": None, "dclw": SIGMA}


@pytest.fixture(scope="module")
def worker_inputs() -> dict:
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    global_batch = WORLD_SIZE * IMAGES_PER_RANK
    return {
        "views1": torch.randn(global_batch, 6, generator=generator),
        "views2": torch.randn(global_batch, 6, generator=generator),
        "model": make_mlp().state_dict(),
        "tau": TAU,
        "sigma": SIGMA,
    }


@pytest.fixture(scope="module")
def ranks(worker_inputs, tmp_path_factory) -> list[dict]:
    """The results of dcl_dist_worker.py on each of the two ranks, in rank order."""
    folder = tmp_path_factory.mktemp("dcl_dist_worker")
    torch.save(worker_inputs, folder / "inputs.pt")
    result = run_torchrun("tests/dcl_dist_worker.py", str(folder / "inputs.pt"), str(folder / "out"),
                          processes=WORLD_SIZE)
    assert result.returncode == 0, describe_failure(result)
    return [torch.load(folder / "out" / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def single_process(worker_inputs) -> dict:
    """Loss and gradients of one process on the whole global batch, for DCL and DCLW."""
    results = {}
    for variant, sigma in VARIANTS.items():
        model = make_mlp()
        model.load_state_dict(worker_inputs["model"])
        z = torch.cat([model(worker_inputs["views1"]), model(worker_inputs["views2"])])  # (2B, D)
        loss, accuracy = dcl_loss(z, z, TAU, sigma=sigma)
        loss.backward()
        results[variant] = {
            "loss": loss.detach(),
            "accuracy": accuracy,
            "grads": {name: parameter.grad.clone() for name, parameter in model.named_parameters()},
        }
    return results


def test_worker_ran_two_ranks(ranks):
    assert [r["world_size"] for r in ranks] == [WORLD_SIZE, WORLD_SIZE]


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_matches_one_process(ranks, single_process, variant):
    expected = single_process[variant]["loss"].item()
    for rank in range(WORLD_SIZE):
        assert ranks[rank][variant]["mean_loss"].item() == pytest.approx(expected, rel=1e-6), f"rank {rank}"
    local = [ranks[rank][variant]["loss"].item() for rank in range(WORLD_SIZE)]
    assert local[0] != local[1], "both ranks computed the same local loss, so the comparison is vacuous"


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_match_one_process(ranks, single_process, variant):
    for rank in range(WORLD_SIZE):
        for name, expected in single_process[variant]["grads"].items():
            # float32 sums taken in another order (two halves, then the average) differ by a few
            # units in the last place of the largest terms, which entries near 0 see in full.
            atol = 1e-5 * expected.abs().max().item()
            torch.testing.assert_close(ranks[rank][variant]["grads"][name], expected, rtol=1e-5, atol=atol,
                                       msg=f"{variant}: gradient of {name} on rank {rank}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_accuracy_matches_one_process(ranks, single_process, variant):
    for rank in range(WORLD_SIZE):
        assert ranks[rank][variant]["mean_accuracy"].item() == pytest.approx(
            single_process[variant]["accuracy"].item()), f"rank {rank}"


def test_weighting_changes_gradients(single_process):
    # Otherwise the DCLW comparison above could pass with the weights ignored.
    plain = single_process["dcl"]["grads"]["0.weight"]
    difference = (single_process["dclw"]["grads"]["0.weight"] - plain).abs().max()
    # The difference must lie far beyond the tolerance of the gradient comparison, so that it would fail.
    assert difference.item() > 1e-3 * plain.abs().max().item()
