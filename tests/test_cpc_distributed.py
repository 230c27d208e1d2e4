"""CPC's InfoNCE loss on two gloo processes against one process on the same global batch."""

from __future__ import annotations

import pytest
import torch

from conftest import describe_failure, run_torchrun
from cpc_dist_worker import SKIP, make_cpc
from infonce_cpc import info_nce

WORLD_SIZE = 2
IMAGES_PER_RANK = 3  # N
GRID = 5  # G
PATCH = 4  # P
TAU = 0.5


@pytest.fixture(scope="module")
def worker_inputs() -> dict:
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    return {
        "patches": torch.randn(WORLD_SIZE * IMAGES_PER_RANK, GRID, GRID, 3, PATCH, PATCH, generator=generator,
                               dtype=torch.float64),
        "model": make_cpc().double().state_dict(),
        "tau": TAU,
    }


@pytest.fixture(scope="module")
def ranks(worker_inputs, tmp_path_factory) -> list[dict]:
    """The results of cpc_dist_worker.py on each of the two ranks, in rank order."""
    folder = tmp_path_factory.mktemp("cpc_dist_worker")
    torch.save(worker_inputs, folder / "inputs.pt")
    result = run_torchrun("tests/cpc_dist_worker.py", str(folder / "inputs.pt"), str(folder / "out"),
                          processes=WORLD_SIZE)
    assert result.returncode == 0, describe_failure(result)
    return [torch.load(folder / "out" / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def single_process(worker_inputs) -> dict:
    """Loss, accuracy and gradients of one process on the whole global batch."""
    model = make_cpc().double()
    model.load_state_dict(worker_inputs["model"])
    predictions, targets = model(worker_inputs["patches"])
    loss, accuracy = info_nce(predictions, targets, SKIP, TAU)
    loss.backward()
    return {
        "loss": loss.detach(),
        "accuracy": accuracy,
        "grads": {name: parameter.grad.clone() for name, parameter in model.named_parameters()},
    }


def test_worker_ran_two_ranks(ranks):
    assert [r["world_size"] for r in ranks] == [WORLD_SIZE, WORLD_SIZE]


def test_loss_matches_one_process(ranks, single_process):
    expected = single_process["loss"].item()
    for rank in range(WORLD_SIZE):
        assert ranks[rank]["mean_loss"].item() == pytest.approx(expected, rel=1e-12), f"rank {rank}"
    local = [ranks[rank]["loss"].item() for rank in range(WORLD_SIZE)]
    assert local[0] != local[1], "both ranks computed the same local loss, so the comparison is vacuous"


def test_gradients_match_one_process(ranks, single_process):
    # The targets of the other rank are candidates, so their encoder gradients must come back
    # through the gather: without it the encoder gradients differ.
    for rank in range(WORLD_SIZE):
        for name, expected in single_process["grads"].items():
            torch.testing.assert_close(ranks[rank]["grads"][name], expected, rtol=1e-9, atol=1e-12,
                                       msg=f"gradient of {name} on rank {rank}")


def test_accuracy_matches_one_process(ranks, single_process):
    for rank in range(WORLD_SIZE):
        assert ranks[rank]["mean_accuracy"].item() == pytest.approx(single_process["accuracy"].item()), f"rank {rank}"


def test_local_negatives_give_other_gradients(worker_inputs, single_process):
    # Without the other rank's targets as candidates the gradients differ, so the comparison above
    # checks the gather and not only the averaging.
    model = make_cpc().double()
    model.load_state_dict(worker_inputs["model"])
    predictions, targets = model(worker_inputs["patches"][:IMAGES_PER_RANK])
    loss, _ = info_nce(predictions, targets, SKIP, TAU)
    loss.backward()
    name = "backbone.0.weight"
    difference = (model.get_parameter(name).grad - single_process["grads"][name]).abs().max()
    assert difference.item() > 1e-6
