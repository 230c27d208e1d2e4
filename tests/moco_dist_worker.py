"""Worker for test_moco_distributed.py: MoCo training steps and shuffling BN on each gloo rank.

Usage: torchrun --nproc_per_node=2 tests/moco_dist_worker.py INPUTS.pt OUTPUT_DIR

INPUTS.pt is written by the test: for each step the global batch of query and key views, the
initial state of a small MoCo without BatchNorm, its hyperparameters, and a key encoder with
BatchNorm for the shuffle check. Each rank takes its share of every global batch, as the
DistributedSampler would, runs the steps of moco.main (query forward under DDP, momentum update,
shuffled key forward, loss, SGD step, enqueue of every rank's keys) and writes what it computed
to OUTPUT_DIR/rank<r>.pt. The test repeats the steps in one process on the whole batches.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import moco  # noqa: E402


def make_model(inputs: dict) -> moco.MoCo:
    """The MoCo whose steps are compared; it has no BatchNorm, so ranks do not differ by batch statistics."""
    model = moco.MoCo(nn.Linear(6, 5), feature_dim=5, dim=3, K=inputs["K"], mlp=True)
    model.load_state_dict(inputs["model"])
    return model


def make_bn_key_encoder() -> nn.Sequential:
    """A key encoder whose output depends on the other images of its batch through BatchNorm."""
    return nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))


class LabelledImages(TensorDataset):
    """A TensorDataset of (input, label) pairs with the `classes` attribute that knn_monitor reads."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        super().__init__(images, labels)
        self.classes = sorted(set(labels.tolist()))


def main() -> None:
    inputs_path, output_dir = sys.argv[1], sys.argv[2]
    env = common.read_dist_env()
    common.init_distributed(env)
    inputs = torch.load(inputs_path, weights_only=True)
    rank, world_size = env.rank, env.world_size
    results: dict = {"world_size": world_size, "queues": [], "pointers": [], "losses": []}

    # (a) Training steps as in moco.main.
    model = make_model(inputs)
    query_encoder = DDP(nn.Sequential(model.backbone, model.head))
    optimizer = torch.optim.SGD(list(model.backbone.parameters()) + list(model.head.parameters()), lr=inputs["lr"])
    for x_q_global, x_k_global in zip(inputs["x_q"], inputs["x_k"]):
        n = x_q_global.shape[0] // world_size
        x_q, x_k = x_q_global[rank * n : (rank + 1) * n], x_k_global[rank * n : (rank + 1) * n]
        q = query_encoder(x_q)  # (N, D)
        model.momentum_update(inputs["m"])
        k, k_all = moco.encode_keys(model.key_encoder, x_k)  # (N, D), (B, D)
        loss, _ = moco.moco_loss(F.normalize(q, dim=1), k, model.queue, inputs["tau"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.enqueue(k_all)
        results["queues"].append(model.queue.clone())
        results["pointers"].append(int(model.queue_ptr))
        results["losses"].append(common.all_reduce_mean(loss))
    results["state"] = model.state_dict()

    # (b) One step of the symmetric loss: two DDP forwards of f_q before one backward.
    model = make_model(inputs)
    query_encoder = DDP(nn.Sequential(model.backbone, model.head))
    n = inputs["x_q"][0].shape[0] // world_size
    x1, x2 = inputs["x_q"][0][rank * n : (rank + 1) * n], inputs["x_k"][0][rank * n : (rank + 1) * n]
    loss = 0
    for x_q, x_k in ((x1, x2), (x2, x1)):
        q = query_encoder(x_q)
        k, _ = moco.encode_keys(model.key_encoder, x_k)
        loss = loss + moco.moco_loss(F.normalize(q, dim=1), k, model.queue, inputs["tau"])[0]
    loss.backward()
    results["symmetric_grads"] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    # (c) Shuffling BN across ranks with a BatchNorm key encoder and a known permutation: rank 0's
    # generator is seeded, so the test can draw the same permutation.
    key_encoder = make_bn_key_encoder()
    key_encoder.load_state_dict(inputs["bn_key_encoder"])
    x_k_global = inputs["x_k"][0]
    n = x_k_global.shape[0] // world_size
    torch.manual_seed(inputs["shuffle_seed"] + rank)  # only rank 0's draw may count
    k, k_all = moco.encode_keys(key_encoder.train(), x_k_global[rank * n : (rank + 1) * n])
    results["bn_keys"], results["bn_keys_all"] = k, k_all

    # (d) Gathering images in channels-last layout, as encode_keys does with --channels-last.
    images = (torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2) + 100 * rank)
    results["gathered_channels_last"] = common.gather_no_grad(images.contiguous(memory_format=torch.channels_last))

    # (e) The kNN monitor encodes with rank 0's BatchNorm statistics on every rank, as the
    # checkpoint (written by rank 0) and eval_linear.py do.
    backbone = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5))
    backbone.load_state_dict(inputs["monitor_backbone"])
    with torch.no_grad():
        backbone[1].running_mean.fill_(float(rank))  # what per-rank batches leave behind
    labelled = LabelledImages(inputs["monitor_images"], inputs["monitor_labels"])
    results["monitor_knn"] = common.knn_monitor(backbone, labelled, labelled, 2, 0, env, "fp32", k=3)
    results["monitor_running_mean"] = backbone[1].running_mean.clone()

    os.makedirs(output_dir, exist_ok=True)
    torch.save(results, os.path.join(output_dir, f"rank{rank}.pt"))
    # Without the barrier, gloo sometimes aborts when the group is destroyed at exit.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
