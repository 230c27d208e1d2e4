"""Worker for test_distributed.py: run the gather helpers and the SimCLR loss on each gloo rank.

Usage: torchrun --nproc_per_node=2 tests/dist_worker.py INPUTS.pt OUTPUT_DIR

INPUTS.pt is written by the test: the global batch of both views, the weights of a small MLP and
the temperature. Each rank takes its share of the global batch, as the DistributedSampler would,
and writes what it computed to OUTPUT_DIR/rank<r>.pt. The test compares those files with one
process on the whole batch.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import simclr  # noqa: E402


def make_mlp() -> nn.Sequential:
    """The model whose gradients are compared; it has no BatchNorm, so ranks do not differ by batch statistics."""
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4))


def simclr_step(inputs: dict, x: torch.Tensor, offset: int, gather) -> dict:
    """Forward the local views through DDP, compute NT-Xent against `gather(z)`, and backpropagate."""
    model = make_mlp()
    model.load_state_dict(inputs["model"])
    ddp_model = DDP(model)
    z = ddp_model(x)  # (2N, D)
    z_all = gather(z)  # (2B, D)
    loss, _ = simclr.nt_xent(z, z_all, inputs["tau"], offset=offset)
    loss.backward()
    return {
        "loss": loss.detach(),
        "mean_loss": common.all_reduce_mean(loss),
        "z_all": z_all.detach(),
        "grads": {name: parameter.grad.clone() for name, parameter in model.named_parameters()},
    }


def main() -> None:
    inputs_path, output_dir = sys.argv[1], sys.argv[2]
    env = common.read_dist_env()
    common.init_distributed(env)
    inputs = torch.load(inputs_path, weights_only=True)
    rank, world_size = env.rank, env.world_size
    n = inputs["views1"].shape[0] // world_size
    views1 = inputs["views1"][rank * n : (rank + 1) * n]
    views2 = inputs["views2"][rank * n : (rank + 1) * n]
    x = torch.cat([views1, views2])  # (2N, 6)
    results: dict = {"world_size": world_size}

    # (a, b) NT-Xent with negatives gathered with gradient, and, for contrast, without.
    results["with_grad"] = simclr_step(inputs, x, rank * 2 * n, common.gather_with_grad)
    results["no_grad"] = simclr_step(inputs, x, rank * 2 * n, common.gather_no_grad)

    # (c) gather_no_grad: the gathered copy must carry no gradient back to `weight`.
    weight = nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    local = weight * (x[:, :3] + rank)  # (2N, 3)
    gathered = common.gather_no_grad(local)
    (local.sum() + (gathered**2).sum()).backward()
    results["no_grad_gathered"] = gathered
    results["no_grad_requires_grad"] = gathered.requires_grad
    results["no_grad_weight_grad"] = weight.grad.clone()

    # (d) gather_uneven: 3 and 5 rows, then 2 and 0 rows, of float and integer tensors.
    results["uneven_float"] = common.gather_uneven(torch.full((3 + 2 * rank, 4), float(rank)) + torch.arange(4.0))
    results["uneven_empty"] = common.gather_uneven(torch.ones(2 - 2 * rank, 3) * (rank + 1))
    results["uneven_long"] = common.gather_uneven(torch.arange(3 + 2 * rank) * 10 + rank)

    # extract_features: rank r encodes images r, r+W, ...; the result must be in dataset order.
    encoder = nn.Linear(6, 5)
    encoder.load_state_dict(inputs["encoder"])
    dataset = TensorDataset(inputs["images"], inputs["labels"])
    features, labels = common.extract_features(encoder.eval(), dataset, 2, 0, env, "fp32")
    results["features"], results["labels"] = features, labels

    os.makedirs(output_dir, exist_ok=True)
    torch.save(results, os.path.join(output_dir, f"rank{rank}.pt"))
    # Without the barrier, gloo sometimes aborts when the group is destroyed at exit.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
