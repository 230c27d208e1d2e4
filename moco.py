"""MoCo: Momentum Contrast, v1 with the MoCo v2 improvements as options.

Papers: He, Fan, Wu, Xie and Girshick, "Momentum Contrast for Unsupervised Visual Representation
Learning", CVPR 2020 (arXiv:1911.05722); Chen, Fan, Girshick and He, "Improved Baselines with
Momentum Contrastive Learning" (MoCo v2, arXiv:2003.04297). Authors' code: facebookresearch/moco.

A query encoder f_q (ResNet and head) encodes one view of each image into q. A key encoder f_k,
a moving average of f_q, encodes the other view into the positive key k+. The negatives are a
queue of the K keys of earlier batches, so their number does not depend on the batch size. The
InfoNCE loss (paper equation 1) classifies each query's positive among K+1 keys. After each step
the keys of all processes join the queue and the oldest leave it. Under DDP, the key batch is
shuffled across processes before f_k and unshuffled after it ("shuffling BN", paper section 3.3),
so a query and its key are normalised with the statistics of different images. One process
emulates this with --bn-splits groups of images that have their own BatchNorm statistics, as in
the authors' CIFAR-10 demonstration. Defaults follow the authors' ImageNet code (main_moco.py).
They are ResNet-50, batch 256, SGD at lr 0.03 per 256 images and weight decay 1e-4, and 200
epochs with the learning rate divided by 10 at epochs 120 and 160. K is 65536, m 0.999, tau 0.07,
and the keys have 128 dimensions.
--v2 selects MoCo v2: MLP head, stronger augmentation, cosine schedule, tau 0.2.

Run:
    python moco.py                                          # one GPU, or the CPU
    python moco.py --v2                                     # MoCo v2
    torchrun --nproc_per_node=8 moco.py --queue-size 65536  # eight GPUs on one node
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        --rdzv_id=moco moco.py                              # the same command on each of two nodes
    python eval_linear.py --checkpoint runs/<run>/checkpoint.pt
The authors' CIFAR-10 recipe (moco_cifar10_demo.ipynb: ResNet-18 with the CIFAR stem, 8 BatchNorm
splits, 200 epochs, cosine schedule, and --aug-plus with crops down to 8% of the image and no
blur, which this file leaves out for images of 64 px or less):
    python moco.py --arch resnet18 --batch-size 512 --lr 0.03 --weight-decay 5e-4 --queue-size 4096 \\
        --momentum 0.99 --temperature 0.1 --cos --aug-plus --min-crop-scale 0.08

Shapes: N images per process, W processes, B = W*N global batch, K queue length, D key width
(128), F backbone feature width (512 for ResNet-18, 2048 for ResNet-50).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import common

METHOD = "moco"


@dataclass
class Args:
    # Data and run
    dataset: common.DatasetName = "cifar10"
    """dataset: cifar10, cifar100, stl10 (pretrains on train+unlabeled) or folder (ImageFolder at DATA_DIR/train, evaluated on DATA_DIR/val or DATA_DIR/test)"""
    data_dir: str = "data"
    """dataset folder: torchvision's download root for cifar10/cifar100/stl10, or the folder that contains train/ for `folder`"""
    image_size: Optional[int] = None
    """side of the training crops in pixels. Unset: 32 for CIFAR, 96 for STL-10, and for `folder` the first image's side when it is 64 or less, else 224"""
    output_dir: Optional[str] = None
    """run folder for checkpoint.pt, backbone.pt, metrics.jsonl and args.json. Unset: the resumed checkpoint's folder, else runs/moco-<dataset>-<arch>-<time>"""
    resume: Optional[str] = None
    """checkpoint.pt to continue from: both encoders, queue, optimiser, step, data order and random states are restored. Only --max-steps, --data-dir, --output-dir, --workers, --precision, --compile, --channels-last, --augment-on-device, --dist-timeout and the logging and checkpoint intervals may differ from the original run. `auto`: the checkpoint.pt in --output-dir when there is one, else a new run, so that a requeued job can repeat its command"""
    overwrite: bool = False
    """allow starting a new run in an --output-dir that already contains a checkpoint"""
    dist_timeout: float = common.DIST_TIMEOUT_S
    """seconds that a collective waits for the other processes before the run stops with an error, when a peer has died or hung (torch's default: 1800)"""
    seed: int = 0
    """random seed; process r uses seed + r, and every process starts from the same weights and queue"""
    workers: Optional[int] = None
    """data-loading processes per training process (0 loads in the training process). Unset: this node's CPUs divided by its processes, at most 8. Each worker draws its own augmentation seed, so the random crops and jitter of a seed depend on this number"""
    log_every: int = 10
    """print and record loss, contrastive accuracy, learning rate and throughput every this many optimiser steps"""
    knn_every: int = 10
    """run the kNN monitor (k=200, T=0.1) every this many epochs and at the end; 0 disables it"""
    checkpoint_every: int = 1
    """write checkpoint.pt every this many epochs and at the end"""
    max_steps: Optional[int] = None
    """stop once this many optimiser steps have been taken in total (the schedule still spans --epochs); for smoke tests and benchmarks"""
    precision: common.Precision = "auto"
    """autocast precision: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 (with a gradient scaler) or fp32. bf16 and fp16 are slow on CPUs without native support"""
    compile: bool = False
    """compile both encoders with torch.compile"""
    channels_last: bool = True
    """keep images and activations in channels-last (NHWC) memory layout, which convolutions run faster in on recent GPUs and on x86 CPUs"""
    augment_on_device: bool = torch.cuda.is_available()
    """augment the views in batches on the training device (common.augment_batch) instead of image by image in data-loader workers; CIFAR, STL-10 and folders of small images are then held on the device as uint8. Default: on when CUDA is available"""

    # Model
    arch: common.ResNetArch = "resnet50"
    """backbone of both encoders, a torchvision ResNet (authors' code: resnet50; their CIFAR-10 demonstration: resnet18); images of 64 px or less get the CIFAR stem"""
    feature_dim: int = 128
    """width D of the keys and queries (authors' code: 128)"""
    mlp: common.SwitchOnFlag = False
    """MoCo v2's head: Linear(F, F), ReLU, Linear(F, D) instead of one Linear(F, D)"""
    queue_size: int = 65536
    """number of negative keys K in the queue (authors' code: 65536). It must be a multiple of the keys added per step: the global batch, or twice that with --symmetric"""
    momentum: float = 0.999
    """key-encoder momentum m in theta_k <- m*theta_k + (1-m)*theta_q, from 0 (inclusive) to 1 (exclusive) (authors' code: 0.999)"""
    bn_splits: Optional[int] = None
    """number of groups the per-process batch is split into, each with its own BatchNorm statistics, in both encoders. Unset: 8 with one process, which emulates 8 GPUs for shuffling BN (authors' CIFAR-10 demonstration), and 1 with several, where the key batch is shuffled across processes"""

    # Loss and optimisation
    temperature: Optional[float] = None
    """tau of the InfoNCE loss. Unset: 0.07 (MoCo v1), or 0.2 with --v2 (MoCo v2)"""
    symmetric: bool = False
    """also encode the second view as the query and the first as the key, and add that loss. The authors' CIFAR-10 demonstration offers it, but the papers' loss is asymmetric"""
    v2: bool = False
    """MoCo v2: turns on --mlp, --aug-plus and --cos, and sets tau to 0.2 unless --temperature is given. For only some of them, pass those flags instead of --v2"""
    aug_plus: common.SwitchOnFlag = False
    """MoCo v2's augmentation (colour jitter with probability 0.8 and hue 0.1, Gaussian blur with probability 0.5 on images larger than 64 px) instead of v1's"""
    min_crop_scale: float = 0.2
    """smallest area of the random resized crop, as a fraction of the image (authors' code: 0.2; their CIFAR-10 demonstration: torchvision's default 0.08)"""
    cos: common.SwitchOnFlag = False
    """cosine learning-rate schedule over --epochs (MoCo v2) instead of the steps of --lr-drops"""
    lr_drops: tuple[int, ...] = (120, 160)
    """epochs at which the learning rate is divided by 10 when --cos is off (authors' code: 120 160)"""
    batch_size: int = 256
    """global batch size B in images, split evenly over the processes (authors' code: 256)"""
    epochs: int = 200
    """pretraining epochs (authors' code: 200)"""
    lr: float = 0.03
    """learning rate per 256 images, scaled linearly with the global batch (authors' code: 0.03 at batch 256)"""
    weight_decay: float = 1e-4
    """SGD weight decay on every parameter (authors' code: 1e-4; their CIFAR-10 demonstration: 5e-4)"""
    sgd_momentum: float = 0.9
    """momentum of the SGD optimiser (authors' code: 0.9)"""


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises each of `num_splits` consecutive groups of the batch
    with that group's own statistics, as if each group ran on its own GPU.

    The running statistics are the mean over the groups' updates. In evaluation the layer is a plain
    BatchNorm2d with the same state-dict keys, so the weights load into torchvision's ResNet.
    """

    def __init__(self, num_features: int, num_splits: int = 1, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        G = self.num_splits
        if not self.training or G == 1:
            return super().forward(x)
        N, C, H, W = x.shape
        # Group g (images g*N/G to (g+1)*N/G - 1) becomes channels g*C to (g+1)*C - 1 of one batch.
        x_split = x.reshape(G, N // G, C, H, W).transpose(0, 1).reshape(N // G, G * C, H, W)
        running_mean, running_var = self.running_mean.repeat(G), self.running_var.repeat(G)
        y = F.batch_norm(x_split, running_mean, running_var, self.weight.repeat(G), self.bias.repeat(G),
                         True, self.momentum, self.eps)
        self.running_mean.copy_(running_mean.view(G, C).mean(dim=0))
        self.running_var.copy_(running_var.view(G, C).mean(dim=0))
        self.num_batches_tracked.add_(1)
        y = y.reshape(N // G, G, C, H, W).transpose(0, 1).reshape(N, C, H, W)
        if x.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous(memory_format=torch.channels_last)
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


class MoCo(nn.Module):
    """Query encoder f_q (backbone + head), key encoder f_k and the queue of negative keys.

    The query backbone is the one evaluated downstream. f_k starts as a copy of f_q and is only
    updated by momentum_update; its parameters take no gradient.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, dim: int = 128, K: int = 65536, mlp: bool = False):
        super().__init__()
        self.backbone = backbone
        if mlp:  # MoCo v2, hidden width F
            self.head = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(inplace=True),
                                      nn.Linear(feature_dim, dim))
        else:  # MoCo v1: the ResNet's fc layer with D outputs
            self.head = nn.Linear(feature_dim, dim)
        self.key_encoder = copy.deepcopy(nn.Sequential(self.backbone, self.head))
        self.key_encoder.requires_grad_(False)
        # Random unit vectors until the first K keys have been enqueued (authors' code).
        self.register_buffer("queue", F.normalize(torch.randn(K, dim), dim=1))  # (K, D)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))  # (N, D), f_q; not normalised

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        """theta_k <- m*theta_k + (1-m)*theta_q over the parameters (paper equation 2). BatchNorm's
        running statistics are buffers and stay the key encoder's own, as in the authors' code."""
        query_params = list(self.backbone.parameters()) + list(self.head.parameters())
        for theta_q, theta_k in zip(query_params, self.key_encoder.parameters()):
            theta_k.mul_(m).add_(theta_q.detach(), alpha=1 - m)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest len(keys) entries of the queue with `keys` (B, D) and advance the pointer
        modulo K. K is a multiple of B, so a batch never wraps around the end."""
        B, K = keys.shape[0], self.queue.shape[0]
        ptr = int(self.queue_ptr)
        self.queue[ptr : ptr + B] = keys
        self.queue_ptr.fill_((ptr + B) % K)


@torch.no_grad()
def encode_keys(key_encoder: nn.Module, x_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode the key views with shuffling BN; return this process's keys k (N, D) and the keys of
    every process k_all (B, D) in rank order, both L2-normalised in float32.

    With W > 1 processes, the key images are gathered, permuted by one permutation drawn on rank 0
    and broadcast, and each process encodes its share of the permuted batch. The keys are then
    gathered and put back in the original order. With one process the batch is permuted in place,
    which changes the statistics only when f_k uses BatchNorm splits.
    """
    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    W, rank = (dist.get_world_size(), dist.get_rank()) if multi else (1, 0)
    N = x_k.shape[0]
    x_all = common.gather_no_grad(x_k)  # (B, 3, H, W)
    perm = torch.randperm(W * N).to(x_k.device)  # position j of the shuffled batch is image perm[j]
    if multi:
        dist.broadcast(perm, src=0)
    k_shuffled = key_encoder(x_all[perm.view(W, N)[rank]])  # (N, D): keys of images perm[rank*N : (rank+1)*N]
    k_shuffled = F.normalize(k_shuffled.float(), dim=1)
    k_all = torch.empty(W * N, k_shuffled.shape[1], device=x_k.device)
    k_all[perm] = common.gather_no_grad(k_shuffled)  # (B, D), unshuffled
    return k_all[rank * N : (rank + 1) * N], k_all


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE loss of MoCo (paper equation 1), averaged over the N queries.

    q:     (N, D) L2-normalised queries, with gradient.
    k:     (N, D) L2-normalised positive keys, constants; k[i] is the key of q[i]'s image.
    queue: (K, D) L2-normalised negative keys as they were before this step.
    Logits are [q.k+, q.queue] / tau, and the positive is class 0 of K+1. Returns the loss and
    the contrastive accuracy: the fraction of queries whose highest logit is their positive.
    """
    # Similarities in float32 even under autocast: exp(1/tau) overflows fp16 for small tau.
    with torch.autocast(q.device.type, enabled=False):
        q = q.float()
        l_pos = (q * k.float()).sum(dim=1, keepdim=True)  # (N, 1)
        l_neg = q @ queue.float().T  # (N, K)
        logits = torch.cat([l_pos, l_neg], dim=1) / tau  # (N, 1+K)
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        loss = F.cross_entropy(logits, labels)
    accuracy = (logits.detach().argmax(dim=1) == 0).float().mean()
    return loss, accuracy


def learning_rate(epoch: int, epochs: int, peak_lr: float, cos: bool, lr_drops: tuple[int, ...]) -> float:
    """Learning rate of an epoch, as the authors' adjust_learning_rate sets it once per epoch:
    half-cosine from peak_lr towards 0, or peak_lr divided by 10 at each epoch of lr_drops reached."""
    if cos:
        return peak_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    return peak_lr * 0.1 ** sum(epoch >= drop for drop in lr_drops)


def check_queue_size(K: int, keys_per_step: int, symmetric: bool) -> None:
    """Raise ConfigError unless K is a positive multiple of the keys enqueued per step, naming the
    two nearest valid queue sizes."""
    if K > 0 and K % keys_per_step == 0:
        return
    lower = max(K, 0) // keys_per_step * keys_per_step
    upper = lower + keys_per_step
    options = f"--queue-size {upper}" if lower == 0 else f"--queue-size {lower} or {upper}"
    per_step = (f"twice the global batch --batch-size {keys_per_step // 2}, because --symmetric enqueues "
                f"the keys of both views" if symmetric else f"the global batch --batch-size {keys_per_step}")
    raise common.ConfigError(
        f"--queue-size {K} must be a positive multiple of the {keys_per_step} keys enqueued per step "
        f"({per_step}), so that every batch fits before the end of the queue; use for example {options}"
    )


def check_bn_groups(batch_per_process: int, bn_splits: int, args: Args, world_size: int,
                    info: common.DataInfo) -> None:
    """Raise ConfigError unless --bn-splits divides the per-process batch into groups that give
    BatchNorm at least 2 values per channel at the ResNet's last stage."""
    default = " (the default with one process)" if args.bn_splits is None else ""
    if bn_splits < 1 or batch_per_process % bn_splits != 0:
        raise common.ConfigError(
            f"--bn-splits {bn_splits}{default} must be a positive divisor of the per-process batch of "
            f"{batch_per_process} images (--batch-size {args.batch_size} over {world_size} process(es)); "
            f"pass another --bn-splits or --batch-size"
        )
    # The CIFAR stem halves the side 3 times, the ImageNet stem 5 times, each rounding up.
    last_side = math.ceil(info.image_size / (8 if info.small_images else 32))
    group = batch_per_process // bn_splits
    if group * last_side**2 < 2:
        raise common.ConfigError(
            f"BatchNorm groups of {group} image(s) (--bn-splits {bn_splits}{default}, {batch_per_process} images per "
            f"process) see one value per channel at the last stage ({last_side}x{last_side} for {info.image_size}-px "
            f"images), which BatchNorm cannot normalise; use fewer --bn-splits or a larger --batch-size or --image-size"
        )


