"""MoCo on two gloo processes against one process on the same global batches: queue, weights,
loss and shuffling BN across ranks.

One torchrun launch of moco_dist_worker.py computes everything; the tests compare its per-rank
results with the same steps in this process.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moco
from conftest import describe_failure, run_torchrun
from moco_dist_worker import make_bn_key_encoder, make_model

WORLD_SIZE = 2
GLOBAL_BATCH = 4  # B; N = 2 per rank
STEPS = 3
K = 8  # the queue wraps around after two steps


@pytest.fixture(scope="module")
def worker_inputs() -> dict:
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    inputs = {"K": K, "m": 0.9, "tau": 0.2, "lr": 0.5, "shuffle_seed": 1}
    inputs["model"] = moco.MoCo(torch.nn.Linear(6, 5), feature_dim=5, dim=3, K=K, mlp=True).state_dict()
    inputs["x_q"] = [torch.randn(GLOBAL_BATCH, 6, generator=generator) for _ in range(STEPS)]
    inputs["x_k"] = [x + 0.1 * torch.randn(GLOBAL_BATCH, 6, generator=generator) for x in inputs["x_q"]]
    monitor_backbone = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5))
    inputs["monitor_backbone"] = monitor_backbone.state_dict()
    inputs["monitor_images"] = torch.randn(10, 6, generator=generator)
    inputs["monitor_labels"] = torch.arange(10) % 2
    bn_key_encoder = make_bn_key_encoder()
    with torch.no_grad():
        bn_key_encoder[1].weight.uniform_(0.5, 2.0, generator=generator)
        bn_key_encoder[1].bias.uniform_(-1.0, 1.0, generator=generator)
    inputs["bn_key_encoder"] = bn_key_encoder.state_dict()
    return inputs


@pytest.fixture(scope="module")
def ranks(worker_inputs, tmp_path_factory) -> list[dict]:
    """The results of moco_dist_worker.py on each of the two ranks, in rank order."""
    folder = tmp_path_factory.mktemp("moco_dist_worker")
    torch.save(worker_inputs, folder / "inputs.pt")
    result = run_torchrun("tests/moco_dist_worker.py", str(folder / "inputs.pt"), str(folder / "out"),
                          processes=WORLD_SIZE)
    assert result.returncode == 0, describe_failure(result)
    return [torch.load(folder / "out" / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def single_process(worker_inputs) -> dict:
    """The same steps in one process on the whole global batches."""
    model = make_model(worker_inputs)
    optimizer = torch.optim.SGD(list(model.backbone.parameters()) + list(model.head.parameters()),
                                lr=worker_inputs["lr"])
    results: dict = {"queues": [], "pointers": [], "losses": []}
    for x_q, x_k in zip(worker_inputs["x_q"], worker_inputs["x_k"]):
        q = model(x_q)
        model.momentum_update(worker_inputs["m"])
        k, k_all = moco.encode_keys(model.key_encoder, x_k)
        loss, _ = moco.moco_loss(F.normalize(q, dim=1), k, model.queue, worker_inputs["tau"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.enqueue(k_all)
        results["queues"].append(model.queue.clone())
        results["pointers"].append(int(model.queue_ptr))
        results["losses"].append(loss.detach())
    results["state"] = model.state_dict()
    return results


def test_worker_ran_two_ranks(ranks):
    assert [r["world_size"] for r in ranks] == [WORLD_SIZE, WORLD_SIZE]


@pytest.mark.parametrize("step", range(STEPS))
def test_queue_identical_on_ranks(ranks, step):
    assert torch.equal(ranks[0]["queues"][step], ranks[1]["queues"][step]), f"queues differ after step {step + 1}"
    assert ranks[0]["pointers"][step] == ranks[1]["pointers"][step]


@pytest.mark.parametrize("step", range(STEPS))
def test_queue_matches_one_process(ranks, single_process, step):
    torch.testing.assert_close(ranks[0]["queues"][step], single_process["queues"][step],
                               msg=f"queue after step {step + 1}")
    assert ranks[0]["pointers"][step] == single_process["pointers"][step] == (step + 1) * GLOBAL_BATCH % K


def test_loss_matches_one_process(ranks, single_process):
    for step in range(STEPS):
        torch.testing.assert_close(ranks[0]["losses"][step], single_process["losses"][step],
                                   msg=f"mean loss at step {step + 1}")


def test_weights_match_one_process(ranks, single_process):
    # Both encoders after three SGD steps and momentum updates.
    for name, value in single_process["state"].items():
        for rank in range(WORLD_SIZE):
            torch.testing.assert_close(ranks[rank]["state"][name], value, msg=f"{name} on rank {rank}")


def test_shuffle_restores_key_order(ranks, worker_inputs):
    # The BatchNorm key encoder encodes a permuted batch, and its keys must come back in image order.
    B, n = GLOBAL_BATCH, GLOBAL_BATCH // WORLD_SIZE
    torch.manual_seed(worker_inputs["shuffle_seed"])
    perm = torch.randperm(B)  # rank 0's draw, broadcast to every rank
    key_encoder = make_bn_key_encoder()
    key_encoder.load_state_dict(worker_inputs["bn_key_encoder"])
    key_encoder.train()
    x = worker_inputs["x_k"][0]
    expected = torch.empty(B, 3)
    for rank in range(WORLD_SIZE):
        images = perm[rank * n : (rank + 1) * n]  # the shuffled share that rank encodes
        expected[images] = F.normalize(key_encoder(x[images]), dim=1).detach()
    for rank in range(WORLD_SIZE):
        torch.testing.assert_close(ranks[rank]["bn_keys_all"], expected, msg=f"all keys on rank {rank}")
        torch.testing.assert_close(ranks[rank]["bn_keys"], expected[rank * n : (rank + 1) * n],
                                   msg=f"own keys on rank {rank}")


def test_shuffle_mixes_ranks(worker_inputs):
    # The permutation of the check above must move images across ranks, or it proves little.
    torch.manual_seed(worker_inputs["shuffle_seed"])
    perm = torch.randperm(GLOBAL_BATCH)
    assert set(perm[: GLOBAL_BATCH // 2].tolist()) != {0, 1}
    # Rank 1 draws another permutation, so only the broadcast makes the ranks agree.
    torch.manual_seed(worker_inputs["shuffle_seed"] + 1)
    assert not torch.equal(torch.randperm(GLOBAL_BATCH), perm)


def test_gather_channels_last_images(ranks):
    images = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    expected = torch.cat([images, images + 100])  # rank 0's rows, then rank 1's
    for rank in range(WORLD_SIZE):
        assert torch.equal(ranks[rank]["gathered_channels_last"], expected), f"rank {rank}"


def test_symmetric_gradients_match_one_process(ranks, worker_inputs):
    # Two DDP forwards of f_q before one backward must still average the gradients correctly.
    model = make_model(worker_inputs)
    x1, x2 = worker_inputs["x_q"][0], worker_inputs["x_k"][0]
    loss = 0
    for x_q, x_k in ((x1, x2), (x2, x1)):
        k, _ = moco.encode_keys(model.key_encoder, x_k)
        loss = loss + moco.moco_loss(F.normalize(model(x_q), dim=1), k, model.queue, worker_inputs["tau"])[0]
    loss.backward()
    expected = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert len(expected) == 6, "backbone weight and bias, and the MLP head's four tensors"
    for rank in range(WORLD_SIZE):
        assert set(ranks[rank]["symmetric_grads"]) == set(expected)
        for name, grad in expected.items():
            torch.testing.assert_close(ranks[rank]["symmetric_grads"][name], grad, msg=f"{name} on rank {rank}")


def test_knn_monitor_uses_rank0_statistics(ranks):
    for rank in range(WORLD_SIZE):
        assert torch.equal(ranks[rank]["monitor_running_mean"], torch.zeros(5)), f"rank {rank}"
    assert ranks[0]["monitor_knn"] == ranks[1]["monitor_knn"]
