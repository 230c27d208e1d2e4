"""SimCLR: contrastive pretraining with two augmented views and the NT-Xent loss.

Paper: Chen, Kornblith, Norouzi and Hinton, "A Simple Framework for Contrastive Learning of
Visual Representations", ICML 2020 (arXiv:2002.05709). Authors' code: google-research/simclr.

This file implements SimCLR v1 pretraining. Each image gets two views from one random
augmentation. A ResNet f maps each view to a representation h, and a 2-layer MLP g maps h to z.
The NT-Xent loss (equation 1 of the paper) trains each view to pick its partner among the other
2B-1 views of the global batch. Negatives are gathered from every process with gradient, so W
processes of N images compute the loss and gradients of one process of W*N images (BatchNorm
statistics match as well with --sync-bn, which needs CUDA). The defaults reproduce the
authors' CIFAR-10 command (README of google-research/simclr): ResNet-18 with the CIFAR stem,
batch 512, LARS at learning rate 1.0 per 256 images, weight decay 1e-4, temperature 0.5,
1000 epochs, colour strength 0.5 and no blur.

Run:
    python simclr.py                                       # one GPU, or the CPU
    torchrun --nproc_per_node=8 simclr.py                  # eight GPUs on one node
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        --rdzv_id=simclr simclr.py                         # the same command on each of two nodes
    python eval_linear.py --checkpoint runs/<run>/checkpoint.pt
Offline, with images in class folders (DATA_DIR/train/<class>/<image>, DATA_DIR/test/...):
    python simclr.py --dataset folder --data-dir DATA_DIR

Shapes: N images per process, W processes, B = W*N global batch, D projection width (128),
F backbone feature width (512 for ResNet-18, 2048 for ResNet-50).
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
from torch.nn.parallel import DistributedDataParallel as DDP

import common

METHOD = "simclr"


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
    """run folder for checkpoint.pt, backbone.pt, metrics.jsonl and args.json. Unset: the resumed checkpoint's folder, else runs/simclr-<dataset>-<arch>-<time>"""
    resume: Optional[str] = None
    """checkpoint.pt to continue from: model, optimiser, scaler, step, data order and random states are restored. Only --max-steps, --data-dir, --output-dir, --workers, --precision, --compile, --channels-last, --augment-on-device, --dist-timeout, --sync-bn and the logging and checkpoint intervals may differ from the original run. `auto`: the checkpoint.pt in --output-dir when there is one, else a new run, so that a requeued job can repeat its command"""
    overwrite: bool = False
    """allow starting a new run in an --output-dir that already contains a checkpoint"""
    dist_timeout: float = common.DIST_TIMEOUT_S
    """seconds that a collective waits for the other processes before the run stops with an error, when a peer has died or hung (torch's default: 1800)"""
    seed: int = 0
    """random seed; process r uses seed + r"""
    workers: Optional[int] = None
    """data-loading processes per training process (0 loads in the training process). Unset: this node's CPUs divided by its processes, at most 8. Each worker draws its own augmentation seed, so the random crops and jitter of a seed depend on this number"""
    log_every: int = 10
    """print and record loss, learning rate and throughput every this many optimiser steps"""
    knn_every: int = 10
    """run the kNN monitor (k=200, T=0.1) every this many epochs and at the end; 0 disables it"""
    checkpoint_every: int = 1
    """write checkpoint.pt every this many epochs and at the end"""
    max_steps: Optional[int] = None
    """stop once this many optimiser steps have been taken in total (the schedule still spans --epochs); for smoke tests and benchmarks"""
    precision: common.Precision = "auto"
    """autocast precision: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 (with a gradient scaler) or fp32. bf16 and fp16 are slow on CPUs without native support"""
    compile: bool = False
    """compile the model with torch.compile"""
    channels_last: bool = True
    """keep images and activations in channels-last (NHWC) memory layout, which convolutions run faster in on recent GPUs and on x86 CPUs"""
    augment_on_device: bool = torch.cuda.is_available()
    """augment the views in batches on the training device (common.augment_batch) instead of image by image in data-loader workers; CIFAR, STL-10 and folders of small images are then held on the device as uint8. Default: on when CUDA is available"""
    sync_bn: bool = True
    """synchronise BatchNorm statistics across processes (SimCLR authors' code: global_bn=True); needs CUDA when there is more than one process"""

    # Model
    arch: common.ResNetArch = "resnet18"
    """backbone f, a torchvision ResNet (SimCLR authors' CIFAR-10 command: ResNet-18; SimCLR paper appendix B.9: ResNet-50); images of 64 px or less get the CIFAR stem"""
    projection_dim: int = 128
    """output width of the projection head g (SimCLR paper: 128); its hidden width equals the backbone's feature width"""
    head_bn: bool = True
    """BatchNorm in the projection head, as in the SimCLR authors' code (the SimCLR paper's g(h) = W2 ReLU(W1 h) has none)"""

    # Loss and optimisation
    temperature: float = 0.5
    """tau of NT-Xent (SimCLR authors' CIFAR-10 command: 0.5; SimCLR paper's ImageNet default: 0.1)"""
    batch_size: int = 512
    """global batch size B in images, split evenly over the processes (SimCLR authors' CIFAR-10 command: 512)"""
    epochs: int = 1000
    """pretraining epochs (SimCLR authors' CIFAR-10 command: 1000)"""
    optimizer: Literal["lars", "sgd"] = "lars"
    """lars (SimCLR paper, trust coefficient 0.001, biases and BatchNorm excluded) or sgd with momentum"""
    lr: float = 1.0
    """base learning rate, scaled by --lr-scaling (SimCLR authors' CIFAR-10 command: 1.0 per 256 images, linear)"""
    lr_scaling: Literal["linear", "sqrt"] = "linear"
    """peak learning rate = lr * B/256 (linear) or lr * sqrt(B) (sqrt, which the SimCLR paper prefers for small batches, with lr 0.075 on ImageNet)"""
    weight_decay: float = 1e-4
    """L2 weight decay (SimCLR authors' CIFAR-10 command: 1e-4; SimCLR paper's ImageNet default: 1e-6)"""
    momentum: float = 0.9
    """optimiser momentum (SimCLR authors' code: 0.9)"""
    warmup_epochs: float = 10
    """epochs of linear learning-rate warm-up before the cosine decay (SimCLR paper and authors' code: 10)"""
    color_jitter_strength: Optional[float] = None
    """colour-distortion strength s. Unset: 0.5 for images of 64 px or less (SimCLR authors' CIFAR-10 command) and 1.0 otherwise (SimCLR paper). Gaussian blur is used only for images larger than 64 px"""


