"""Worker for test_dcl_distributed.py: the DCL and DCLW losses and gradients on each gloo rank.

Usage: torchrun --nproc_per_node=2 tests/dcl_dist_worker.py INPUTS.pt OUTPUT_DIR

INPUTS.pt is written by the test: the global batch of both views, the weights of a small MLP and
the temperature and sigma. Each rank takes its share of the global batch, as the
DistributedSampler would, and writes its results to OUTPUT_DIR/rank<r>.pt.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import dcl  # noqa: E402
from dist_worker import make_mlp  # noqa: E402


def dcl_step(inputs: dict, x: torch.Tensor, offset: int, sigma) -> dict:
    """Forward the local views through DDP, compute the DCL loss against the gathered views, and backpropagate."""
    model = make_mlp()
    model.load_state_dict(inputs["model"])
    ddp_model = DDP(model)
    z = ddp_model(x)  # (2N, D)
    z_all = common.gather_with_grad(z)  # (2B, D)
    loss, accuracy = dcl.dcl_loss(z, z_all, inputs["tau"], offset=offset, sigma=sigma)
    loss.backward()
    return {
        "loss": loss.detach(),
        "mean_loss": common.all_reduce_mean(loss),
        "mean_accuracy": common.all_reduce_mean(accuracy),
        "grads": {name: parameter.grad.clone() for name, parameter in model.named_parameters()},
    }


def main() -> None:
    inputs_path, output_dir = sys.argv[1], sys.argv[2]
    env = common.read_dist_env()
    common.init_distributed(env)
    inputs = torch.load(inputs_path, weights_only=True)
    rank, world_size = env.rank, env.world_size
    n = inputs["views1"].shape[0] // world_size
    x = torch.cat([inputs["views1"][rank * n : (rank + 1) * n], inputs["views2"][rank * n : (rank + 1) * n]])
    results = {
        "world_size": world_size,
        "dcl": dcl_step(inputs, x, rank * 2 * n, None),
        "dclw": dcl_step(inputs, x, rank * 2 * n, inputs["sigma"]),
    }
    os.makedirs(output_dir, exist_ok=True)
    torch.save(results, os.path.join(output_dir, f"rank{rank}.pt"))
    # Without the barrier, gloo sometimes aborts when the group is destroyed at exit.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
