"""Linear-probe and kNN evaluation of a backbone pretrained by any method file of this collection.

The backbone is frozen and stays in eval mode throughout, so its BatchNorm layers use the running
statistics from pretraining and nothing about it changes (checked bit for bit at the end). Two
scores are computed on the average-pooled features (for CPC checkpoints, the patch encodings
averaged over the grid of patches, as in the CPC paper's linear evaluation):
  * linear probe: a linear classifier trained with cross-entropy on the training split, reported
    as top-1 and top-5 accuracy on the full test split;
  * weighted kNN: k=200 neighbours with weights exp(cos/0.1) on L2-normalised features
    (Wu et al. 2018), top-1 on the test split.
Without --augment, the features of both splits are computed once and the probe trains on them,
which takes seconds. --protocol moco trains the probe as the MoCo authors' main_lincls.py does
(plain linear layer, lr 30, steps at epochs 60 and 80, augmented crops), which encodes every batch
anew and so takes far longer. --random-init scores a randomly initialised backbone of the same
architecture instead: the baseline that pretraining has to beat.

Run:
    python eval_linear.py --checkpoint runs/<run>/checkpoint.pt
    python eval_linear.py --checkpoint runs/<run>/checkpoint.pt --random-init
    python eval_linear.py --checkpoint runs/<run>/checkpoint.pt --protocol moco
    torchrun --nproc_per_node=8 eval_linear.py --checkpoint runs/<run>/checkpoint.pt
The last line printed is JSON with linear_top1, linear_top5 and knn_top1 as fractions; the same JSON
is written beside the checkpoint as eval.json (eval_random_init.json with --random-init, and
_moco before .json with --protocol moco).

Shapes: M training images, Q test images, F feature width, C classes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

import common


@dataclass
class Args:
    checkpoint: str
    """checkpoint.pt of a pretraining run of this collection"""
    dataset: Optional[common.DatasetName] = None
    """dataset to evaluate on. Unset: the one the checkpoint was pretrained on (another one needs --data-dir)"""
    data_dir: Optional[str] = None
    """dataset folder. Unset: the checkpoint's"""
    image_size: Optional[int] = None
    """image side in pixels. Unset: the checkpoint's. For CPC checkpoints the patches keep their size and stride, so another side changes the number of patches averaged"""
    arch: Optional[common.ResNetArch] = None
    """backbone architecture. Unset: the checkpoint's; another architecture needs --random-init"""
    random_init: bool = False
    """score a backbone with torchvision's random initialisation instead of the checkpoint's weights (the baseline)"""
    protocol: Literal["standard", "moco"] = "standard"
    """linear-probe recipe. standard: this collection's, a linear layer on BatchNorm-standardised cached features, SGD with Nesterov momentum and a cosine schedule. moco: the MoCo authors' main_lincls.py, a plain linear layer trained on random resized crops and flips (implies --augment) by SGD with momentum at lr 30 and no weight decay. Its learning rate drops by 10 at 60% and 80% of --epochs (epochs 60 and 80 of 100)"""
    epochs: int = 100
    """epochs of linear-probe training (this collection's choice; MoCo's protocol also trains 100)"""
    batch_size: int = 256
    """global batch size in images, at least 2, of the probe's training and of feature extraction, split over the processes. MoCo's linear classification uses 256 and the SimCLR paper 4096 on ImageNet"""
    lr: Optional[float] = None
    """probe learning rate per 256 images, scaled linearly with --batch-size. Unset: 0.1 with --protocol standard (this collection's choice for standardised features), 30 with --protocol moco (MoCo authors)"""
    weight_decay: float = 0.0
    """probe weight decay (MoCo's main_lincls.py and SimCLR's CIFAR-10 linear-head command: 0)"""
    momentum: float = 0.9
    """momentum of the probe's SGD, below 1: above 0 with --protocol standard, which uses Nesterov momentum (SimCLR paper: 0.9 with Nesterov), and 0 or more with --protocol moco (MoCo authors: 0.9)"""
    augment: common.SwitchOnFlag = False
    """train the probe on random resized crops and flips, encoding every batch anew, instead of on cached features of the plain images (always on with --protocol moco)"""
    knn_k: int = 200
    """neighbours of the kNN classifier (Wu et al. 2018: 200)"""
    knn_temperature: float = 0.1
    """temperature of the kNN vote weights exp(cos/T) (Wu et al. 2018's CIFAR code and the MoCo CIFAR-10 demo: 0.1)"""
    workers: Optional[int] = None
    """data-loading processes per process (0 loads in the main process). Unset: this node's CPUs divided by its processes, at most 8"""
    precision: common.Precision = "auto"
    """autocast precision of the backbone: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32"""
    seed: int = 0
    """seed of the probe's initialisation and batch order, and of --random-init"""
    dist_timeout: float = common.DIST_TIMEOUT_S
    """seconds that a collective waits for the other processes before the evaluation stops with an error, when a peer has died or hung (torch's default: 1800)"""


