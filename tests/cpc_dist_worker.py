"""Worker for test_cpc_distributed.py: the CPC InfoNCE loss and gradients on each gloo rank.

Usage: torchrun --nproc_per_node=2 tests/cpc_dist_worker.py INPUTS.pt OUTPUT_DIR

INPUTS.pt is written by the test: the patch grids of the global batch and the weights of a small
CPC model (make_cpc). Each rank takes its share of the global batch, as the DistributedSampler
would, and writes its results to OUTPUT_DIR/rank<r>.pt.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import infonce_cpc  # noqa: E402

FEATURES = 8  # F
PRED_STEPS = 2  # K
SKIP = 1


def make_cpc() -> infonce_cpc.CPC:
    """A CPC model small enough for exact CPU comparisons: a two-layer convolutional patch encoder
    with layer normalisation, 2 context blocks and 2 prediction steps."""
    backbone = nn.Sequential(
        nn.Conv2d(3, FEATURES, kernel_size=3, padding=1),
        nn.GroupNorm(1, FEATURES),
        nn.ReLU(),
        nn.Conv2d(FEATURES, FEATURES, kernel_size=3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return infonce_cpc.CPC(backbone, FEATURES, PRED_STEPS, context_blocks=2, context_width=4,
                           target_projection=True)


def main() -> None:
    inputs_path, output_dir = sys.argv[1], sys.argv[2]
    env = common.read_dist_env()
    common.init_distributed(env)
    inputs = torch.load(inputs_path, weights_only=True)
    rank, world_size = env.rank, env.world_size
    n = inputs["patches"].shape[0] // world_size
    model = make_cpc().double()
    model.load_state_dict(inputs["model"])
    ddp_model = DDP(model)
    predictions, targets = ddp_model(inputs["patches"][rank * n : (rank + 1) * n])
    targets_all = common.gather_with_grad(targets)  # (B, F, G, G)
    loss, accuracy = infonce_cpc.info_nce(predictions, targets_all, SKIP, inputs["tau"], offset=rank * n)
    loss.backward()
    results = {
        "world_size": world_size,
        "loss": loss.detach(),
        "mean_loss": common.all_reduce_mean(loss.detach()),
        "mean_accuracy": common.all_reduce_mean(accuracy),
        "grads": {name: parameter.grad.clone() for name, parameter in model.named_parameters()},
    }
    os.makedirs(output_dir, exist_ok=True)
    torch.save(results, os.path.join(output_dir, f"rank{rank}.pt"))
    common.cleanup_distributed()  # a barrier first, without which gloo sometimes aborts at exit


if __name__ == "__main__":
    main()
