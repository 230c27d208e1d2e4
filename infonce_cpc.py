"""CPC: Contrastive Predictive Coding on images, trained with the InfoNCE loss.

Paper: van den Oord, Li and Vinyals, "Representation Learning with Contrastive Predictive Coding",
2018 (arXiv:1807.03748), section 3.2 for images; options from CPC v2: Henaff et al.,
"Data-Efficient Image Recognition with Contrastive Predictive Coding", ICML 2020 (arXiv:1905.09272).

Each image is cut into a G x G grid of overlapping square patches x_ij, and the rows of the grid
play the role of the paper's time steps t. Its equations map to this file as follows:
    z_t = g_enc(x_t)                   CPC.forward: a ResNet (`backbone`) encodes every patch on
                                       its own and average-pools it to one vector z_ij. The grid
                                       comes from PatchViews (training) or common.extract_patches
    c_t = g_ar(z_<=t)                  ContextNetwork: masked convolutions, so c_ij depends only
                                       on the rows at or above row i
    f_k(x_{t+k}, c_t) = exp(z_{t+k}^T W_k c_t)   (equation 3, the log-bilinear density ratio of
                                       equation 2) CPC.predictor, one 1x1 convolution W_k per step
                                       k, gives W_k c_ij. info_nce takes its dot product with each
                                       candidate target and divides by --temperature (1: none)
    L_N = -E_X[log f_k(x_{t+k}, c_t) / sum_{x_j in X} f_k(x_j, c_t)]   (equation 4)
                                       info_nce: cross-entropy over the set X of every target of
                                       the global batch at every position, averaged over positions
                                       and then over the steps k
    I(x_{t+k}; c_t) >= log(N) - L_N    the bound that makes InfoNCE a mutual-information
                                       estimate, with N = len(X); log(B*G*G) minus the logged loss
For linear evaluation, z_ij is averaged over the grid (common.PatchPooledEncoder).

Run:
    python infonce_cpc.py                                  # one GPU, or the CPU
    torchrun --nproc_per_node=8 infonce_cpc.py             # eight GPUs on one node
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        --rdzv_id=cpc infonce_cpc.py                       # the same command on each of two nodes
    python eval_linear.py --checkpoint runs/<run>/checkpoint.pt
Offline, with images in class folders (DATA_DIR/train/<class>/<image>, DATA_DIR/test/...):
    python infonce_cpc.py --dataset folder --data-dir DATA_DIR

Shapes: N images per process, W processes, B = W*N global batch, G patches per grid side,
P patch side in pixels, F encoding width (512 for ResNet-18), K prediction steps.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from torch.nn.parallel import DistributedDataParallel as DDP

import common

METHOD = "infonce_cpc"


@dataclass
class Args:
    # Data and run
    dataset: common.DatasetName = "cifar10"
    """dataset: cifar10, cifar100, stl10 (pretrains on train+unlabeled) or folder (ImageFolder at DATA_DIR/train, evaluated on DATA_DIR/val or DATA_DIR/test)"""
    data_dir: str = "data"
    """dataset folder: torchvision's download root for cifar10/cifar100/stl10, or the folder that contains train/ for `folder`"""
    image_size: Optional[int] = None
    """side of the training crops in pixels. Unset: 32 for CIFAR, 64 for STL-10 (the 64-pixel crops of the public CPC ports), and for `folder` the first image's side when it is 64 or less, else 256 (CPC paper: 256-pixel crops)"""
    output_dir: Optional[str] = None
    """run folder for checkpoint.pt, backbone.pt, metrics.jsonl and args.json. Unset: the resumed checkpoint's folder, else runs/infonce_cpc-<dataset>-<arch>-<time>"""
    resume: Optional[str] = None
    """checkpoint.pt to continue from: model, optimiser, scaler, step, data order and random states are restored. Only --max-steps, --data-dir, --output-dir, --workers, --precision, --compile, --channels-last, --augment-on-device, --dist-timeout and the logging and checkpoint intervals may differ from the original run. `auto`: the checkpoint.pt in --output-dir when there is one, else a new run, so that a requeued job can repeat its command"""
    overwrite: bool = False
    """allow starting a new run in an --output-dir that already contains a checkpoint"""
    dist_timeout: float = common.DIST_TIMEOUT_S
    """seconds that a collective waits for the other processes before the run stops with an error, when a peer has died or hung (torch's default: 1800)"""
    seed: int = 0
    """random seed; process r uses seed + r"""
    workers: Optional[int] = None
    """data-loading processes per training process (0 loads in the training process). Unset: this node's CPUs divided by its processes, at most 8. Each worker draws its own augmentation seed, so the random crops and jitter of a seed depend on this number"""
    log_every: int = 10
    """print and record loss, prediction accuracy, learning rate and throughput every this many optimiser steps"""
    knn_every: int = 10
    """run the kNN monitor (k=200, T=0.1) on the grid-averaged encodings every this many epochs and at the end; 0 disables it"""
    checkpoint_every: int = 1
    """write checkpoint.pt every this many epochs and at the end"""
    max_steps: Optional[int] = None
    """stop once this many optimiser steps have been taken in total (the schedule still spans --epochs); for smoke tests and benchmarks"""
    precision: common.Precision = "auto"
    """autocast precision: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 (with a gradient scaler) or fp32. bf16 and fp16 are slow on CPUs without native support"""
    compile: bool = False
    """compile the model with torch.compile"""
    channels_last: bool = True
    """keep patches and activations in channels-last (NHWC) memory layout, which convolutions run faster in on recent GPUs and on x86 CPUs"""
    augment_on_device: bool = torch.cuda.is_available()
    """augment the views in batches on the training device (common.augment_batch) instead of image by image in data-loader workers; CIFAR, STL-10 and folders of small images are then held on the device as uint8. Default: on when CUDA is available"""

    # Patches and model
    patch_size: Optional[int] = None
    """side P of the square patches in pixels. Unset: a quarter of the image side, which gives 8 on CIFAR, 16 on 64-pixel STL-10 crops and 64 on 256-pixel crops (CPC paper)"""
    patch_stride: Optional[int] = None
    """pixels between the starts of neighbouring patches. Unset: half the patch side, so neighbours overlap by 50% (CPC paper: 64-pixel patches every 32 pixels, a 7 x 7 grid)"""
    arch: common.ResNetArch = "resnet18"
    """patch encoder g_enc, a torchvision ResNet applied to every patch (CPC paper: ResNet-v2-101; CPC v2: ResNet-161). Patches of 32 px or less get the CIFAR stem"""
    norm: Literal["layer", "group"] = "layer"
    """per-sample normalisation in the patch encoder: layer (CPC v2: layer normalisation) or group (GroupNorm with 32 groups)"""
    context_blocks: int = 5
    """residual blocks of the context network g_ar; each one extends the context by one row upwards (the pl_bolts CPC v2 port: 5)"""
    context_width: int = 256
    """hidden channels inside each context block (the pl_bolts CPC v2 port: 256)"""
    pred_steps: int = 5
    """rows below the context that are predicted, k = 1..K (CPC paper: up to 5 rows)"""
    skip_rows: Optional[int] = None
    """rows skipped between a context row and its first target. Unset: the fewest that keep every target's pixels off the context's own row, which is 1 for patches that overlap by half"""
    target_projection: bool = False
    """compute the targets through a 1x1 convolution of z, as CPC v2 does, instead of from z itself (CPC paper)"""
    temperature: float = 1.0
    """divide the scores z^T W_k c by tau; 1 is the papers' log-bilinear score without a temperature"""

    # Optimisation
    batch_size: int = 256
    """global batch B in images, split evenly over the processes (this collection's choice for CIFAR)"""
    epochs: int = 100
    """pretraining epochs (this collection's choice; the CPC paper reports no CIFAR run)"""
    lr: float = 2e-4
    """Adam learning rate, not scaled with the batch (CPC paper: 2e-4)"""
    weight_decay: float = 0.0
    """L2 weight decay added by Adam (CPC paper: none)"""
    schedule: Literal["constant", "cosine"] = "constant"
    """learning-rate schedule: constant (CPC paper) or cosine decay to 0 over --epochs"""

    # Augmentation
    crop_fraction: float = 256 / 300
    """side of the random crop as a fraction of the resized image, which is --image-size / this fraction (CPC paper: 256-pixel crops of 300-pixel images)"""
    flip: bool = True
    """flip the whole image horizontally with probability 0.5 (CPC v2)"""
    grayscale_prob: float = 0.0
    """probability of turning the whole image to greyscale (off by default, because the per-patch greyscale already removes colour)"""
    patch_jitter: float = 0.4
    """strength of the per-patch brightness, contrast and saturation jitter: factors drawn from [1 - s, 1 + s] (CPC v2 jitters each patch; 0.4 as in MoCo v2 and SimCLR's CIFAR jitter)"""
    patch_jitter_prob: float = 0.8
    """probability that a patch is jittered (MoCo v2's 0.8)"""
    patch_grayscale_prob: float = 0.2
    """probability that a patch is turned to greyscale (MoCo v2's 0.2)"""
    color_drop_prob: float = 0.0
    """probability that a patch keeps one random colour channel and loses the other two (CPC v2's colour dropping)"""