def linear_probe(feature_dim: int, classes: int, protocol: str = "standard") -> nn.Sequential:
    """Build a linear classifier for `protocol`.

    standard: a linear layer on features standardised by BatchNorm without affine parameters. The
    standardisation is a fixed affine map at test time, so the probe is still linear in the
    features. It lets one learning rate fit backbones whose feature scales differ widely, the same
    choice as MAE's linear probe (He et al. 2022).
    moco: a plain linear layer with weights drawn from N(0, 0.01^2) and zero bias (main_lincls.py).
    """
    if protocol == "moco":
        layer = nn.Linear(feature_dim, classes)
        nn.init.normal_(layer.weight, mean=0.0, std=0.01)
        nn.init.zeros_(layer.bias)
        return nn.Sequential(layer)
    return nn.Sequential(nn.BatchNorm1d(feature_dim, affine=False), nn.Linear(feature_dim, classes))


def probe_lr(step: int, steps_per_epoch: int, args: Args, peak_lr: float) -> float:
    """Return the probe's learning rate at `step`. The standard protocol decays it with a cosine
    over all steps. The moco protocol divides it by 10 at 60% and 80% of the epochs, which are
    epochs 60 and 80 of 100 in main_lincls.py."""
    total_steps = args.epochs * steps_per_epoch
    if args.protocol == "moco":
        epoch = step // steps_per_epoch
        return peak_lr * 0.1 ** sum(epoch >= round(fraction * args.epochs) for fraction in (0.6, 0.8))
    return common.warmup_cosine_lr(step, total_steps, 0, peak_lr)