def projection_head(in_dim: int, hidden_dim: int, out_dim: int, batch_norm: bool) -> nn.Sequential:
    """Build the projection head g(h) = W2 ReLU(W1 h) of SimCLR v1 (paper section 2.1).

    With `batch_norm`, as in the authors' code (model_util.projection_head): each linear layer is
    followed by BatchNorm instead of a bias, and the last BatchNorm has a scale but no shift.
    """
    if not batch_norm:
        return nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim, bias=False),
        )
    out_bn = nn.BatchNorm1d(out_dim)
    out_bn.bias.requires_grad_(False)  # TensorFlow's center=False: the shift stays at 0
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False),
        out_bn,
    )


class SimCLR(nn.Module):
    """Backbone f and projection head g: z = g(f(x)). The representation h = f(x) is what is
    evaluated downstream; z is used only by the loss."""

    def __init__(self, backbone: nn.Module, feature_dim: int, projection_dim: int = 128, head_bn: bool = True):
        super().__init__()
        self.backbone = backbone
        self.projector = projection_head(feature_dim, feature_dim, projection_dim, head_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.backbone(x)  # (2N, F)
        return self.projector(h)  # (2N, D)


def nt_xent(z: torch.Tensor, z_all: torch.Tensor, tau: float, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent loss (SimCLR equation 1), averaged over the anchors in `z`.

    z:      (2N, D) this process's projections; row i and row i+N are the two views of image i.
    z_all:  (2B, D) the projections of every process, concatenated in rank order, with gradient
            (`z_all` is `z` in a single process).
    offset: row of `z_all` that contains z[0], that is rank * 2N.

    For anchor i with positive p(i), using cosine similarity sim:
        l_i = -log( exp(sim(i, p(i))/tau) / sum_{k != i} exp(sim(i, k)/tau) ),
    where k runs over all 2B views except the anchor itself; the positive stays in the
    denominator. The self-similarity is set to -inf before the softmax, so it gets no gradient.
    Returns the loss and the contrastive accuracy: the fraction of anchors whose most similar
    other view is their positive.
    """
    two_n = z.shape[0]
    rows = torch.arange(two_n, device=z.device)
    positive = offset + (rows + two_n // 2) % two_n  # column of p(i) in z_all
    self_mask = F.one_hot(offset + rows, z_all.shape[0]).bool()  # (2N, 2B)
    # Similarities in float32 even under autocast: exp(1/tau) overflows fp16 for small tau.
    with torch.autocast(z.device.type, enabled=False):
        z = F.normalize(z.float(), dim=1)
        z_all = F.normalize(z_all.float(), dim=1)
        logits = z @ z_all.T / tau  # (2N, 2B)
        logits = logits.masked_fill(self_mask, float("-inf"))
        # DEVIATION: the paper's mean over the 2N anchors; the authors' code adds the means of the
        # two view directions, which is twice this.
        loss = F.cross_entropy(logits, positive)
    accuracy = (logits.detach().argmax(dim=1) == positive).float().mean()
    return loss, accuracy


def main(args: Args) -> None:
    # Processes, batch split and input checks, all before any work starts.
    env = common.read_dist_env()
    args = dataclasses.replace(args, resume=common.resolve_resume(args.resume, args.output_dir))
    common.validate_training_args(args)
    common.check_positive(temperature=args.temperature, projection_dim=args.projection_dim)
    batch_per_process = common.per_process_batch(args.batch_size, env.world_size)  # N
    if env.distributed and args.sync_bn and env.device.type != "cuda":
        raise common.ConfigError(
            "--sync-bn needs CUDA (torch's SyncBatchNorm has no CPU implementation); pass "
            "--no-sync-bn to train on several CPU processes with per-process BatchNorm"
        )
    info = common.describe_dataset(args.dataset, args.data_dir, args.image_size)
    strength = args.color_jitter_strength
    if strength is None:
        strength = 0.5 if info.small_images else 1.0
    elif not 0 <= strength <= 2.5:
        # Hue jitter is 0.2*s, and torchvision's ColorJitter accepts hue factors up to 0.5.
        raise common.ConfigError(f"--color-jitter-strength {strength} must be between 0 and 2.5 "
                                 f"(paper: 1.0 on ImageNet; authors' CIFAR-10 command: 0.5)")
    blur = not info.small_images
    workers = args.workers if args.workers is not None else common.default_workers(env)
    precision = common.resolve_precision(args.precision, env.device)
    resolved = dataclasses.replace(args, data_dir=info.root, image_size=info.image_size,
                                   color_jitter_strength=strength, workers=workers, precision=precision)
    state = common.load_checkpoint(args.resume, METHOD) if args.resume is not None else None

    common.init_distributed(env, args.dist_timeout)
    common.seed_everything(args.seed + env.rank)

    # Data: two views of every image, per-process batches of N images.
    common.prepare_download(info, env)
    augmentation = common.simclr_augmentation(info.image_size, info.mean, info.std, strength, blur)
    recipe = common.simclr_recipe(info.image_size, info.mean, info.std, strength, blur)
    loader, sampler, num_images = common.two_view_loader(info, augmentation, recipe, args.augment_on_device,
                                                         batch_per_process, workers, env, args.seed)
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
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    stop_step = min(total_steps, args.max_steps) if args.max_steps is not None else total_steps
    peak_lr = common.scale_lr(args.lr, args.batch_size, args.lr_scaling)

    # Model, optimiser, gradient scaler.
    # Residual blocks start as the identity (last BatchNorm scale 0), as in the authors' ResNet code.
    backbone, feature_dim = common.build_backbone(args.arch, cifar_stem=info.small_images, zero_init_residual=True)
    model = SimCLR(backbone, feature_dim, args.projection_dim, args.head_bn).to(env.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if env.distributed and args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = common.build_optimizer(args.optimizer, model, peak_lr, args.momentum, args.weight_decay)
    scaler = common.make_grad_scaler(precision, env.device)
    step = 0
    if state is not None:
        step = common.restore_training_state(state, model, optimizer, scaler, env)
    train_model = torch.compile(model) if args.compile else model
    if env.distributed:
        train_model = DDP(train_model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)

    metrics_path = os.path.join(output_dir, "metrics.jsonl")
    if step >= stop_step:
        if env.is_main:
            print(f"{args.resume} is at step {step}, where this run stops (--epochs or --max-steps); "
                  f"nothing to do")
        common.cleanup_distributed()
        return
    if env.is_main:
        derived = dict(world_size=env.world_size, batch_per_process=batch_per_process, peak_lr=peak_lr,
                       steps_per_epoch=steps_per_epoch, total_steps=total_steps, warmup_steps=warmup_steps,
                       stop_step=stop_step, blur=blur, cifar_stem=info.small_images, device=str(env.device),
                       normalization_mean=info.mean, normalization_std=info.std)
        common.write_args_json(output_dir, resolved, derived)
        print(f"simclr: {args.arch} on {info.name} ({num_images} images of {info.image_size} px, "
              f"colour strength {strength}, blur {blur}) -> {output_dir}")
        print(f"processes {env.world_size} on {env.device} | batch {args.batch_size} global, "
              f"{batch_per_process} per process | lr {args.lr} base, {peak_lr:.4g} peak ({args.lr_scaling} "
              f"scaling) | {precision} | {common.loading_summary(loader, workers)}")
        print(f"steps: {steps_per_epoch} per epoch, {warmup_steps} warm-up, {total_steps} in the "
              f"schedule, stopping at {stop_step}; starting at step {step}")

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
        for (x1, x2), _ in loader:
            # Learning rate: linear warm-up, then cosine decay, set every step.
            lr = common.warmup_cosine_lr(step, total_steps, warmup_steps, peak_lr)
            common.set_lr(optimizer, lr)

            # Forward: both views in one batch, so BatchNorm normalises over all 2N views, as in the authors' code.
            x = torch.cat([x1, x2]).to(env.device, memory_format=memory_format, non_blocking=True)  # (2N, 3, H, W)
            with common.autocast(env.device, precision):
                z = train_model(x)  # (2N, D)
            z_all = common.gather_with_grad(z)  # (2B, D)
            loss, accuracy = nt_xent(z, z_all, args.temperature, offset=env.rank * z.shape[0])

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

            # Log the loss averaged over processes, learning rate, throughput and ETA.
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
                arch=args.arch, cifar_stem=info.small_images, feature_dim=feature_dim, step=step, epoch=epoch,
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