# ----------------------------------------------------------------------------------------------
# Augmentation: one crop of the whole image, then colour changes drawn for every patch
# ----------------------------------------------------------------------------------------------


class PatchViews:
    """Training transform: crop and flip the whole image, cut it into the G x G grid, and augment
    and normalise every patch on its own. Returns a (G, G, 3, P, P) tensor."""

    def __init__(self, args: Args, image_size: int, patch_size: int, stride: int, mean, std):
        resized = round(image_size / args.crop_fraction)
        steps = [T.Resize(resized, antialias=True), T.RandomCrop(image_size)]
        if args.flip:
            steps.append(T.RandomHorizontalFlip())
        if args.grayscale_prob > 0:
            steps.append(T.RandomGrayscale(args.grayscale_prob))
        self.image_transform = T.Compose([*steps, T.ToTensor()])
        self.patch_size, self.stride = patch_size, stride
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.jitter, self.jitter_prob = args.patch_jitter, args.patch_jitter_prob
        self.grayscale_prob, self.color_drop_prob = args.patch_grayscale_prob, args.color_drop_prob

    def augment_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Cut images (N, 3, H, W) in [0, 1] into the grid, then jitter and normalise every patch on its own.

        Returns (N, G, G, 3, P, P) on the images' device.
        """
        patches = common.extract_patches(x, self.patch_size, self.stride)  # (N, G, G, 3, P, P)
        grid_shape = patches.shape
        x = common.jitter_batch(patches.reshape(-1, *grid_shape[3:]), self.jitter, self.jitter_prob,
                                self.grayscale_prob)  # (N*G*G, 3, P, P)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        # Colour dropping (CPC v2): keep one random channel; the other two become 0, the mean after normalisation.
        dropped = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < self.color_drop_prob
        kept = F.one_hot(torch.randint(3, (x.shape[0],), device=x.device), 3).view(-1, 3, 1, 1).bool()
        x = torch.where(dropped & ~kept, torch.zeros((), device=x.device), x)
        return x.reshape(grid_shape)

    def __call__(self, image) -> torch.Tensor:
        x = self.image_transform(image)  # (3, H, W) in [0, 1]
        return self.augment_patches(x.unsqueeze(0))[0]


# ----------------------------------------------------------------------------------------------
# Model and loss
# ----------------------------------------------------------------------------------------------


class ContextNetwork(nn.Module):
    """g_ar: a PixelCNN-style stack of residual blocks over the z grid, masked so that the context
    c_ij depends only on the rows at or above row i.

    Each block is 1x1 convolution, ReLU, a 2x3 convolution over the row above and the row itself
    (the grid is padded with one zero row on top and none at the bottom), ReLU, 1x1 convolution,
    added to its input. 1x1 convolutions mix nothing across rows, so after b blocks c_ij depends on
    rows i-b to i, and never on a row below i.
    """

    def __init__(self, dim: int, hidden: int, blocks: int):
        super().__init__()
        # DEVIATION: the papers give no layer-by-layer design of g_ar. These blocks follow the
        # PixelCNN-style residual stack of the pl_bolts CPC v2 port in size, not in layout.
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(dim, hidden, kernel_size=1),
                nn.ReLU(inplace=True),
                nn.ZeroPad2d((1, 1, 1, 0)),  # (left, right, top, bottom)
                nn.Conv2d(hidden, hidden, kernel_size=(2, 3)),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden, dim, kernel_size=1),
            )
            for _ in range(blocks)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c = z  # (N, F, G, G)
        for block in self.blocks:
            c = c + block(c)
        return c  # (N, F, G, G)


class CPC(nn.Module):
    """Patch encoder g_enc, context network g_ar and the prediction matrices W_k."""

    def __init__(self, backbone: nn.Module, feature_dim: int, pred_steps: int, context_blocks: int = 5,
                 context_width: int = 256, target_projection: bool = False):
        super().__init__()
        self.backbone = backbone  # g_enc
        self.context = ContextNetwork(feature_dim, context_width, context_blocks)  # g_ar
        # W_1..W_K as one 1x1 convolution with K*F outputs; no bias, as in the score z^T W_k c.
        self.predictor = nn.Conv2d(feature_dim, pred_steps * feature_dim, kernel_size=1, bias=False)
        self.target_projection = (nn.Conv2d(feature_dim, feature_dim, kernel_size=1) if target_projection
                                  else nn.Identity())
        self.pred_steps = pred_steps

    def forward(self, patches: torch.Tensor,
                memory_format: torch.memory_format = torch.contiguous_format) -> tuple[torch.Tensor, torch.Tensor]:
        """Map patches (N, G, G, 3, P, P) to (predictions (K, N, F, G, G), targets (N, F, G, G)).

        predictions[k-1, n, :, i, j] = W_k c_ij of image n, the prediction for row i+k (+ skipped rows).
        """
        n, g = patches.shape[0], patches.shape[1]
        x = patches.flatten(0, 2).contiguous(memory_format=memory_format)  # (N*G*G, 3, P, P)
        z = self.backbone(x).view(n, g, g, -1).permute(0, 3, 1, 2)  # (N, F, G, G)
        c = self.context(z)  # (N, F, G, G)
        # DEVIATION: predictions run top-down only; CPC v2 also predicts from the other three
        # directions. One direction keeps the masking and the loss simple to check.
        predictions = self.predictor(c).view(n, self.pred_steps, -1, g, g).transpose(0, 1)  # (K, N, F, G, G)
        return predictions, self.target_projection(z)


def info_nce(predictions: torch.Tensor, targets_all: torch.Tensor, skip: int, tau: float = 1.0,
             offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE loss of CPC (CPC paper, equation 4), averaged over positions, then over steps.

    predictions: (K, N, D, G, G) this process's W_k c_ij; the prediction of step k at row i
                 targets row i + k + skip in the same column.
    targets_all: (B, D, G, G) the targets of every process, concatenated in rank order, with
                 gradient (`targets_all` is this process's targets in a single process).
    offset:      index of this process's first image in `targets_all`, that is rank * N.

    For each prediction p the candidates are all B*G*G targets t_m, one per position of every image.
    So the true target appears once, and the negatives are the other positions of the same image
    and all positions of the other images. The loss is -log softmax_m(p . t_m / tau) at the true
    target, normalised over the candidates of each prediction. Returns the loss and the top-1
    accuracy among the candidates, averaged the same way.
    """
    steps, n, dim, g, width = predictions.shape
    if width != g or targets_all.shape[1:] != (dim, g, g):
        raise ValueError(f"targets of shape {tuple(targets_all.shape)} do not match predictions of "
                         f"shape {tuple(predictions.shape)}; both need square G x G grids")
    if not 0 <= offset <= targets_all.shape[0] - n:
        raise ValueError(f"offset {offset} leaves no room for this process's {n} images among the "
                         f"{targets_all.shape[0]} of targets_all")
    if skip < 0:
        raise ValueError(f"skip {skip} must not be negative")
    if g - steps - skip < 1:
        raise ValueError(f"a grid of {g} rows leaves no context row for step {steps} with {skip} skipped rows")
    losses, accuracies = [], []
    # Scores in float32 (or float64 for float64 inputs) even under autocast, because bf16 keeps
    # too few digits for the softmax over thousands of candidates.
    dtype = torch.promote_types(predictions.dtype, torch.float32)
    with torch.autocast(predictions.device.type, enabled=False):
        candidates = targets_all.to(dtype).permute(0, 2, 3, 1).reshape(-1, dim)  # (B*G*G, D)
        for k in range(1, steps + 1):
            rows = g - k - skip  # context rows whose target row exists
            p = predictions[k - 1, :, :, :rows, :].to(dtype).permute(0, 2, 3, 1).reshape(-1, dim)  # (N*rows*G, D)
            image, row, column = torch.meshgrid(
                torch.arange(n, device=p.device), torch.arange(rows, device=p.device),
                torch.arange(g, device=p.device), indexing="ij",
            )
            labels = (((offset + image) * g + row + k + skip) * g + column).flatten()  # index of the true target
            logits = p @ candidates.T / tau  # (N*rows*G, B*G*G)
            losses.append(F.cross_entropy(logits, labels))
            accuracies.append((logits.detach().argmax(dim=1) == labels).float().mean())
    return torch.stack(losses).mean(), torch.stack(accuracies).mean()