def probe_optimizer(probe: nn.Module, args: Args, peak_lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(probe.parameters(), lr=peak_lr, momentum=args.momentum,
                           nesterov=args.protocol == "standard", weight_decay=args.weight_decay)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return hits.float().mean().item()


def train_probe_on_features(features: torch.Tensor, labels: torch.Tensor, classes: int, args: Args,
                            peak_lr: float) -> nn.Module:
    """Train the probe on cached features (M, F). Every rank runs the same steps on the same data."""
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    probe = linear_probe(features.shape[1], classes, args.protocol).to(features.device)
    optimizer = probe_optimizer(probe, args, peak_lr)
    steps_per_epoch = math.ceil(features.shape[0] / args.batch_size)
    step = 0
    probe.train()
    for _ in range(args.epochs):
        order = torch.randperm(features.shape[0], generator=generator).to(features.device)
        for start in range(0, features.shape[0], args.batch_size):
            index = order[start : start + args.batch_size]
            if index.numel() < 2:  # BatchNorm needs two samples to standardise
                continue
            common.set_lr(optimizer, probe_lr(step, steps_per_epoch, args, peak_lr))
            loss = F.cross_entropy(probe(features[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return probe.eval()


def train_probe_with_augmentation(backbone: nn.Module, dataset, feature_dim: int, classes: int, args: Args,
                                  peak_lr: float, env: common.DistEnv, workers: int, precision: str) -> nn.Module:
    """Train the probe on augmented images encoded by the frozen backbone, data-parallel over ranks."""
    torch.manual_seed(args.seed)
    batch_per_process = common.per_process_batch(args.batch_size, env.world_size)
    sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=batch_per_process, sampler=sampler, num_workers=workers,
                        pin_memory=env.device.type == "cuda", drop_last=True, persistent_workers=workers > 0,
                        worker_init_fn=common.ignore_stop_signals)
    probe = linear_probe(feature_dim, classes, args.protocol).to(env.device)
    train_probe = DDP(probe, device_ids=[env.local_rank] if env.device.type == "cuda" else None) \
        if env.distributed else probe
    optimizer = probe_optimizer(probe, args, peak_lr)
    step = 0
    probe.train()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for images, targets in loader:
            common.set_lr(optimizer, probe_lr(step, len(loader), args, peak_lr))
            with torch.no_grad(), common.autocast(env.device, precision):
                features = backbone(images.to(env.device, non_blocking=True))  # (N, F)
            loss = F.cross_entropy(train_probe(features.float()), targets.to(env.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        # Each epoch encodes the whole training split anew, which takes minutes on a CPU.
        loss_value = common.all_reduce_mean(loss).item()  # every rank takes part
        if env.is_main:
            print(f"probe epoch {epoch + 1}/{args.epochs}: loss {loss_value:.4g}, "
                  f"lr {optimizer.param_groups[0]['lr']:.4g}", flush=True)
    return probe.eval()


def main(args: Args) -> None:
    env = common.read_dist_env()
    common.exit_on_stop_signals("eval_linear.py")
    if args.lr is None:
        args = dataclasses.replace(args, lr=30.0 if args.protocol == "moco" else 0.1)
    if args.protocol == "moco":
        args = dataclasses.replace(args, augment=True)
    common.check_positive(epochs=args.epochs, lr=args.lr, knn_k=args.knn_k, knn_temperature=args.knn_temperature,
                          dist_timeout=args.dist_timeout)
    if args.batch_size < 2:
        raise common.ConfigError(f"--batch-size {args.batch_size} must be at least 2, because the probe "
                                 f"trains on batches of at least two images")
    if not (args.weight_decay >= 0 and math.isfinite(args.weight_decay)):
        raise common.ConfigError(f"--weight-decay {args.weight_decay} must be a finite number of 0 or more")
    if (problem := common.momentum_problem(args.momentum, allow_zero=args.protocol == "moco")) is not None:
        raise common.ConfigError(problem)
    if args.workers is not None and args.workers < 0:
        raise common.ConfigError(f"--workers {args.workers} must not be negative (0 loads in the main process)")
    common.per_process_batch(args.batch_size, env.world_size)
    state = common.load_checkpoint(args.checkpoint)
    saved_data, saved_backbone = state["data"], state["backbone"]
    arch = args.arch or saved_backbone["arch"]
    if arch != saved_backbone["arch"] and not args.random_init:
        raise common.ConfigError(
            f"{args.checkpoint} contains {saved_backbone['arch']} weights, so --arch {arch} is invalid "
            f"without --random-init; drop --arch to evaluate the checkpoint"
        )
    dataset = args.dataset or saved_data["dataset"]
    if dataset != saved_data["dataset"] and args.data_dir is None:
        raise common.ConfigError(
            f"--dataset {dataset} differs from the checkpoint's dataset ({saved_data['dataset']}), so its "
            f"folder {saved_data['data_dir']} does not apply; pass --data-dir for {dataset}"
        )
    try:
        info = common.describe_dataset(dataset, args.data_dir or saved_data["data_dir"],
                                       args.image_size or saved_data["image_size"])
    except common.ConfigError as error:
        if args.data_dir is None:
            raise common.ConfigError(
                f"{error}. The folder {saved_data['data_dir']} comes from the checkpoint; if the data "
                f"has moved, pass --data-dir NEW_FOLDER"
            ) from error
        raise
    if "patch_size" in saved_backbone and info.image_size < saved_backbone["patch_size"]:
        raise common.ConfigError(
            f"{args.checkpoint} encodes {saved_backbone['patch_size']}-pixel patches, which do not fit in "
            f"{info.image_size}-pixel images; use --image-size {saved_backbone['patch_size']} or more, or leave "
            f"it unset for the checkpoint's {saved_data['image_size']}"
        )
    workers = args.workers if args.workers is not None else common.default_workers(env)
    precision = common.resolve_precision(args.precision, env.device)

    common.init_distributed(env, args.dist_timeout)
    common.prepare_download(info, env)
    plain = common.eval_transform(info.image_size, info.mean, info.std)
    train_set, test_set = common.eval_datasets(info, plain, plain)
    classes = common.num_classes(train_set)
    if args.augment and len(train_set) < args.batch_size:
        # Checked before any encoding, because the augmented probe drops the last partial batch.
        implied = " (which --protocol moco implies)" if args.protocol == "moco" else ""
        raise common.ConfigError(
            f"--augment{implied} needs at least one full batch, but the training split has "
            f"{len(train_set)} images and --batch-size is {args.batch_size}; lower --batch-size"
        )

    # Backbone: the checkpoint's weights, or a random initialisation of the same shape. For CPC the
    # evaluated encoder applies the backbone to every patch of the grid and averages the vectors.
    torch.manual_seed(args.seed)
    encoder, backbone, feature_dim = common.build_encoder(saved_backbone, arch)
    if not args.random_init:
        backbone.load_state_dict(common.backbone_state_dict(state["model"]), strict=True)
    encoder = encoder.to(env.device).eval()
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    reference = {key: value.clone() for key, value in backbone.state_dict().items()}
    source = "random initialisation" if args.random_init else f"{state['method']} step {state['step']}"
    if env.is_main:
        print(f"eval_linear: {arch} ({source}) on {info.name}: {len(train_set)} training and "
              f"{len(test_set)} test images of {info.image_size} px, {classes} classes | probe: {args.protocol} "
              f"protocol, {args.epochs} epochs, lr {args.lr} per 256 images, augment {args.augment}")

    # Features of the plain images, computed once: kNN bank and queries, cached probe inputs.
    # Encoding 60,000 CIFAR images takes minutes on a CPU, so the start and end are reported.
    batch_per_process = args.batch_size // env.world_size
    if env.is_main:
        print(f"encoding {len(train_set)} training and {len(test_set)} test images", flush=True)
    encode_start = time.perf_counter()
    train_features, train_labels = common.extract_features(encoder, train_set, batch_per_process, workers, env, precision)  # (M, F)
    test_features, test_labels = common.extract_features(encoder, test_set, batch_per_process, workers, env, precision)  # (Q, F)
    if env.is_main:
        print(f"encoded in {time.perf_counter() - encode_start:.0f} s", flush=True)
    knn_k = min(args.knn_k, len(train_set))  # the vote cannot use more neighbours than there are
    if knn_k < args.knn_k and env.is_main:
        print(f"note: --knn-k {args.knn_k} is more than the {len(train_set)} training images, so the kNN "
              f"vote uses all {knn_k} of them (recorded as knn.k in the JSON)")
    knn = common.knn_top1(train_features, train_labels, test_features, test_labels, classes,
                          knn_k, args.knn_temperature)

    # Linear probe.
    peak_lr = args.lr * args.batch_size / 256
    if args.augment:
        # SimCLR's linear evaluation augments with random resized crops and flips only.
        augmented = T.Compose([T.RandomResizedCrop(info.image_size, antialias=True), T.RandomHorizontalFlip(),
                               T.ToTensor(), T.Normalize(info.mean, info.std)])
        augmented_train_set, _ = common.eval_datasets(info, augmented, plain)
        probe = train_probe_with_augmentation(encoder, augmented_train_set, feature_dim, classes, args,
                                              peak_lr, env, workers, precision)
    else:
        probe = train_probe_on_features(train_features, train_labels, classes, args, peak_lr)
    with torch.no_grad():
        logits = probe(test_features)  # (Q, C)
    top1 = topk_accuracy(logits, test_labels, 1)
    top5 = topk_accuracy(logits, test_labels, 5)

    # The backbone must come out exactly as it went in (weights and BatchNorm statistics).
    changed = [key for key, value in backbone.state_dict().items() if not torch.equal(value, reference[key])]
    if changed:
        raise RuntimeError(f"the frozen backbone changed during evaluation: {', '.join(changed[:5])}")

    result = {
        "linear_top1": top1, "linear_top5": top5, "knn_top1": knn,
        "method": state["method"], "arch": arch, "step": state["step"], "random_init": args.random_init,
        "checkpoint": os.path.abspath(args.checkpoint), "dataset": info.name, "data_dir": info.root,
        "image_size": info.image_size, "train_images": len(train_set), "test_images": len(test_set),
        "probe": {"protocol": args.protocol, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                  "weight_decay": args.weight_decay, "augment": args.augment, "seed": args.seed},
        "knn": {"k": knn_k, "temperature": args.knn_temperature},
    }
    if env.is_main:
        name = "eval_random_init" if args.random_init else "eval"
        if args.protocol == "moco":
            name += "_moco"
        name += ".json"
        path = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), name)
        try:
            with open(path, "w") as f:
                json.dump(result, f, indent=2)
        except OSError as error:
            print(f"warning: cannot write {path}: {error}")
        print(f"linear top-1 {top1:.4f} | linear top-5 {top5:.4f} | kNN top-1 {knn:.4f} (k={knn_k}, "
              f"T={args.knn_temperature}) -> {path}")
        print(json.dumps(result), flush=True)
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run_cli(main, Args)