def main(args: Args) -> None:
    # Processes, batch split, resolved defaults and input checks, all before any work starts.
    env = common.read_dist_env()
    args = dataclasses.replace(args, resume=common.resolve_resume(args.resume, args.output_dir))
    common.validate_training_args(args, optimizer_momentum="sgd_momentum")
    tau = args.temperature
    if tau is None:
        tau = 0.2 if args.v2 else 0.07
    common.check_positive(temperature=tau, feature_dim=args.feature_dim)
    if not 0 <= args.momentum < 1:
        raise common.ConfigError(f"--momentum {args.momentum} (the key encoder's m) must be from 0 (inclusive) to "
                                 f"1 (exclusive); the authors use 0.999, and 0.99 for CIFAR-10")
    drops = " ".join(map(str, args.lr_drops))
    if any(drop <= 0 for drop in args.lr_drops) or list(args.lr_drops) != sorted(set(args.lr_drops)):
        raise common.ConfigError(f"--lr-drops {drops} must be positive epochs in increasing order, each once")
    if not 0 < args.min_crop_scale <= 1:
        raise common.ConfigError(f"--min-crop-scale {args.min_crop_scale} must be above 0 and at most 1 "
                                 f"(a fraction of the image area)")
    batch_per_process = common.per_process_batch(args.batch_size, env.world_size)  # N
    bn_splits = args.bn_splits
    if bn_splits is None:
        bn_splits = 8 if env.world_size == 1 else 1
    mlp, aug_plus, cos = args.mlp or args.v2, args.aug_plus or args.v2, args.cos or args.v2
    info = common.describe_dataset(args.dataset, args.data_dir, args.image_size)
    # DEVIATION: MoCo v2's blur is left out for images of 64 px or less, as in the authors' CIFAR-10
    # demonstration and SimCLR's CIFAR-10 command.
    blur = aug_plus and not info.small_images
    workers = args.workers if args.workers is not None else common.default_workers(env)
    precision = common.resolve_precision(args.precision, env.device)
    resolved = dataclasses.replace(args, data_dir=info.root, image_size=info.image_size, temperature=tau,
                                   bn_splits=bn_splits, mlp=mlp, aug_plus=aug_plus, cos=cos, workers=workers,
                                   precision=precision)
    state = common.load_checkpoint(args.resume, METHOD) if args.resume is not None else None
    if state is not None:
        saved_splits = state["args"]["bn_splits"]
        if args.bn_splits is None and saved_splits != bn_splits:
            raise common.ConfigError(
                f"{args.resume} was trained with --bn-splits {saved_splits} on {state['world_size']} process(es); "
                f"the default for {env.world_size} process(es) is {bn_splits}. Pass --bn-splits {saved_splits} "
                f"to resume, and mind that the images per BatchNorm group change with the process count"
            )
        # Before the queue and BatchNorm checks, so a resume with other flags names the flags that differ.
        common.check_resume(state, resolved, None, args.resume)

    # The queue and the BatchNorm groups must fit the batch.
    keys_per_step = args.batch_size * (2 if args.symmetric else 1)
    check_queue_size(args.queue_size, keys_per_step, args.symmetric)
    check_bn_groups(batch_per_process, bn_splits, args, env.world_size, info)

    common.init_distributed(env, args.dist_timeout)

    # Data: a query view and a key view of every image, per-process batches of N images.
    common.prepare_download(info, env)
    augmentation = common.moco_augmentation(info.image_size, info.mean, info.std, aug_plus, blur, args.min_crop_scale)
    recipe = common.moco_recipe(info.image_size, info.mean, info.std, aug_plus, blur, args.min_crop_scale)
    loader, sampler, num_images = common.two_view_loader(info, augmentation, recipe, args.augment_on_device,
                                                         batch_per_process, workers, env, args.seed)
    steps_per_epoch = num_images // args.batch_size
    if state is not None:
        common.check_resume_steps(state, steps_per_epoch, args.resume)
    if steps_per_epoch == 0:
        raise common.ConfigError(
            f"the dataset has {num_images} images, fewer than one global batch of "
            f"--batch-size {args.batch_size}; use a smaller batch"
        )
    knn_sets = common.knn_datasets(info, args.knn_every, env)
    output_dir = common.resolve_output_dir(args.output_dir, args.resume, METHOD, info, args.arch)
    common.prepare_output_dir(output_dir, args.resume, args.overwrite, env,
                              resume_step=state["step"] if state is not None else None)
    resolved = dataclasses.replace(resolved, output_dir=output_dir)

    # Schedule: the authors set the learning rate once per epoch.
    total_steps = args.epochs * steps_per_epoch
    stop_step = min(total_steps, args.max_steps) if args.max_steps is not None else total_steps
    peak_lr = common.scale_lr(args.lr, args.batch_size, "linear")

    # Model, optimiser, gradient scaler. Built from seed (not seed + rank), so that every process
    # starts with the same f_q, f_k and queue; DDP only synchronises f_q.
    common.seed_everything(args.seed)
    norm_layer = lambda channels: SplitBatchNorm2d(channels, num_splits=bn_splits)  # noqa: E731
    backbone, backbone_dim = common.build_backbone(args.arch, cifar_stem=info.small_images, norm_layer=norm_layer)
    model = MoCo(backbone, backbone_dim, args.feature_dim, args.queue_size, mlp).to(env.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    common.seed_everything(args.seed + env.rank)
    optimizer = common.build_optimizer("sgd", model, peak_lr, args.sgd_momentum, args.weight_decay)
    scaler = common.make_grad_scaler(precision, env.device)
    step = 0
    if state is not None:
        step = common.restore_training_state(state, model, optimizer, scaler, env)
    # f_q alone goes into DDP, which would otherwise broadcast the queue (K x D) at every step.
    query_encoder = nn.Sequential(model.backbone, model.head)
    query_encoder = torch.compile(query_encoder) if args.compile else query_encoder
    key_encoder = torch.compile(model.key_encoder) if args.compile else model.key_encoder
    if env.distributed:
        query_encoder = DDP(query_encoder, device_ids=[env.local_rank] if env.device.type == "cuda" else None)

    metrics_path = os.path.join(output_dir, "metrics.jsonl")
    if step >= stop_step:
        if env.is_main:
            print(f"{args.resume} is at step {step}, where this run stops (--epochs or --max-steps); "
                  f"nothing to do")
        common.cleanup_distributed()
        return
    if env.is_main:
        derived = dict(world_size=env.world_size, batch_per_process=batch_per_process, peak_lr=peak_lr,
                       steps_per_epoch=steps_per_epoch, total_steps=total_steps, stop_step=stop_step,
                       keys_per_step=keys_per_step, blur=blur, cifar_stem=info.small_images,
                       device=str(env.device), normalization_mean=info.mean, normalization_std=info.std)
        common.write_args_json(output_dir, resolved, derived)
        schedule = "cosine" if cos else f"divided by 10 at epochs {' '.join(map(str, args.lr_drops)) or '(none)'}"
        print(f"moco: {args.arch} on {info.name} ({num_images} images of {info.image_size} px, "
              f"{'v2' if aug_plus else 'v1'} augmentation, blur {blur}) -> {output_dir}")
        print(f"processes {env.world_size} on {env.device} | batch {args.batch_size} global, {batch_per_process} "
              f"per process, BatchNorm splits {bn_splits} | K {args.queue_size}, m {args.momentum}, tau {tau}, "
              f"{'MLP' if mlp else 'linear'} head{', symmetric' if args.symmetric else ''} | lr {args.lr} per 256, "
              f"{peak_lr:.4g} peak, {schedule} | {precision} | {common.loading_summary(loader, workers)}")
        print(f"steps: {steps_per_epoch} per epoch, {total_steps} in the schedule, stopping at {stop_step}; "
              f"starting at step {step}")
        late = [str(drop) for drop in args.lr_drops if drop >= args.epochs]
        if not cos and late:
            print(f"note: --lr-drops {' '.join(late)} lie at or after --epochs {args.epochs}, so the learning rate "
                  f"does not drop there; pass earlier --lr-drops, or --cos for a cosine decay")
        if args.queue_size > num_images:
            print(f"note: the queue (K {args.queue_size}) is longer than the dataset ({num_images} images), so it "
                  f"holds older keys of the same images")
        if env.world_size == 1 and bn_splits == 1:
            print("note: with one process and --bn-splits 1, shuffling the key batch does not change its BatchNorm "
                  "statistics, so queries and keys are normalised with the same images (the leak shuffling BN avoids)")

    stopper = common.StopSignal()
    model.train()
    interval_start, interval_step = time.perf_counter(), step
    last_finite = (None, None)  # (step, loss) of the last finite logged loss
    checkpoint_step = state["step"] if state is not None else None
    for epoch in range(step // steps_per_epoch, args.epochs):
        if step >= stop_step:
            break
        sampler.set_epoch(epoch)
        sampler.skip = (step - epoch * steps_per_epoch) * batch_per_process
        lr = learning_rate(epoch, args.epochs, peak_lr, cos, args.lr_drops)
        common.set_lr(optimizer, lr)
        for (x1, x2), _ in loader:
            x1 = x1.to(env.device, memory_format=memory_format, non_blocking=True)  # (N, 3, H, W)
            x2 = x2.to(env.device, memory_format=memory_format, non_blocking=True)
            pairs = [(x1, x2), (x2, x1)] if args.symmetric else [(x1, x2)]  # (query view, key view)

            # Queries with gradient; then the momentum update of f_k, before it encodes the keys.
            with common.autocast(env.device, precision):
                queries = [query_encoder(x_q) for x_q, _ in pairs]  # each (N, D)
            with torch.no_grad():
                model.momentum_update(args.momentum)
                with common.autocast(env.device, precision):
                    keys = [encode_keys(key_encoder, x_k) for _, x_k in pairs]  # each (N, D) and (B, D)

            # InfoNCE against the queue as it was before this step (the symmetric loss adds both directions).
            losses, accuracies = zip(*[moco_loss(F.normalize(q.float(), dim=1), k, model.queue, tau)
                                       for q, (k, _) in zip(queries, keys)])
            loss, accuracy = sum(losses), sum(accuracies) / len(accuracies)

            # Backward and update; DDP averages f_q's gradients over processes.
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            step += 1

            # Enqueue the keys of every process, so the queue stays the same on all of them.
            model.enqueue(torch.cat([k_all for _, k_all in keys]))  # (B, D), (2B, D) with --symmetric

            # Log the loss and (K+1)-way accuracy averaged over processes, learning rate, throughput and ETA.
            if step % args.log_every == 0 or step == stop_step:
                loss_value = common.all_reduce_mean(loss).item()
                accuracy_value = common.all_reduce_mean(accuracy).item()
                common.check_finite_loss(loss_value, step, lr, last_finite, checkpoint_step, output_dir)
                last_finite = (step, loss_value)
                elapsed = time.perf_counter() - interval_start
                seconds_per_step = elapsed / (step - interval_step)
                if env.is_main:
                    common.log_metrics({
                        "epoch": epoch, "step": step, "loss": loss_value, "contrast_acc": accuracy_value,
                        "lr": lr, "img_per_s": args.batch_size / seconds_per_step,
                        "eta_s": seconds_per_step * (stop_step - step),
                    }, metrics_path)
                interval_start, interval_step = time.perf_counter(), step
            # SIGTERM or SIGINT on any process: checkpoint below, then exit. The last step ends the run anyway.
            if step < stop_step and stopper.requested(env):
                break
            if step >= stop_step:
                break

        # kNN monitor and checkpoint at the end of an epoch, and when the run stops.
        epoch_done = step == (epoch + 1) * steps_per_epoch
        if knn_sets is not None and not stopper.stopping and (step == stop_step or (epoch_done and (epoch + 1) % args.knn_every == 0)):
            knn = common.knn_monitor(model.backbone, *knn_sets, 2 * batch_per_process, workers, env, precision,
                                     memory_format)
            if env.is_main:
                common.log_metrics({"epoch": epoch, "step": step, "knn_top1": knn}, metrics_path)
        if step == stop_step or stopper.stopping or (epoch_done and (epoch + 1) % args.checkpoint_every == 0):
            common.save_checkpoint(
                os.path.join(output_dir, "checkpoint.pt"), method=METHOD, args=resolved, info=info,
                arch=args.arch, cifar_stem=info.small_images, feature_dim=backbone_dim, step=step, epoch=epoch,
                steps_per_epoch=steps_per_epoch, model=model, optimizer=optimizer, scaler=scaler, env=env,
            )
            checkpoint_step = step
        if stopper.stopping:
            stopper.exit(os.path.join(output_dir, "checkpoint.pt"), env)
        interval_start, interval_step = time.perf_counter(), step

    common.check_replicas_identical(model, env)
    if env.is_main:
        print(f"done at step {step}: {os.path.join(output_dir, 'checkpoint.pt')}")
        print(f"score it with: python eval_linear.py --checkpoint {os.path.join(output_dir, 'checkpoint.pt')}")
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run_cli(main, Args)