def main(args: Args) -> None:
    # Processes, batch split, patch grid and input checks, all before any work starts.
    env = common.read_dist_env()
    args = dataclasses.replace(args, resume=common.resolve_resume(args.resume, args.output_dir))
    common.validate_training_args(args, optimizer_momentum=None, batch_norm=False)
    common.check_positive(temperature=args.temperature, crop_fraction=args.crop_fraction,
                          pred_steps=args.pred_steps, context_blocks=args.context_blocks,
                          context_width=args.context_width)
    if args.crop_fraction > 1:
        raise common.ConfigError(f"--crop-fraction {args.crop_fraction} must be at most 1 (the whole image)")
    for name in ("grayscale_prob", "patch_jitter_prob", "patch_grayscale_prob", "color_drop_prob"):
        if not 0 <= getattr(args, name) <= 1:
            raise common.ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)} must be a probability "
                                     f"between 0 and 1")
    if not 0 <= args.patch_jitter < 1:
        raise common.ConfigError(f"--patch-jitter {args.patch_jitter} must be at least 0 and below 1, so that "
                                 f"every factor in [1 - s, 1 + s] stays positive")
    batch_per_process = common.per_process_batch(args.batch_size, env.world_size)  # N
    info = common.describe_dataset(args.dataset, args.data_dir, args.image_size)
    if args.image_size is None and (info.name == "stl10" or info.image_size == common.LARGE_IMAGE_SIZE):
        info = common.describe_dataset(args.dataset, args.data_dir, 64 if info.name == "stl10" else 256)
    patch_size = args.patch_size if args.patch_size is not None else info.image_size // 4
    stride = args.patch_stride if args.patch_stride is not None else max(1, patch_size // 2)
    grid = common.patch_grid_side(info.image_size, patch_size, stride)  # G
    # The fewest skipped rows for which row i+1+skip starts below the last pixel of row i.
    skip = args.skip_rows if args.skip_rows is not None else -(-patch_size // stride) - 1
    if skip < 0:
        raise common.ConfigError(f"--skip-rows {skip} must not be negative")
    if grid - skip - 1 < 1:
        raise common.ConfigError(
            f"the {info.image_size}-pixel image gives a grid of {grid} x {grid} patches (--patch-size "
            f"{patch_size}, --patch-stride {stride}), too few rows to predict even one row after {skip} "
            f"skipped rows: that needs at least {skip + 2} rows. Use a smaller --patch-size or "
            f"--patch-stride, fewer --skip-rows, or a larger --image-size"
        )
    if grid - skip - args.pred_steps < 1:
        raise common.ConfigError(
            f"the {info.image_size}-pixel image gives a grid of {grid} x {grid} patches (--patch-size "
            f"{patch_size}, --patch-stride {stride}), too few rows for --pred-steps {args.pred_steps} with "
            f"{skip} skipped rows: that needs at least {args.pred_steps + skip + 1} rows. Lower --pred-steps "
            f"to {grid - skip - 1} or less, or use a larger --image-size or a smaller --patch-stride"
        )
    workers = args.workers if args.workers is not None else common.default_workers(env)
    precision = common.resolve_precision(args.precision, env.device)
    resolved = dataclasses.replace(args, data_dir=info.root, image_size=info.image_size, patch_size=patch_size,
                                   patch_stride=stride, skip_rows=skip, workers=workers, precision=precision)
    state = common.load_checkpoint(args.resume, METHOD) if args.resume is not None else None

    common.init_distributed(env, args.dist_timeout)
    common.seed_everything(args.seed + env.rank)

    # Data: the patch grid of one augmented view of every image, per-process batches of N images.
    common.prepare_download(info, env)
    views = PatchViews(args, info.image_size, patch_size, stride, info.mean, info.std)
    if args.augment_on_device:  # the crop, flip and greyscale of PatchViews.image_transform, in batches
        recipe = common.AugmentRecipe(info.image_size, info.mean, info.std, resize_crop=args.crop_fraction,
                                      flip_prob=0.5 if args.flip else 0.0, grayscale_prob=args.grayscale_prob)
        loader, sampler, num_images = common.device_pretrain_loader(
            info, recipe, 1, views.augment_patches, batch_per_process, workers, env, args.seed, normalize=False)
    else:
        dataset = common.pretrain_dataset(info, views)
        loader, sampler = common.pretrain_loader(dataset, batch_per_process, workers, env, args.seed)
        num_images = len(dataset)
    steps_per_epoch = num_images // args.batch_size
    if state is not None:
        # Before the batch check, so a resume with other flags names the flags that differ.
        common.check_resume(state, resolved, steps_per_epoch, args.resume)
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

    # Schedule, counted in optimiser steps.
    total_steps = args.epochs * steps_per_epoch
    stop_step = min(total_steps, args.max_steps) if args.max_steps is not None else total_steps

    # Model, optimiser, gradient scaler.
    # No BatchNorm anywhere, because batch statistics let a patch's encoding depend on the other
    # patches, including the rows it must predict. CPC v2 reports that shortcut. Layer norm stays
    # within one patch.
    cifar_stem = patch_size <= 32  # the 3x3 stem keeps small patches from shrinking to 1 pixel early
    # torchvision's initialisation, without SimCLR's zero-initialised residual scales: neither CPC
    # paper uses them, and so training starts from the random encoder that eval_linear.py's
    # --random-init baseline scores.
    backbone, feature_dim = common.build_backbone(args.arch, cifar_stem=cifar_stem,
                                                  norm_layer=common.norm_layer(args.norm))
    model = CPC(backbone, feature_dim, args.pred_steps, args.context_blocks, args.context_width,
                args.target_projection).to(env.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scaler = common.make_grad_scaler(precision, env.device)
    step = 0
    if state is not None:
        step = common.restore_training_state(state, model, optimizer, scaler, env)
    train_model = torch.compile(model) if args.compile else model
    if env.distributed:
        train_model = DDP(train_model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    encoder_meta = {"norm": args.norm, "patch_size": patch_size, "patch_stride": stride}

    metrics_path = os.path.join(output_dir, "metrics.jsonl")
    if step >= stop_step:
        if env.is_main:
            print(f"{args.resume} is at step {step}, where this run stops (--epochs or --max-steps); "
                  f"nothing to do")
        common.cleanup_distributed()
        return
    if env.is_main:
        derived = dict(world_size=env.world_size, batch_per_process=batch_per_process, grid_side=grid,
                       steps_per_epoch=steps_per_epoch, total_steps=total_steps, stop_step=stop_step,
                       cifar_stem=cifar_stem, device=str(env.device), normalization_mean=info.mean,
                       normalization_std=info.std)
        common.write_args_json(output_dir, resolved, derived)
        candidates = args.batch_size * grid * grid
        print(f"infonce_cpc: {args.arch} ({args.norm} norm) on {info.name} ({num_images} images of "
              f"{info.image_size} px) -> {output_dir}")
        print(f"patches: {grid} x {grid} grid of {patch_size} px every {stride} px | predict {args.pred_steps} "
              f"rows after skipping {skip} | {candidates} candidates per prediction")
        print(f"processes {env.world_size} on {env.device} | batch {args.batch_size} global, "
              f"{batch_per_process} per process | Adam lr {args.lr}, {args.schedule} | {precision} | "
              f"{common.loading_summary(loader, workers)}")
        print(f"steps: {steps_per_epoch} per epoch, {total_steps} in the schedule, stopping at {stop_step}; "
              f"starting at step {step}")

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
        for patches, _ in loader:
            # Learning rate: constant, or cosine decay over the schedule.
            lr = args.lr if args.schedule == "constant" else common.warmup_cosine_lr(step, total_steps, 0, args.lr)
            common.set_lr(optimizer, lr)

            # Forward: encode every patch, build the context, predict K rows ahead.
            patches = patches.to(env.device, non_blocking=True)  # (N, G, G, 3, P, P)
            with common.autocast(env.device, precision):
                predictions, targets = train_model(patches, memory_format)  # (K, N, F, G, G), (N, F, G, G)
            targets_all = common.gather_with_grad(targets)  # (B, F, G, G)
            loss, accuracy = info_nce(predictions, targets_all, skip, args.temperature,
                                      offset=env.rank * batch_per_process)

            # Backward and update; DDP averages the gradients over processes.
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            step += 1

            # Log the loss and prediction accuracy averaged over processes, learning rate, throughput and ETA.
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

        # kNN monitor on the grid-averaged encodings and checkpoint at the end of an epoch, and when the run stops.
        epoch_done = step == (epoch + 1) * steps_per_epoch
        if knn_sets is not None and not stopper.stopping and (step == stop_step or (epoch_done and (epoch + 1) % args.knn_every == 0)):
            encoder = common.PatchPooledEncoder(model.backbone, patch_size, stride)
            knn = common.knn_monitor(encoder, *knn_sets, batch_per_process, workers, env, precision, memory_format)
            if env.is_main:
                common.log_metrics({"epoch": epoch, "step": step, "knn_top1": knn}, metrics_path)
        if step == stop_step or stopper.stopping or (epoch_done and (epoch + 1) % args.checkpoint_every == 0):
            common.save_checkpoint(
                os.path.join(output_dir, "checkpoint.pt"), method=METHOD, args=resolved, info=info,
                arch=args.arch, cifar_stem=cifar_stem, feature_dim=feature_dim, step=step, epoch=epoch,
                steps_per_epoch=steps_per_epoch, model=model, optimizer=optimizer, scaler=scaler, env=env,
                encoder=encoder_meta,
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
