"""The gather helpers and the SimCLR loss on two gloo processes against one process on the same global batch.

One torchrun launch of dist_worker.py computes everything; the tests compare its per-rank results
with computations in this process.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import describe_failure, run_torchrun
from dist_worker import make_mlp
from simclr import nt_xent

WORLD_SIZE = 2
IMAGES_PER_RANK = 3  # N
TAU = 0.3


@pytest.fixture(scope="module")
def worker_inputs(tmp_path_factory) -> dict:
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    global_batch = WORLD_SIZE * IMAGES_PER_RANK
    return {
        "views1": torch.randn(global_batch, 6, generator=generator),
        "views2": torch.randn(global_batch, 6, generator=generator),
        "model": make_mlp().state_dict(),
        "tau": TAU,
        "encoder": nn.Linear(6, 5).state_dict(),
        "images": torch.randn(9, 6, generator=generator),  # 5 rows on rank 0, 4 on rank 1
        "labels": torch.arange(9) % 3,
    }


@pytest.fixture(scope="module")
def ranks(worker_inputs, tmp_path_factory) -> list[dict]:
    """The results of dist_worker.py on each of the two ranks, in rank order."""
    folder = tmp_path_factory.mktemp("dist_worker")
    torch.save(worker_inputs, folder / "inputs.pt")
    result = run_torchrun("tests/dist_worker.py", str(folder / "inputs.pt"), str(folder / "out"),
                          processes=WORLD_SIZE)
    assert result.returncode == 0, describe_failure(result)
    return [torch.load(folder / "out" / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def single_process(worker_inputs) -> dict:
    """Loss, outputs and gradients of one process on the whole global batch."""
    model = make_mlp()
    model.load_state_dict(worker_inputs["model"])
    z1, z2 = model(worker_inputs["views1"]), model(worker_inputs["views2"])
    z = torch.cat([z1, z2])  # (2B, D): all first views, then all second views
    loss, _ = nt_xent(z, z, TAU)
    loss.backward()
    return {
        "loss": loss.detach(),
        "z1": z1.detach(),
        "z2": z2.detach(),
        "grads": {name: parameter.grad.clone() for name, parameter in model.named_parameters()},
    }


def test_worker_ran_two_ranks(ranks):
    assert [r["world_size"] for r in ranks] == [WORLD_SIZE, WORLD_SIZE]


def test_gather_with_grad_rank_order(ranks, single_process):
    n = IMAGES_PER_RANK
    blocks = []
    for rank in range(WORLD_SIZE):
        blocks += [single_process["z1"][rank * n : (rank + 1) * n], single_process["z2"][rank * n : (rank + 1) * n]]
    expected = torch.cat(blocks)
    for rank in range(WORLD_SIZE):
        torch.testing.assert_close(ranks[rank]["with_grad"]["z_all"], expected, msg=f"z_all on rank {rank}")


def test_gather_with_grad_matches_one_process(ranks, single_process):
    for rank in range(WORLD_SIZE):
        for name, expected in single_process["grads"].items():
            # float32 sums taken in another order (two halves, then the average) differ by a few
            # units in the last place of the largest terms, which entries near 0 see in full.
            atol = 1e-5 * expected.abs().max().item()
            torch.testing.assert_close(ranks[rank]["with_grad"]["grads"][name], expected, rtol=1e-5, atol=atol,
                                       msg=f"gradient of {name} on rank {rank}")


def test_gather_without_grad_differs(ranks, single_process):
    # The same run with negatives gathered without gradient must give other gradients; otherwise
    # the comparison above could not detect a gather that drops gradients.
    name = "0.weight"
    expected = single_process["grads"][name]
    difference = (ranks[0]["no_grad"]["grads"][name] - expected).abs().max().item()
    # The difference must lie far beyond the tolerance of the comparison above, so that it would fail.
    assert difference > 1e-3 * expected.abs().max().item(), \
        "gradients without the gathered negatives' share match the full ones"


def test_simclr_loss_two_ranks_averaged(ranks, single_process):
    expected = single_process["loss"].item()
    for rank in range(WORLD_SIZE):
        assert ranks[rank]["with_grad"]["mean_loss"].item() == pytest.approx(expected, rel=1e-6), f"rank {rank}"


def test_simclr_loss_per_rank_mean(ranks, single_process):
    local_losses = [ranks[rank]["with_grad"]["loss"].item() for rank in range(WORLD_SIZE)]
    assert local_losses[0] != local_losses[1], "both ranks computed the same local loss"
    assert sum(local_losses) / WORLD_SIZE == pytest.approx(single_process["loss"].item(), rel=1e-6)


def test_gather_no_grad_requires_no_grad(ranks):
    for rank in range(WORLD_SIZE):
        assert ranks[rank]["no_grad_requires_grad"] is False, f"rank {rank}"


def test_gather_no_grad_adds_no_gradient(ranks, worker_inputs):
    n = IMAGES_PER_RANK
    for rank in range(WORLD_SIZE):
        x = torch.cat([worker_inputs["views1"][rank * n : (rank + 1) * n],
                       worker_inputs["views2"][rank * n : (rank + 1) * n]])
        expected = (x[:, :3] + rank).sum(dim=0)  # gradient of local.sum() alone
        torch.testing.assert_close(ranks[rank]["no_grad_weight_grad"], expected, msg=f"rank {rank}")


def test_gather_no_grad_values(ranks, worker_inputs):
    n = IMAGES_PER_RANK
    weight = torch.tensor([1.0, 2.0, 3.0])
    parts = []
    for rank in range(WORLD_SIZE):
        x = torch.cat([worker_inputs["views1"][rank * n : (rank + 1) * n],
                       worker_inputs["views2"][rank * n : (rank + 1) * n]])
        parts.append(weight * (x[:, :3] + rank))
    for rank in range(WORLD_SIZE):
        torch.testing.assert_close(ranks[rank]["no_grad_gathered"], torch.cat(parts), msg=f"rank {rank}")


def test_gather_uneven_row_counts(ranks):
    expected = [torch.full((3 + 2 * rank, 4), float(rank)) + torch.arange(4.0) for rank in range(WORLD_SIZE)]
    for rank in range(WORLD_SIZE):
        parts = ranks[rank]["uneven_float"]
        assert [part.shape[0] for part in parts] == [3, 5], f"row counts on rank {rank}"
        for source, (part, want) in enumerate(zip(parts, expected)):
            assert torch.equal(part, want), f"rank {rank}: part from rank {source}"


def test_gather_uneven_empty_rank(ranks):
    for rank in range(WORLD_SIZE):
        parts = ranks[rank]["uneven_empty"]
        assert [tuple(part.shape) for part in parts] == [(2, 3), (0, 3)], f"shapes on rank {rank}"
        assert torch.equal(parts[0], torch.ones(2, 3)), f"rank {rank}"


def test_gather_uneven_integer_dtype(ranks):
    for rank in range(WORLD_SIZE):
        parts = ranks[rank]["uneven_long"]
        assert all(part.dtype == torch.long for part in parts), f"dtypes on rank {rank}"
        assert [part.tolist() for part in parts] == [[0, 10, 20], [1, 11, 21, 31, 41]], f"rank {rank}"


def test_extract_features_dataset_order(ranks, worker_inputs):
    encoder = nn.Linear(6, 5)
    encoder.load_state_dict(worker_inputs["encoder"])
    with torch.no_grad():
        expected = encoder(worker_inputs["images"])
    for rank in range(WORLD_SIZE):
        torch.testing.assert_close(ranks[rank]["features"], expected, msg=f"features on rank {rank}")
        assert torch.equal(ranks[rank]["labels"], worker_inputs["labels"]), f"labels on rank {rank}"
