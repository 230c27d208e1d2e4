"""Plumbing shared by the method files: data, augmentation, backbone, distributed
training, precision, optimisers, checkpoints, logging and the kNN monitor.

The algorithms themselves (losses, heads, queues, momentum encoders) live in the
method files. Everything here runs unchanged under `python` and under `torchrun`.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import hashlib
import json
import math
import multiprocessing
import os
import random
import shlex
import signal
import sys
import time
import urllib.error
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
import tyro
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

DatasetName = Literal["cifar10", "cifar100", "stl10", "folder"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
# The ResNet family of torchvision.models; a test keeps this list in step with torchvision.
ResNetArch = Literal[
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "wide_resnet50_2", "wide_resnet101_2",
]

CHECKPOINT_FORMAT = "contrastive-ssl-checkpoint"
CHECKPOINT_VERSION = 1
# Images of this side or less are "small": CIFAR stem, SimCLR's CIFAR augmentation, no
# resize-and-centre-crop at evaluation.
# DEVIATION: SimCLR's code uses the CIFAR stem up to 32 px; 64 px here, so that images of 33 to
# 64 px also keep their resolution through the first residual stage.
SMALL_IMAGE_MAX_SIDE = 64


class ConfigError(Exception):
    """Invalid command-line value or input file, reported without a traceback."""


class TrainingError(Exception):
    """Failure that stops a run part-way, such as a non-finite loss, reported without a traceback."""


# A boolean flag with no --no- form. Options that a preset turns on (MoCo's --v2 turns on --mlp)
# use it, so that "--v2 --no-mlp" is rejected as an unknown flag instead of silently overridden.
SwitchOnFlag = Annotated[bool, tyro.conf.FlagCreatePairsOff]


def run_cli(main: Callable[[Any], None], args_type: type) -> None:
    """Parse `args_type` with tyro and call `main(args)`, turning a ConfigError into a clean exit."""
    args = tyro.cli(args_type)
    try:
        main(args)
    except (ConfigError, TrainingError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        # Every rank checks the same inputs and computes the same averaged loss, so all of them
        # raise together and reach this barrier. Gloo can abort at exit when a group is destroyed
        # without one.
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        sys.exit(2 if isinstance(error, ConfigError) else 1)


# ----------------------------------------------------------------------------------------------
# Distributed training
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistEnv:
    """Placement of this process: its rank among `world_size` processes, and its device."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def read_dist_env() -> DistEnv:
    """Read rank and world size from the variables torchrun sets (one process when absent)."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistEnv(rank, local_rank, world_size, local_world_size, device)


# torch's default process-group timeout. A collective waits this long for a peer that has hung,
# which must cover rank 0 downloading a dataset while the other ranks wait at a barrier.
DIST_TIMEOUT_S = 1800.0


def init_distributed(env: DistEnv, timeout_s: float = DIST_TIMEOUT_S) -> None:
    """Join the process group (NCCL on CUDA, gloo on CPU) when torchrun started several processes.

    A collective that waits more than `timeout_s` seconds for another process raises an error,
    so a run whose peer has died or hung stops instead of waiting forever.
    """
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if env.distributed:
        backend = "nccl" if env.device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        if backend == "nccl":
            dist.init_process_group(backend, device_id=env.device, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)


def cleanup_distributed() -> None:
    """Leave the process group after a barrier, which keeps gloo from aborting at exit."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
    """Record SIGTERM and SIGINT (what SLURM, torchrun and Ctrl-C send), so that the training loop
    can finish its step, write a checkpoint and exit. A second SIGINT stops at once."""

    def __init__(self):
        self.signal: Optional[int] = None  # the first stop signal this process received
        self.stopping = False  # whether all processes agreed to stop, set by requested()
        for number in STOP_SIGNALS:
            signal.signal(number, self._record)
        atexit.register(kill_loader_workers)

    def _record(self, number: int, frame) -> None:
        if number == signal.SIGINT and self.signal is not None:
            raise KeyboardInterrupt
        self.signal = number

    def requested(self, env: DistEnv) -> bool:
        """Return whether any process has received a stop signal, and store the result in `stopping`.

        Every rank must call this at the same step. The result is the same on every rank, even when
        a signal reaches one rank between two calls.
        """
        stop = self.signal is not None
        if env.distributed:
            flag = torch.tensor([int(stop)], device=env.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
            if stop and self.signal is None:
                self.signal = signal.SIGTERM  # another rank received it
        self.stopping = stop
        return stop

    def exit(self, checkpoint: str, env: DistEnv) -> None:
        """Print where the run stopped and how to continue it, leave the process group, and exit
        with status 128 + the signal number, as a process killed by that signal would."""
        name = signal.Signals(self.signal).name
        if env.is_main:
            argv = without_resume(sys.argv[1:])
            command = shlex.join(["python", sys.argv[0], *argv, "--resume", checkpoint])
            auto = " (or --resume auto with the same --output-dir)" if any(
                arg.startswith("--output-dir") for arg in argv) else ""
            print(f"stopped by {name} after finishing the step; the checkpoint is {checkpoint}\n"
                  f"continue with the same command plus --resume {checkpoint}{auto}; for one process:\n"
                  f"  {command}", flush=True)
        cleanup_distributed()
        sys.exit(128 + self.signal)


def without_resume(argv: list[str]) -> list[str]:
    """Drop --resume and its value, and --overwrite, from a command line."""
    kept, skip_value = [], False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg == "--resume":
            skip_value = True
        elif not arg.startswith(("--resume=", "--overwrite", "--no-overwrite")):
            kept.append(arg)
    return kept


def exit_on_stop_signals(program: str) -> None:
    """Make SIGTERM and SIGINT end `program`, which keeps no partial state, with exit status 128 +
    the signal number and a message to run the same command again."""

    def stop(number: int, frame) -> None:
        print(f"{program}: stopped by {signal.Signals(number).name} before it finished; it writes nothing "
              f"part-way, so run the same command again", file=sys.stderr, flush=True)
        sys.exit(128 + number)

    atexit.register(kill_loader_workers)
    for number in STOP_SIGNALS:
        signal.signal(number, stop)


def ignore_stop_signals(worker_id: int) -> None:
    """Let data-loader workers ignore SIGTERM and SIGINT, which SLURM and a terminal also send to
    them: the training process shuts them down after it has written its checkpoint."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


def kill_loader_workers() -> None:
    """Kill the child processes that are still running when the training process exits.

    Python's exit handler stops daemonic children with SIGTERM and waits for them with no time
    limit. Loader workers ignore SIGTERM, so an exit on an exception would otherwise hang.
    """
    for child in multiprocessing.active_children():
        child.kill()


def resolve_resume(resume: Optional[str], output_dir: Optional[str]) -> Optional[str]:
    """Turn --resume auto into the checkpoint in --output-dir, or None (a new run) when it has none."""
    if resume != "auto":
        return resume
    if output_dir is None:
        raise ConfigError("--resume auto needs --output-dir, the run folder to look for checkpoint.pt in")
    checkpoint = os.path.join(output_dir, "checkpoint.pt")
    return checkpoint if os.path.isfile(checkpoint) else None


def check_replicas_identical(model: nn.Module, env: DistEnv) -> None:
    """Raise TrainingError unless every process has the same parameters and buffers, BatchNorm
    statistics excepted (each process keeps its own without SyncBatchNorm). Every rank must call
    this; with several processes, rank 0 prints the result."""
    if not env.distributed:
        return
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if "running_" in name or name.endswith("num_batches_tracked"):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    digests = gather_objects(digest.hexdigest())
    if len(set(digests)) != 1:
        raise TrainingError(f"the processes ended with different weights (SHA-256 per rank: {digests}); "
                            f"the data-parallel synchronisation failed")
    if env.is_main:
        print(f"weights identical on all {env.world_size} processes (SHA-256 {digests[0][:16]}, BatchNorm "
              f"statistics excluded)")


def check_positive(**flags: float) -> None:
    """Raise ConfigError naming every flag (given by its field name) whose value is not a positive finite number."""
    invalid = [f"--{name.replace('_', '-')} {value}" for name, value in flags.items()
               if not (value > 0 and math.isfinite(value))]
    if invalid:
        raise ConfigError(f"{', '.join(invalid)} must be a positive finite number")


def momentum_problem(momentum: float, allow_zero: bool = True) -> Optional[str]:
    """Describe why an optimiser momentum is unusable, or return None. At 1 or above the velocity
    never decays, so the updates grow without bound."""
    above_lower_bound = momentum >= 0 if allow_zero else momentum > 0
    if above_lower_bound and momentum < 1:
        return None
    lower = "0 (inclusive)" if allow_zero else "0 (exclusive, because Nesterov momentum needs it)"
    return f"--momentum {momentum} must be between {lower} and 1 (exclusive); the usual value is 0.9"


def validate_training_args(args: Any, optimizer_momentum: Optional[str] = "momentum",
                           batch_norm: bool = True) -> None:
    """Raise ConfigError for values of the training flags that every method file shares and that
    cannot work, naming each flag and its value.

    `optimizer_momentum` is the field of the optimiser's momentum (MoCo's `--momentum` is the key
    encoder's), or None for an optimiser without one. `batch_norm` says whether the model normalises
    over the images of a batch, which needs two of them. `warmup_epochs` is checked only where the
    method has it.
    """
    problems = []
    for name in ("epochs", "lr", "log_every", "checkpoint_every", "dist_timeout"):
        value = getattr(args, name)
        if not (value > 0 and math.isfinite(value)):
            problems.append(f"--{name.replace('_', '-')} {value} must be a positive finite number")
    for name in ("weight_decay", "warmup_epochs", "knn_every"):
        if not hasattr(args, name):
            continue
        value = getattr(args, name)
        if not (value >= 0 and math.isfinite(value)):
            problems.append(f"--{name.replace('_', '-')} {value} must be a finite number of 0 or more")
    problem = momentum_problem(getattr(args, optimizer_momentum)) if optimizer_momentum is not None else None
    if problem is not None:
        problems.append(problem.replace("--momentum", f"--{optimizer_momentum.replace('_', '-')}", 1))
    if batch_norm and args.batch_size < 2:
        problems.append(f"--batch-size {args.batch_size} must be at least 2, because BatchNorm normalises "
                        f"over the images of a batch")
    elif args.batch_size < 1:
        problems.append(f"--batch-size {args.batch_size} must be at least 1")
    if args.max_steps is not None and args.max_steps <= 0:
        problems.append(f"--max-steps {args.max_steps} must be positive")
    if args.workers is not None and args.workers < 0:
        problems.append(f"--workers {args.workers} must not be negative (0 loads data in the training process)")
    if hasattr(args, "warmup_epochs") and args.warmup_epochs > args.epochs:
        problems.append(f"--warmup-epochs {args.warmup_epochs} is longer than --epochs {args.epochs}, so the "
                        f"learning rate would never reach its peak; lower --warmup-epochs")
    if problems:
        raise ConfigError("; ".join(problems))


def per_process_batch(global_batch: int, world_size: int) -> int:
    """Split the global batch evenly over the processes, or raise ConfigError."""
    if global_batch <= 0 or global_batch % world_size != 0:
        lower = max(world_size, global_batch // world_size * world_size)
        raise ConfigError(
            f"--batch-size {global_batch} is the global batch and must be a positive multiple of "
            f"the number of processes ({world_size}); use for example --batch-size {lower} or "
            f"{lower + world_size}"
        )
    return global_batch // world_size


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradients of every rank and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        x = x.contiguous()  # the outputs below copy this layout
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (N, ...) from every rank in rank order into (W*N, ...), keeping gradients.

    Every rank's loss uses the rows of every other rank, so the gradient of the summed loss with
    respect to this rank's rows is the sum, over ranks, of the gradients that arrive at those rows.
    The backward pass computes that sum with one all_reduce and returns this rank's slice. DDP then
    averages parameter gradients over ranks, which makes W processes with N rows each match one
    process with W*N rows when each rank's loss is the mean over its own N anchors.
    Every rank must pass the same shape. With one process it returns `x` unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (N, ...) from every rank in rank order into (W*N, ...), without gradient.

    For tensors that are constants of the loss, such as MoCo's keys. Every rank must pass the same
    shape. With one process it returns `x` detached.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x.detach()
    # Contiguous first, so that the outputs (and their concatenation) are contiguous too.
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


@torch.no_grad()
def gather_uneven(x: torch.Tensor) -> list[torch.Tensor]:
    """Return every rank's `x`, in rank order, when the ranks hold different numbers of rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [x]
    world_size = dist.get_world_size()
    rows = torch.tensor([x.shape[0]], device=x.device)
    all_rows = [torch.zeros_like(rows) for _ in range(world_size)]
    dist.all_gather(all_rows, rows)
    max_rows = int(max(r.item() for r in all_rows))
    padded = x.new_zeros((max_rows, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return [part[: int(n.item())] for part, n in zip(parts, all_rows)]


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Average `x` over the ranks (a copy; `x` itself is unchanged)."""
    x = x.detach().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= dist.get_world_size()
    return x


def broadcast_object(obj: Any) -> Any:
    """Return rank 0's `obj` on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_objects(obj: Any) -> list[Any]:
    """Return the list of every rank's `obj`, in rank order, on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------------------


def resolve_precision(precision: Precision, device: torch.device) -> str:
    """Turn `auto` into bf16 on CUDA and fp32 on CPU."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    """Autocast context for `precision` (bf16 or fp16), or a null context for fp32."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(precision: str, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """Return a gradient scaler for fp16, whose small exponent range needs one, or None."""
    if precision == "fp16":
        return torch.amp.GradScaler(device.type)
    return None


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

# Per-channel mean and standard deviation of the training images, on the [0, 1] scale.
# `folder` uses ImageNet's, the usual choice for an unknown collection of photographs.
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "folder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
NATIVE_IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "stl10": 96}
# Side used for `folder` collections of large images, as for ImageNet.
LARGE_IMAGE_SIZE = 224
MIN_IMAGE_SIZE = 8


@dataclass
class DataInfo:
    """Dataset facts that the transforms and the backbone depend on."""

    name: str
    root: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    has_eval_split: bool

    @property
    def small_images(self) -> bool:
        return self.image_size <= SMALL_IMAGE_MAX_SIDE


def _folder_eval_dir(root: str) -> Optional[str]:
    for split in ("val", "test"):
        path = os.path.join(root, split)
        if os.path.isdir(path):
            return path
    return None


def _first_image_below(folder: str) -> Optional[str]:
    """Return the first image file (by sorted path) anywhere below `folder`, or None."""
    extensions = torchvision.datasets.folder.IMG_EXTENSIONS
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        for filename in sorted(filenames):
            if filename.lower().endswith(extensions):
                return os.path.join(dirpath, filename)
    return None


def _class_folders(path: str) -> list[str]:
    return sorted(entry.name for entry in os.scandir(path) if entry.is_dir())


def _check_image_folder(path: str, flag_hint: str) -> None:
    """Raise ConfigError unless every class folder in `path` contains at least one image."""
    if not os.path.isdir(path):
        raise ConfigError(
            f"data folder {path} not found; {flag_hint} expects class folders with images there "
            f"(DATA_DIR/train/<class>/<image>); check --data-dir"
        )
    classes = _class_folders(path)
    empty = [name for name in classes if _first_image_below(os.path.join(path, name)) is None]
    if not classes or len(empty) == len(classes):
        raise ConfigError(
            f"data folder {path} contains no images in class folders; expected "
            f"{path}/<class>/<image> with one of the extensions "
            f"{', '.join(torchvision.datasets.folder.IMG_EXTENSIONS)}"
        )
    if empty:
        shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        raise ConfigError(
            f"class folders without images in {path}: {shown}; add images to them or remove them"
        )


def describe_dataset(name: str, data_dir: str, image_size: Optional[int]) -> DataInfo:
    """Check the dataset's folders and resolve its image size and normalisation.

    Only the filesystem is read; nothing is downloaded here. Raises ConfigError for an unknown
    dataset, a missing or empty `folder` dataset, or an invalid image size.
    """
    if name not in NORMALIZATION:
        raise ConfigError(
            f"unknown dataset {name!r}; choose one of {', '.join(NORMALIZATION)} "
            f"(`folder` reads an ImageFolder at DATA_DIR/train)"
        )
    root = os.path.abspath(os.path.expanduser(data_dir))
    mean, std = NORMALIZATION[name]
    has_eval_split = True
    if name == "folder":
        _check_image_folder(os.path.join(root, "train"), "--dataset folder")
        eval_dir = _folder_eval_dir(root)
        has_eval_split = eval_dir is not None
        if eval_dir is not None:
            _check_image_folder(eval_dir, "--dataset folder")
        if image_size is None:
            image_size = _native_folder_side(os.path.join(root, "train"))
            if image_size < MIN_IMAGE_SIZE:
                raise ConfigError(
                    f"the images in {root}/train are {image_size} px (judged by "
                    f"{_first_image_below(os.path.join(root, 'train'))}), too small to train on; pass "
                    f"--image-size {MIN_IMAGE_SIZE} or more to upscale them"
                )
    elif image_size is None:
        image_size = NATIVE_IMAGE_SIZE[name]
    if image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"--image-size {image_size} is too small; use at least {MIN_IMAGE_SIZE} pixels")
    return DataInfo(name, root, image_size, mean, std, has_eval_split)


def _native_folder_side(train_dir: str) -> int:
    """Return the first image's shorter side if it is small (CIFAR-like collections), else 224."""
    first = _first_image_below(train_dir)
    from PIL import Image

    try:
        with Image.open(first) as image:
            side = min(image.size)
    except OSError as error:
        raise ConfigError(f"cannot read image {first}, whose size sets the training size: {error}; remove or "
                          f"replace the file, or pass --image-size") from error
    return side if side <= SMALL_IMAGE_MAX_SIDE else LARGE_IMAGE_SIZE


def _torchvision_dataset(name: str, root: str, split: str, transform, download: bool) -> Dataset:
    if name == "cifar10":
        return torchvision.datasets.CIFAR10(root, train=split == "train", transform=transform, download=download)
    if name == "cifar100":
        return torchvision.datasets.CIFAR100(root, train=split == "train", transform=transform, download=download)
    if name == "stl10":
        return torchvision.datasets.STL10(root, split=split, transform=transform, download=download)
    raise ValueError(name)


def prepare_download(info: DataInfo, env: DistEnv) -> None:
    """Make sure a torchvision dataset is on disk, downloading it on each node's first process.

    When the download fails (typically because there is no network), every rank raises a
    ConfigError whose message suggests pointing --data-dir at a copy.
    """
    if info.name == "folder":
        return
    error: Optional[str] = None
    if env.local_rank == 0:
        try:
            _torchvision_dataset(info.name, info.root, "test", None, download=False)
            _torchvision_dataset(info.name, info.root, "train", None, download=False)
        except RuntimeError:  # torchvision's "Dataset not found or corrupted"
            print(f"{info.name} not found in {info.root}, or its files failed torchvision's checksum; "
                  f"downloading it with torchvision", flush=True)
            root_existed = os.path.isdir(info.root)
            try:
                _torchvision_dataset(info.name, info.root, "test", None, download=True)
            except (urllib.error.URLError, OSError, RuntimeError, zipfile.BadZipFile) as download_error:
                error = f"{type(download_error).__name__}: {download_error}"
                # torchvision creates the root before downloading; a mistyped --data-dir should not
                # leave an empty folder behind.
                if not root_existed and os.path.isdir(info.root) and not os.listdir(info.root):
                    os.rmdir(info.root)
    if env.distributed:
        errors = gather_objects(error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise ConfigError(
            f"{info.name} is not in {info.root} and downloading it failed ({error}). "
            f"This machine may have no network: download the dataset elsewhere and point "
            f"--data-dir at the folder that contains it, or convert it to class folders of "
            f"images and use --dataset folder"
        )


class UnreadableImageError(OSError):
    """An image file that PIL cannot decode."""


def load_rgb_image(path: str):
    """Open an image as RGB with torchvision's loader, naming the file when it cannot be decoded."""
    try:
        return torchvision.datasets.folder.pil_loader(path)
    except (OSError, ValueError, SyntaxError) as error:  # PIL's decoding errors, UnidentifiedImageError included
        raise UnreadableImageError(f"cannot read image {path}: {error}; remove or replace the file") from error


class SkippingImageFolder(torchvision.datasets.ImageFolder):
    """ImageFolder that replaces an image it cannot decode by the next readable image and its label,
    so that a corrupt file does not stop a run hours in. Each skipped file is reported
    once per process on stderr, with the number skipped so far in that process."""

    def __init__(self, path: str, transform):
        super().__init__(path, transform=transform, loader=load_rgb_image)
        self.skipped: set[str] = set()

    def __getitem__(self, index: int):
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            try:
                return super().__getitem__(candidate)
            except UnreadableImageError as error:
                path = self.samples[candidate][0]
                if path not in self.skipped:
                    self.skipped.add(path)
                    print(f"warning: skipped unreadable image {path} ({error.__cause__}); "
                          f"{len(self.skipped)} skipped so far from {self.root} by this process",
                          file=sys.stderr, flush=True)
        raise UnreadableImageError(f"none of the {len(self)} images under {self.root} can be read")


def image_folder(path: str, transform) -> SkippingImageFolder:
    return SkippingImageFolder(path, transform)


def pretrain_dataset(info: DataInfo, transform) -> Dataset:
    """Return the pretraining split: train, or train+unlabeled for STL-10."""
    if info.name == "folder":
        return image_folder(os.path.join(info.root, "train"), transform)
    split = "train+unlabeled" if info.name == "stl10" else "train"
    return _torchvision_dataset(info.name, info.root, split, transform, download=False)


def eval_datasets(info: DataInfo, train_transform, test_transform) -> tuple[Dataset, Dataset]:
    """Return the labelled (train, test) splits of the kNN monitor and the linear probe.

    Images are read with torchvision's PIL loader, which converts greyscale, palette and RGBA
    images to RGB (alpha is dropped), so every image reaches the transforms with three channels.
    """
    if info.name == "folder":
        eval_dir = _folder_eval_dir(info.root)
        if eval_dir is None:
            raise ConfigError(
                f"{info.root} has no val/ or test/ folder, so there is no labelled split to "
                f"evaluate on; add DATA_DIR/val/<class>/<image> or DATA_DIR/test/<class>/<image>"
            )
        train = image_folder(os.path.join(info.root, "train"), train_transform)
        test = image_folder(eval_dir, test_transform)
        if test.class_to_idx != train.class_to_idx:
            raise ConfigError(
                f"the class folders of {eval_dir} differ from those of {info.root}/train; "
                f"both splits need the same classes"
            )
        return train, test
    train = _torchvision_dataset(info.name, info.root, "train", train_transform, download=False)
    test = _torchvision_dataset(info.name, info.root, "test", test_transform, download=False)
    return train, test


def num_classes(dataset: Dataset) -> int:
    if hasattr(dataset, "classes"):
        return len(dataset.classes)
    raise ValueError(f"cannot tell the number of classes of {type(dataset).__name__}")


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start an epoch after its first `skip` samples (mid-epoch resume).

    With one process it is a plain seeded shuffle. The order depends only on (seed, epoch), so a
    resumed run visits the same images in the same order as an uninterrupted one.
    """

    def __init__(self, dataset: Dataset, env: DistEnv, seed: int):
        super().__init__(
            dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed, drop_last=True
        )
        self.skip = 0

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.skip :])

    def __len__(self) -> int:
        return self.num_samples - self.skip


def default_workers(env: DistEnv) -> int:
    """Data-loading processes per training process: the CPUs this node can give it, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // env.local_world_size))


def pretrain_loader(dataset: Dataset, batch_per_process: int, workers: int, env: DistEnv, seed: int):
    """Build a shuffling loader of per-process batches that drops the last partial batch.

    The loader draws its workers' seeds from its own generator (seeded with seed + rank), not from
    torch's global one, which in-process augmentation and the training step use. So starting an
    iterator, which a resumed run does at another step than an uninterrupted one, leaves the
    global random state alone.
    """
    sampler = ResumableDistributedSampler(dataset, env, seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_per_process,
        sampler=sampler,
        num_workers=workers,
        pin_memory=env.device.type == "cuda",
        # DEVIATION: an epoch is floor(images / B) full batches, so every step has the global batch
        # that the loss and the learning-rate scaling assume. SimCLR's code batches a repeated
        # dataset for epochs * images / B steps in all, so its batches cross epoch boundaries.
        drop_last=True,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed + env.rank),
        worker_init_fn=ignore_stop_signals,
    )
    return loader, sampler


# ----------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------


class TwoViews:
    """Apply one random transform twice to the same image, giving the two views of a positive pair."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, image):
        return self.transform(image), self.transform(image)

    def __repr__(self) -> str:
        return f"TwoViews({self.transform})"


def blur_kernel_size(image_size: int) -> int:
    """SimCLR's Gaussian-blur kernel: 10% of the image side, made odd."""
    return int(0.1 * image_size) // 2 * 2 + 1


def simclr_augmentation(
    image_size: int, mean: Sequence[float], std: Sequence[float], strength: float, blur: bool
) -> T.Compose:
    """Build one view of SimCLR's augmentation (Chen et al. 2020, appendix A) from torchvision transforms.

    The steps are: random resized crop (area 0.08 to 1, aspect ratio 3/4 to 4/3), horizontal flip,
    colour jitter (0.8s, 0.8s, 0.8s, 0.2s) with probability 0.8, and greyscale with probability 0.2.
    When `blur` is set, Gaussian blur follows with probability 0.5, sigma 0.1 to 2.0 and a kernel
    10% of the side. The authors use s=1 with blur on ImageNet and s=0.5 without blur on CIFAR-10.
    """
    s = strength
    # DEVIATION: torchvision's ColorJitter scales brightness by a factor in [1-0.8s, 1+0.8s], as
    # SimCLR v2's code does; SimCLR v1's code adds an offset instead. The ops run in random order
    # in both. Crops that fail 10 sampling attempts fall back to a centre crop (torchvision)
    # rather than after 100 (SimCLR's code). The crop is resized bilinearly with antialiasing, where
    # SimCLR's code resizes bicubically.
    steps: list[nn.Module] = [
        T.RandomResizedCrop(image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    if blur:
        steps.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(image_size), sigma=(0.1, 2.0))], p=0.5))
    # DEVIATION: SimCLR's code feeds pixels in [0, 1]; here they are standardised per channel
    # with the dataset's mean and std, the torchvision convention shared by every method file.
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def moco_augmentation(image_size: int, mean: Sequence[float], std: Sequence[float], aug_plus: bool,
                      blur: bool, min_crop_scale: float = 0.2) -> T.Compose:
    """Build one view of MoCo's augmentation from torchvision transforms, as in the authors' main_moco.py.

    v1 (He et al. 2020): random resized crop (area 0.2 to 1), greyscale with probability 0.2,
    colour jitter (0.4, 0.4, 0.4, 0.4) always, horizontal flip. v2 (`aug_plus`, Chen et al. 2020):
    random resized crop (area 0.2 to 1), colour jitter (0.4, 0.4, 0.4, 0.1) with probability 0.8,
    greyscale with probability 0.2, Gaussian blur (sigma 0.1 to 2.0) with probability 0.5 when
    `blur` is set, horizontal flip. `min_crop_scale` is the smallest crop area (0.2 in both).
    """
    crop = T.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0), antialias=True)
    if not aug_plus:
        steps: list[nn.Module] = [crop, T.RandomGrayscale(p=0.2), T.ColorJitter(0.4, 0.4, 0.4, 0.4),
                                  T.RandomHorizontalFlip()]
    else:
        steps = [crop, T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)]
        if blur:
            # DEVIATION: the authors blur with PIL's GaussianBlur (radius sigma, no kernel limit);
            # torchvision needs a kernel size, taken as 10% of the side as in SimCLR.
            steps.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(image_size), sigma=(0.1, 2.0))], p=0.5))
        steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Compute the luma of RGB images (M, 3, H, W) -> (M, 1, H, W) with torchvision's rgb_to_grayscale weights."""
    # One product and one sum add the same terms in the same order as three weighted channel
    # slices. On the CPU they take less than half the time: 0.8 ms against 1.8 ms for 1024 images
    # of 32 px on 2 cores.
    weights = torch.tensor((0.2989, 0.587, 0.114), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def jitter_batch(x: torch.Tensor, jitter: float, jitter_prob: float, grayscale_prob: float) -> torch.Tensor:
    """Jitter brightness, contrast and saturation of every image of x (M, 3, H, W), values in
    [0, 1], with its own random factors from [1 - jitter, 1 + jitter], then turn some images grey.

    Each adjustment follows torchvision's definition (adjust_brightness, adjust_contrast,
    adjust_saturation), applied in that fixed order to the whole batch at once. CPC jitters every
    patch of an image on its own, and calling ColorJitter once per patch costs about a millisecond.
    """
    # NOTE: hue is not jittered, and the order of the three adjustments is not shuffled as
    # torchvision's ColorJitter does.
    m = x.shape[0]
    jittered = (torch.rand(m, 1, 1, 1, device=x.device) < jitter_prob).float()

    def factor() -> torch.Tensor:  # 1 for images that are not jittered
        return 1 + jittered * (torch.rand(m, 1, 1, 1, device=x.device) * 2 - 1) * jitter

    x = (x * factor()).clamp(0, 1)
    contrast = factor()
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)  # torchvision blends with the mean grey level
    x = (contrast * x + (1 - contrast) * mean).clamp(0, 1)
    saturation = factor()
    x = (saturation * x + (1 - saturation) * grayscale(x)).clamp(0, 1)
    grey = torch.rand(m, 1, 1, 1, device=x.device) < grayscale_prob
    return torch.where(grey, grayscale(x).expand_as(x), x)


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Evaluation transform: resize to side/0.875 and centre-crop for large images; small images
    are only resized when their side differs from `image_size`."""
    if image_size > SMALL_IMAGE_MAX_SIDE:
        resize = [T.Resize(int(round(image_size / 0.875)), antialias=True), T.CenterCrop(image_size)]
    else:
        resize = [T.Resize(image_size, antialias=True), T.CenterCrop(image_size)]
    return T.Compose([*resize, T.ToTensor(), T.Normalize(mean, std)])


# ----------------------------------------------------------------------------------------------
# Batched augmentation on the training device
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentRecipe:
    """Random augmentation of one view, as the numbers that `augment_batch` reads.

    Each recipe function below returns the recipe of one of the per-image torchvision transforms
    above, and a test checks that the two agree. Probabilities apply per image and per view.
    """

    image_size: int
    """side S of the output views in pixels"""
    mean: tuple[float, float, float]
    """per-channel mean subtracted at the end, on the [0, 1] scale"""
    std: tuple[float, float, float]
    """per-channel standard deviation divided by at the end"""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop's range of the crop area, as a fraction of the image area"""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop's range of the crop's aspect ratio, width over height"""
    resize_crop: Optional[float] = None
    """when set, replaces the random resized crop: resize the image to S / resize_crop pixels, then take a random S x S crop (CPC)"""
    flip_prob: float = 0.5
    """probability of a horizontal flip"""
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    """ColorJitter's brightness, contrast, saturation and hue strengths; 0 leaves a property alone"""
    jitter_prob: float = 0.0
    """probability of the colour jitter, whose four adjustments run in a random order per image"""
    grayscale_prob: float = 0.0
    """probability of turning the view grey"""
    grayscale_before_jitter: bool = False
    """turn grey before the colour jitter rather than after it (MoCo v1)"""
    blur_prob: float = 0.0
    """probability of a Gaussian blur with a kernel of 10% of S and sigma drawn from blur_sigma"""
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """range of the blur's standard deviation in pixels"""
    solarize_prob: float = 0.0
    """probability of solarisation, which inverts every value at or above solarize_threshold"""
    solarize_threshold: float = 0.5
    """solarisation threshold on the [0, 1] scale"""


def simclr_recipe(image_size: int, mean: Sequence[float], std: Sequence[float], strength: float,
                  blur: bool) -> AugmentRecipe:
    """Build the recipe of `simclr_augmentation` with the same arguments."""
    s = strength
    return AugmentRecipe(image_size, tuple(mean), tuple(std), crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3),
                         flip_prob=0.5, jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), jitter_prob=0.8,
                         grayscale_prob=0.2, blur_prob=0.5 if blur else 0.0)


def moco_recipe(image_size: int, mean: Sequence[float], std: Sequence[float], aug_plus: bool, blur: bool,
                min_crop_scale: float = 0.2) -> AugmentRecipe:
    """Build the recipe of `moco_augmentation` with the same arguments.

    The flip comes last in MoCo's transforms and first in `augment_batch`. The order makes no
    difference, because a flip commutes with the colour changes and with a symmetric blur.
    """
    if not aug_plus:
        return AugmentRecipe(image_size, tuple(mean), tuple(std), crop_scale=(min_crop_scale, 1.0),
                             jitter=(0.4, 0.4, 0.4, 0.4), jitter_prob=1.0, grayscale_prob=0.2,
                             grayscale_before_jitter=True)
    return AugmentRecipe(image_size, tuple(mean), tuple(std), crop_scale=(min_crop_scale, 1.0),
                         jitter=(0.4, 0.4, 0.4, 0.1), jitter_prob=0.8, grayscale_prob=0.2,
                         blur_prob=0.5 if blur else 0.0)


def crop_transform(recipe: AugmentRecipe) -> T.Compose:
    """Build the per-image crop of `recipe`, which returns uint8 tensors.

    Data-loader workers run it on large images, whose crops need the full resolution, and
    `augment_batch(crop=False)` does the rest on the device.
    """
    if recipe.resize_crop is not None:
        steps: list[nn.Module] = [T.Resize(round(recipe.image_size / recipe.resize_crop), antialias=True),
                                  T.RandomCrop(recipe.image_size)]
    else:
        steps = [T.RandomResizedCrop(recipe.image_size, scale=recipe.crop_scale, ratio=recipe.crop_ratio,
                                     antialias=True)]
    return T.Compose([*steps, T.PILToTensor()])


def sample_crop_boxes(count: int, height: int, width: int, scale: tuple[float, float],
                      ratio: tuple[float, float], device: torch.device) -> torch.Tensor:
    """Draw `count` crop boxes as RandomResizedCrop.get_params does, all at once; return (count, 4)
    rows of (top, left, height, width) in pixels.

    As in torchvision, each of 10 attempts draws an area uniformly from scale * image area and a
    log aspect ratio uniformly from log ratio, and rounds the sides. Each box takes the first
    attempt that fits in the image. When none fits, the box is the largest centred crop whose
    aspect ratio lies within `ratio`.
    """
    attempts = 10
    area = height * width
    target_area = area * torch.empty(count, attempts, device=device).uniform_(*scale)
    log_ratio = torch.empty(count, attempts, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target_area * aspect))  # (count, attempts)
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # index of the first attempt that fits (0 if none)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)

    # torchvision's fallback: the whole image, narrowed to the nearest allowed aspect ratio.
    if width / height < min(ratio):
        fallback_w, fallback_h = width, int(round(width / min(ratio)))
    elif width / height > max(ratio):
        fallback_w, fallback_h = int(round(height * max(ratio))), height
    else:
        fallback_w, fallback_h = width, height
    found = fits.any(dim=1)
    w = torch.where(found, w, torch.full_like(w, fallback_w))
    h = torch.where(found, h, torch.full_like(h, fallback_h))

    # Offsets uniform over the integers 0..side-crop, as torch.randint draws them; the fallback is centred.
    top = torch.floor(torch.rand(count, device=device) * (height - h + 1))
    left = torch.floor(torch.rand(count, device=device) * (width - w + 1))
    top = torch.where(found, top, torch.full_like(top, (height - fallback_h) // 2))
    left = torch.where(found, left, torch.full_like(left, (width - fallback_w) // 2))
    return torch.stack([top, left, h, w], dim=1)


def resize_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """Build the (M, out_size, in_size) matrices that crop pixels [start, start + length) of a line
    of `in_size` pixels and resize them to `out_size`, one matrix per row of start and length (M,).

    The weights are those of torchvision's resize with antialias=True, which are PIL's: a triangle
    filter, widened by the scale factor when shrinking, renormalised over the pixels of the crop.
    """
    scale = (length / out_size)[:, None, None]  # (M, 1, 1) input pixels per output pixel
    support = scale.clamp(min=1.0)
    centres = start[:, None, None] + (torch.arange(out_size, device=start.device) + 0.5)[None, :, None] * scale
    pixels = torch.arange(in_size, device=start.device) + 0.5  # pixel centres
    weights = (1 - (pixels - centres).abs() / support).clamp(min=0)  # (M, out_size, in_size)
    inside = (pixels >= start[:, None, None]) & (pixels < (start + length)[:, None, None])
    weights = weights * inside
    return weights / weights.sum(dim=2, keepdim=True)


def crop_matrices(count: int, height: int, width: int, recipe: AugmentRecipe,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the crops of `recipe` for `count` images of height x width.

    Returns the row and the column resampling matrices, (count, S, height) and (count, S, width).
    """
    size = recipe.image_size
    if recipe.resize_crop is None:
        top, left, h, w = sample_crop_boxes(count, height, width, recipe.crop_scale, recipe.crop_ratio,
                                            device).unbind(1)
        return resize_weights(top, h, height, size), resize_weights(left, w, width, size)

    # Resize so that the shorter side is S / resize_crop (T.Resize), then cut a random S x S crop
    # (T.RandomCrop): the crop selects S consecutive rows of the resize matrices.
    short = round(size / recipe.resize_crop)
    resized_h, resized_w = (short, int(short * width / height)) if height <= width else (int(short * height / width), short)
    if min(resized_h, resized_w) < size:
        raise ConfigError(f"the resize to {resized_h} x {resized_w} px is smaller than the {size}-pixel crop")
    zero = torch.zeros(1, device=device)
    rows = resize_weights(zero, torch.full_like(zero, height), height, resized_h)[0]  # (resized_h, height)
    cols = resize_weights(zero, torch.full_like(zero, width), width, resized_w)[0]
    top = torch.randint(0, resized_h - size + 1, (count, 1), device=device)
    left = torch.randint(0, resized_w - size + 1, (count, 1), device=device)
    steps = torch.arange(size, device=device)
    return rows[top + steps], cols[left + steps]


def rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split RGB images (M, 3, H, W) in [0, 1] into hue in [-1, 5], chroma and value, each (M, H, W).

    Hue is in sixths of a turn, and chroma (max - min) is value times saturation, which is all
    that the conversion back needs.
    """
    r, g, b = x.unbind(1)
    value = x.amax(dim=1)
    chroma = value - x.amin(dim=1)
    inverse = chroma.masked_fill(chroma == 0, 1).reciprocal_()  # grey pixels get hue 0
    # Hue sector by the largest channel, red first on ties, as torchvision's _rgb2hsv decides.
    hue = torch.where(value == r, (g - b).mul_(inverse),
                      torch.where(value == g, (b - r).mul_(inverse).add_(2), (r - g).mul_(inverse).add_(4)))
    return hue, chroma, value


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images (M, 3, H, W) in [0, 1] by `shift` (M,) turns, as
    torchvision's adjust_hue does: through HSV, with saturation and value kept."""
    hue, chroma, value = rgb_to_hsv(x)
    hue = hue.add_(6 * shift.view(-1, 1, 1)).remainder_(6)  # [0, 6)
    # Each channel is value - chroma + chroma * ramp(hue), with the piecewise-linear ramps of the
    # HSV to RGB conversion: red peaks at hue 0 (and 6), green at 2, blue at 4.
    base = value - chroma
    out = torch.empty_like(x)
    for channel, (centre, sign) in enumerate(((3.0, 1.0), (2.0, -1.0), (4.0, -1.0))):
        ramp = (hue - centre).abs_().mul_(sign).add_(-1.0 if sign > 0 else 2.0).clamp_(0, 1)
        torch.addcmul(base, ramp, chroma, out=out[:, channel])
    return out


def adjust_color(x: torch.Tensor, op: int, factor: torch.Tensor) -> torch.Tensor:
    """Apply one of ColorJitter's adjustments to images (M, 3, H, W) in [0, 1] with a factor per image (M,),
    with torchvision's definitions: 0 brightness, 1 contrast, 2 saturation, 3 hue."""
    if op == 3:
        return adjust_hue(x, factor)
    f = factor.view(-1, 1, 1, 1)
    if op == 0:
        return (x * f).clamp_(0, 1)
    reference = grayscale(x)
    if op == 1:
        reference = reference.mean(dim=(1, 2, 3), keepdim=True)  # mean grey level of each image
    # torchvision's _blend, computed in place after the first product: the CPU spends more time
    # allocating large temporaries than computing them.
    return (x * f).add_(reference * (1 - f)).clamp_(0, 1)


def color_jitter_batch(x: torch.Tensor, strengths: Sequence[float], prob: float) -> torch.Tensor:
    """Jitter brightness, contrast, saturation and hue of a `prob` fraction of the images (M, 3, H, W),
    each with its own factors and its own random order of the four adjustments, as ColorJitter does."""
    m = x.shape[0]
    applied = torch.rand(m, device=x.device) < prob
    factors = []
    for op, s in enumerate(strengths):
        if op < 3:  # ColorJitter's factor range is [max(0, 1 - s), 1 + s]
            low = max(0.0, 1 - s)
            factors.append(low + torch.rand(m, device=x.device) * (1 + s - low))
        else:  # hue shift in [-s, s] turns
            factors.append((torch.rand(m, device=x.device) * 2 - 1) * s)
    order = torch.rand(m, 4, device=x.device).argsort(dim=1)  # (M, 4): the op of each image in each round
    x = x.clone()
    for position in range(4):
        for op, s in enumerate(strengths):
            if s == 0:
                continue
            # NOTE: the index sets depend on the drawn order, so torch.compile breaks the graph here.
            index = torch.nonzero(applied & (order[:, position] == op)).squeeze(1)
            if index.numel() > 0:
                x[index] = adjust_color(x[index], op, factors[op][index])
    return x


def gaussian_blur_batch(x: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """Blur images (M, 3, H, W) with Gaussian kernels of `kernel_size` taps and one sigma per image (M,),
    with torchvision's kernel and reflect padding, as two 1-D convolutions."""
    m, c, h, w = x.shape
    half = (kernel_size - 1) / 2
    taps = torch.linspace(-half, half, kernel_size, device=x.device)
    kernel = torch.exp(-0.5 * (taps[None] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (M*3, k)
    pad = kernel_size // 2
    planes = F.pad(x.reshape(1, m * c, h, w), (pad, pad, pad, pad), mode="reflect")
    planes = F.conv2d(planes, kernel.view(m * c, 1, kernel_size, 1), groups=m * c)
    planes = F.conv2d(planes, kernel.view(m * c, 1, 1, kernel_size), groups=m * c)
    return planes.view(m, c, h, w)


# Output pixels (images times S*S) that augment_batch processes at once on the CPU.
CPU_CHUNK_PIXELS = 256 * 32 * 32


def augment_batch(images: torch.Tensor, recipe: AugmentRecipe, crop: bool = True,
                  normalize: bool = True) -> torch.Tensor:
    """Augment a batch of uint8 images (M, 3, H, W) on their device, with new parameters for every image.

    Returns float32 views (M, 3, S, S), normalised, or in [0, 1] when `normalize` is False.

    The steps are crop and resize, flip, colour jitter and greyscale (in the recipe's order), blur,
    solarisation and normalisation. Without `crop`, the images must be S x S crops already.
    """
    # DEVIATION: the views follow the distributions of the per-image torchvision transforms, but
    # are computed in float32, where PIL rounds to 8 bits after every step, and draw other random numbers.
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"augment_batch takes uint8 RGB images (M, 3, H, W), got {images.dtype} "
                         f"{tuple(images.shape)}; convert with torchvision's pil_to_tensor or (x * 255).byte()")
    m, _, height, width = images.shape
    device = images.device
    size = recipe.image_size
    if device.type == "cpu" and m * size * size > CPU_CHUNK_PIXELS:
        # Large temporaries cost page faults on every allocation, but the allocator reuses chunks
        # of a few megabytes. Measured on 2 cores: 43 ms in one piece, 30 ms in chunks, for 1024
        # views of 32 px.
        chunk = max(1, CPU_CHUNK_PIXELS // (size * size))
        return torch.cat([augment_batch(part, recipe, crop, normalize) for part in images.split(chunk)])
    if crop:
        rows, cols = crop_matrices(m, height, width, recipe, device)
    else:
        if (height, width) != (size, size):
            raise ValueError(f"uncropped images must be {size} x {size}, got {height} x {width}")
        rows = cols = torch.eye(size, device=device).expand(m, size, size)
    # The flip reverses the order of the output columns, and 1/255 scales to [0, 1]: both ride
    # on the resampling matrices, so the pixels are touched once.
    flipped = torch.rand(m, device=device) < recipe.flip_prob
    cols = torch.where(flipped.view(-1, 1, 1), cols.flip(1), cols)
    # Columns first, with the channels and rows stacked: larger products run faster than 3*M small ones.
    x = torch.bmm(images.float().reshape(m, -1, width), cols.transpose(1, 2))  # (M, 3*H, S)
    x = torch.matmul((rows / 255).unsqueeze(1), x.view(m, 3, height, size))  # (M, 3, S, S)
    x = x.clamp_(0, 1)  # against rounding just outside the range

    # Jitter and blur work on the subsets of images that they apply to. The random sizes of those
    # subsets break torch.compile's graph, so only a recipe without them compiles into one graph.
    grey = (torch.rand(m, device=device) < recipe.grayscale_prob).view(-1, 1, 1, 1)
    if recipe.grayscale_before_jitter:
        x = torch.where(grey, grayscale(x), x)
    if recipe.jitter_prob > 0 and any(recipe.jitter):
        x = color_jitter_batch(x, recipe.jitter, recipe.jitter_prob)
    if not recipe.grayscale_before_jitter:
        x = torch.where(grey, grayscale(x), x)

    if recipe.blur_prob > 0:
        sigma = torch.empty(m, device=device).uniform_(*recipe.blur_sigma)
        blurred = torch.rand(m, device=device) < recipe.blur_prob
        index = torch.nonzero(blurred).squeeze(1)
        if index.numel() > 0:
            x[index] = gaussian_blur_batch(x[index], blur_kernel_size(size), sigma[index])
    if recipe.solarize_prob > 0:
        solarized = (torch.rand(m, device=device) < recipe.solarize_prob).view(-1, 1, 1, 1)
        x = torch.where(solarized & (x >= recipe.solarize_threshold), 1 - x, x)

    if normalize:
        mean = torch.tensor(recipe.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(recipe.std, device=device).view(1, 3, 1, 1)
        x = x.sub_(mean).div_(std)
    return x


def in_memory_images(info: DataInfo) -> Optional[torch.Tensor]:
    """Return the pretraining images as one uint8 tensor (count, 3, H, W) on the CPU, or None when
    they should be decoded by data-loader workers instead.

    CIFAR and STL-10 come as arrays already (3 KB and 27 KB an image). A `folder` dataset is
    decoded once, here, when its images are small (64 px or less, judged by the first image) and
    all have the same size. Larger images stay on disk whatever --image-size is, because holding
    them would take their full size in memory and their random crops need the full resolution.
    """
    if info.name in ("cifar10", "cifar100"):
        data = _torchvision_dataset(info.name, info.root, "train", None, download=False).data  # (count, H, W, 3)
        return torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    if info.name == "stl10":
        data = _torchvision_dataset(info.name, info.root, "train+unlabeled", None, download=False).data
        return torch.from_numpy(data).contiguous()  # torchvision stores a transposed view
    folder = image_folder(os.path.join(info.root, "train"), T.PILToTensor())
    try:
        first = folder[0][0]
        if max(first.shape[1:]) > SMALL_IMAGE_MAX_SIDE:
            return None
        images = torch.empty(len(folder), *first.shape, dtype=torch.uint8)
        for index in range(len(folder)):
            image = folder[index][0]
            if image.shape != first.shape:
                return None
            images[index] = image
    except OSError as error:  # an unreadable image, named by load_rgb_image
        raise ConfigError(str(error)) from error
    return images


class DeviceBatches:
    """Per-process batches drawn from uint8 images held on the training device, augmented there.

    Iterates like the data loader of `pretrain_loader`: it yields (views, None) for the indices
    that the sampler gives this process, dropping the last partial batch, with no worker processes.
    """

    def __init__(self, images: torch.Tensor, sampler: ResumableDistributedSampler, batch_per_process: int,
                 augment: Callable[[torch.Tensor], Any]):
        self.images, self.sampler, self.batch, self.augment = images, sampler, batch_per_process, augment

    def __iter__(self):
        indices = torch.tensor(list(iter(self.sampler)), dtype=torch.long)
        for start in range(0, len(indices) - self.batch + 1, self.batch):
            batch = self.images[indices[start:start + self.batch].to(self.images.device)]
            yield self.augment(batch), None

    def __len__(self) -> int:
        return len(self.sampler) // self.batch


class DeviceAugmentedLoader:
    """A data loader of uint8 crops decoded by workers, whose views are finished on the training device."""

    def __init__(self, loader: DataLoader, device: torch.device, augment: Callable[[torch.Tensor], Any]):
        self.loader, self.device, self.augment = loader, device, augment

    def __iter__(self):
        for crops, _ in self.loader:  # crops: one (N, 3, S, S) uint8 tensor per view, pinned on CUDA
            # Each view goes to the device before the concatenation, which would lose the pinning.
            crops = torch.cat([view.to(self.device, non_blocking=True) for view in crops])  # (V*N, 3, S, S)
            yield self.augment(crops), None

    def __len__(self) -> int:
        return len(self.loader)


class ManyViews:
    """Apply one random transform `views` times to the same image."""

    def __init__(self, transform: Callable, views: int):
        self.transform, self.views = transform, views

    def __call__(self, image):
        return [self.transform(image) for _ in range(self.views)]


def device_pretrain_loader(info: DataInfo, recipe: AugmentRecipe, views: int, finish: Callable[[torch.Tensor], Any],
                           batch_per_process: int, workers: int, env: DistEnv, seed: int,
                           normalize: bool = True):
    """Build a loader whose batches are augmented on env.device by `augment_batch`.

    Every image of a batch gets `views` views, each with its own parameters. `finish` turns the
    (views*N, 3, S, S) result into what the training step takes (two views, a patch grid).
    Datasets that `in_memory_images` returns are copied to the device and need no workers.
    Returns (loader, sampler, number of images).
    """
    images = in_memory_images(info)
    if images is not None:
        sampler = ResumableDistributedSampler(range(len(images)), env, seed)  # indices only, no second copy

        def augment(batch: torch.Tensor):
            return finish(augment_batch(batch.repeat(views, 1, 1, 1), recipe, normalize=normalize))

        return DeviceBatches(images.to(env.device), sampler, batch_per_process, augment), sampler, len(images)

    # Large images: workers decode and crop (uint8), the device does the rest.
    dataset = pretrain_dataset(info, ManyViews(crop_transform(recipe), views))
    loader, sampler = pretrain_loader(dataset, batch_per_process, workers, env, seed)

    def augment_crops(crops: torch.Tensor):
        return finish(augment_batch(crops, recipe, crop=False, normalize=normalize))

    return DeviceAugmentedLoader(loader, env.device, augment_crops), sampler, len(dataset)


def loading_summary(loader: Any, workers: int) -> str:
    """Describe for the start-up message where the views of `loader` are made."""
    if isinstance(loader, DeviceBatches):
        return "images held on the device and augmented there in batches"
    if isinstance(loader, DeviceAugmentedLoader):
        return f"loader workers per process: {workers}, decoding and cropping; the device augments"
    return f"loader workers per process: {workers}"


def two_view_loader(info: DataInfo, transform: Callable, recipe: AugmentRecipe, on_device: bool,
                    batch_per_process: int, workers: int, env: DistEnv, seed: int):
    """Build the loader of two views of every image: per image with `transform` in data-loader
    workers, or in batches on env.device with `recipe` (`on_device`). Both yield ((x1, x2), labels or
    None) with x1 and x2 (N, 3, S, S). Returns (loader, sampler, number of images)."""
    if on_device:
        return device_pretrain_loader(info, recipe, 2, lambda views: tuple(views.chunk(2)), batch_per_process,
                                      workers, env, seed)
    dataset = pretrain_dataset(info, TwoViews(transform))
    loader, sampler = pretrain_loader(dataset, batch_per_process, workers, env, seed)
    return loader, sampler, len(dataset)


# ----------------------------------------------------------------------------------------------
# Backbone
# ----------------------------------------------------------------------------------------------


def build_backbone(arch: str, cifar_stem: bool, zero_init_residual: bool = False,
                   norm_layer: Optional[Callable[[int], nn.Module]] = None) -> tuple[nn.Module, int]:
    """Build a randomly initialised torchvision ResNet without its classifier; return it and its
    feature width.

    `cifar_stem` replaces the 7x7 stride-2 convolution and the max-pool with one 3x3 stride-1
    convolution, as SimCLR's code does for CIFAR images, so that 32-pixel inputs are not reduced
    to 8 pixels before the first residual stage. `zero_init_residual` starts the last BatchNorm
    scale of every residual block at 0, so each block starts as the identity. The module keeps
    torchvision's parameter names, so its state dict loads into `torchvision.models.<arch>()`
    given the same stem and `fc`. `norm_layer` replaces BatchNorm2d (torchvision's argument); a
    subclass of BatchNorm2d keeps the state dict loadable into the plain model.
    """
    if arch not in ResNetArch.__args__:
        raise ConfigError(f"unknown --arch {arch!r}; choose one of {', '.join(ResNetArch.__args__)}")
    extra = {"norm_layer": norm_layer} if norm_layer is not None else {}
    # DEVIATION: torchvision's initialisation (Kaiming normal for convolutions); SimCLR's TensorFlow
    # code uses its variance-scaling initialiser, and MoCo's code torchvision's, as here.
    model = torchvision.models.get_model(arch, weights=None, zero_init_residual=zero_init_residual, **extra)
    if cifar_stem:
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    return model, feature_dim


NormName = Literal["batch", "layer", "group"]


def norm_layer(name: NormName) -> Optional[Callable[[int], nn.Module]]:
    """Return torchvision's `norm_layer` argument for a normalisation name (None keeps BatchNorm).

    "layer" is GroupNorm with one group: each sample's activations are normalised over all
    channels and positions, with a scale and shift per channel, which is the layer normalisation
    of convolutional networks. "group" uses 32 groups (Wu and He 2018). Neither mixes samples.
    """
    if name == "batch":
        return None
    if name == "layer":
        return lambda channels: nn.GroupNorm(1, channels)
    if name == "group":
        return lambda channels: nn.GroupNorm(32, channels)
    raise ConfigError(f"unknown normalisation {name!r}; choose batch, layer or group")


def patch_grid_side(image_size: int, patch_size: int, stride: int) -> int:
    """Return G, the number of patches along each side of a G x G grid of square patches.

    Raises ConfigError when a patch does not fit in the image or the stride is not positive.
    """
    if patch_size <= 0:
        raise ConfigError(f"--patch-size {patch_size} must be positive")
    if stride <= 0:
        raise ConfigError(f"--patch-stride {stride} must be positive")
    if patch_size > image_size:
        raise ConfigError(
            f"--patch-size {patch_size} is larger than the {image_size}-pixel image; use a smaller "
            f"--patch-size or a larger --image-size"
        )
    return (image_size - patch_size) // stride + 1


def extract_patches(images: torch.Tensor, patch_size: int, stride: int) -> torch.Tensor:
    """Cut images (N, C, H, W) into the overlapping patches of a G x G grid: (N, G, G, C, P, P).

    Patch (i, j) starts at row i*stride and column j*stride. Pixels beyond the last full patch
    are left out when (side - patch_size) is not a multiple of the stride.
    """
    patches = images.unfold(2, patch_size, stride).unfold(3, patch_size, stride)  # (N, C, G, G, P, P)
    return patches.permute(0, 2, 3, 1, 4, 5)


class PatchPooledEncoder(nn.Module):
    """Encode every patch of an image's grid with `backbone` and average the G*G vectors:
    the image representation of CPC's linear evaluation. Maps (N, C, H, W) to (N, F)."""

    def __init__(self, backbone: nn.Module, patch_size: int, stride: int):
        super().__init__()
        self.backbone = backbone
        self.patch_size = patch_size
        self.stride = stride

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = extract_patches(images, self.patch_size, self.stride)  # (N, G, G, C, P, P)
        n, g = patches.shape[0], patches.shape[1]
        # Keep the caller's memory layout (channels-last during training if it asked for it).
        channels_last = images.is_contiguous(memory_format=torch.channels_last)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        z = self.backbone(patches.flatten(0, 2).contiguous(memory_format=layout))  # (N*G*G, F)
        return z.view(n, g * g, -1).mean(dim=1)  # (N, F)


def build_encoder(meta: dict[str, Any], arch: str) -> tuple[nn.Module, nn.Module, int]:
    """Build the evaluated encoder that a checkpoint's "backbone" entry describes, randomly
    initialised; return (encoder, ResNet, feature width).

    The ResNet is what the checkpoint's "backbone." weights load into. The encoder is the ResNet
    itself, or for CPC checkpoints (which record a patch size) the ResNet applied to every patch
    of the grid with the patch vectors averaged.
    """
    resnet, feature_dim = build_backbone(arch, cifar_stem=meta["cifar_stem"],
                                         norm_layer=norm_layer(meta.get("norm", "batch")))
    if "patch_size" in meta:
        return PatchPooledEncoder(resnet, meta["patch_size"], meta["patch_stride"]), resnet, feature_dim
    return resnet, resnet, feature_dim


# ----------------------------------------------------------------------------------------------
# Optimisers and learning-rate schedule
# ----------------------------------------------------------------------------------------------


def scale_lr(base_lr: float, global_batch: int, scaling: Literal["linear", "sqrt"]) -> float:
    """SimCLR's learning-rate scaling: base * B/256 (linear) or base * sqrt(B) (sqrt)."""
    if scaling == "linear":
        return base_lr * global_batch / 256
    return base_lr * math.sqrt(global_batch)


def warmup_cosine_lr(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Learning rate at optimiser step `step` (counted from 0), as in SimCLR's code.

    Linear warm-up from 0 to `peak_lr` over `warmup_steps`, then cosine decay to 0 at `total_steps`.
    """
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def split_decay_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split the trainable parameters into (weights, biases and normalisation parameters) by rank.

    Convolution and linear weights have 2 or more dimensions; biases and the scale and shift of
    BatchNorm, LayerNorm and GroupNorm have one. Frozen parameters are left out.
    """
    weights, others = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        (weights if parameter.ndim > 1 else others).append(parameter)
    return weights, others


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017), in the form of SimCLR's TensorFlow code.

    For each parameter tensor w with gradient g, in a group with `lars=True`:
        g <- g + weight_decay * w
        trust = trust_coefficient * ||w|| / ||g||   (1 when either norm is 0)
        v <- momentum * v + lr * trust * g
        w <- w - v
    Groups with `lars=False` skip the trust ratio (SimCLR excludes biases and BatchNorm parameters
    from both weight decay and adaptation; give such a group weight_decay=0 as well). The learning
    rate enters the momentum buffer, as in SimCLR's "classic momentum", not after it as in
    torch.optim.SGD; the two differ while the learning rate changes.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, lars=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for w in group["params"]:
                if w.grad is None:
                    continue
                g = w.grad
                if group["weight_decay"] != 0:
                    g = g.add(w, alpha=group["weight_decay"])
                scaled_lr = group["lr"]
                if group["lars"]:
                    w_norm = torch.linalg.vector_norm(w)
                    g_norm = torch.linalg.vector_norm(g)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0),
                        group["trust_coefficient"] * w_norm / g_norm,
                        torch.ones_like(w_norm),
                    )
                    scaled_lr = trust * group["lr"]
                state = self.state[w]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(w)
                v = state["momentum_buffer"]
                v.mul_(group["momentum"]).add_(g * scaled_lr)
                w.sub_(v)
        return loss


def build_optimizer(
    name: Literal["lars", "sgd"], model: nn.Module, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """LARS with biases and normalisation parameters excluded from weight decay and adaptation
    (SimCLR's code), or SGD with momentum and weight decay on every parameter (MoCo's code)."""
    weights, others = split_decay_params(model)
    if name == "lars":
        groups = [
            {"params": weights, "weight_decay": weight_decay, "lars": True},
            {"params": others, "weight_decay": 0.0, "lars": False},
        ]
        return LARS(groups, lr=lr, momentum=momentum)
    if name == "sgd":
        return torch.optim.SGD(weights + others, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ConfigError(f"unknown --optimizer {name!r}; choose lars or sgd")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ----------------------------------------------------------------------------------------------
# Run folder, checkpoints and logging
# ----------------------------------------------------------------------------------------------


def to_jsonable(args: Any) -> dict[str, Any]:
    """Convert the dataclass `args` to a dict of plain values, as args.json and checkpoints store it."""
    return json.loads(json.dumps(dataclasses.asdict(args)))


def resolve_output_dir(output_dir: Optional[str], resume: Optional[str], method: str,
                       info: DataInfo, arch: str) -> str:
    """Return the run folder: --output-dir, else the resumed checkpoint's folder, else a new
    runs/<method>-<dataset>-<arch>-<time>, named on rank 0 and shared with the other ranks."""
    if output_dir is None and resume is not None:
        output_dir = os.path.dirname(os.path.abspath(resume))
    if output_dir is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        output_dir = broadcast_object(os.path.join("runs", f"{method}-{info.name}-{arch}-{stamp}"))
    return output_dir


def prepare_output_dir(output_dir: str, resume: Optional[str], overwrite: bool, env: DistEnv,
                       resume_step: Optional[int] = None) -> None:
    """Create the run folder on rank 0, and raise ConfigError on every rank if it is not writable or
    already contains another run's checkpoint."""
    error: Optional[str] = None
    if env.is_main:
        checkpoint = os.path.join(output_dir, "checkpoint.pt")
        resuming_here = resume is not None and os.path.exists(checkpoint) and os.path.samefile(resume, checkpoint)
        if os.path.exists(checkpoint) and not resuming_here and not overwrite:
            error = (f"{output_dir} already contains a checkpoint; pass --resume {checkpoint} to "
                     f"continue that run, --overwrite to replace it, or choose another --output-dir")
        else:
            try:
                os.makedirs(output_dir, exist_ok=True)
                probe = os.path.join(output_dir, f".write-test-{os.getpid()}")
                with open(probe, "w") as f:
                    f.write("ok")
                os.remove(probe)
                _tidy_run_files(output_dir, resume_step if resume is not None else None)
            except OSError as os_error:
                error = f"cannot write to --output-dir {output_dir}: {os_error}"
    error = broadcast_object(error)
    if error is not None:
        raise ConfigError(error)


def _tidy_run_files(output_dir: str, resume_step: Optional[int]) -> None:
    """Start a new run's log and drop an earlier run's scores. On resume, drop the log lines of
    steps after the checkpoint, because the resumed run logs those steps again."""
    metrics = os.path.join(output_dir, "metrics.jsonl")
    if resume_step is None:
        for name in ("metrics.jsonl", "eval.json", "eval_random_init.json", "eval_moco.json",
                     "eval_random_init_moco.json"):
            if os.path.exists(os.path.join(output_dir, name)):
                os.remove(os.path.join(output_dir, name))
    elif os.path.exists(metrics):
        with open(metrics) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        with open(metrics, "w") as f:
            f.writelines(kept)


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename it over `path`.

    A crash while writing leaves the previous file intact, because the rename is atomic on POSIX
    filesystems.
    """
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def capture_rng_state() -> dict[str, Any]:
    """Return this process's Python, NumPy, torch and CUDA random states as weights_only-loadable values."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path: str, *, method: str, args: Any, info: DataInfo, arch: str, cifar_stem: bool,
                    feature_dim: int, step: int, epoch: int, steps_per_epoch: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer, scaler: Optional[torch.amp.GradScaler],
                    env: DistEnv, extra: Optional[dict[str, Any]] = None,
                    encoder: Optional[dict[str, Any]] = None) -> None:
    """Write the run's state to `path` atomically, and the backbone alone to backbone.pt beside it.

    Every rank must call this (the RNG states are gathered); only rank 0 writes. `model` must be the
    raw module, not its DDP or compiled wrapper, so that the keys carry no prefix. The keys of the
    evaluated encoder start with "backbone.". `encoder` adds facts that eval_linear.py needs to
    rebuild that encoder (normalisation, patch grid) to the checkpoint's "backbone" entry.
    """
    rng_states = gather_objects(capture_rng_state())
    if not env.is_main:
        return
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "method": method,
        "args": to_jsonable(args),
        "data": {"dataset": info.name, "data_dir": info.root, "image_size": info.image_size,
                 "mean": list(info.mean), "std": list(info.std)},
        "backbone": {"arch": arch, "cifar_stem": cifar_stem, "feature_dim": feature_dim, **(encoder or {})},
        "step": step,
        "epoch": epoch,
        "steps_per_epoch": steps_per_epoch,
        "world_size": env.world_size,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_states,
    }
    if extra:
        state.update(extra)
    atomic_save(state, path)
    atomic_save(backbone_state_dict(state["model"]), os.path.join(os.path.dirname(path), "backbone.pt"))


def backbone_state_dict(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Select the entries of a method's state dict under "backbone.", with that prefix removed."""
    prefix = "backbone."
    return {key[len(prefix):]: value for key, value in model_state.items() if key.startswith(prefix)}


def load_checkpoint(path: str, method: Optional[str] = None) -> dict[str, Any]:
    """Read a checkpoint of this collection with torch.load(weights_only=True) and validate it.

    Raises ConfigError when the file is missing, unreadable (corrupt, truncated, or a pickle that
    needs arbitrary code), not one of ours, or written by another method than `method`.
    """
    if os.path.isdir(path):
        raise ConfigError(f"checkpoint {path} is a folder; pass the file, such as {os.path.join(path, 'checkpoint.pt')}")
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # The weights-only unpickler reports a malformed file with many exception types (KeyError and
    # IndexError among them), so every failure to read becomes the same clear error.
    except Exception as error:
        message = str(error).strip()
        if message.startswith("Weights only load failed"):
            # Keep torch's diagnosis but not its advice to retry with weights_only=False, which would
            # let the file run code. The diagnosis is the first line after that advice that is not
            # a request to file an issue or a pointer to the documentation.
            lines = [line.strip() for line in message.splitlines()[1:] if line.strip()]
            lines = [line.split("WeightsUnpickler error:", 1)[-1].strip() for line in lines
                     if not line.startswith(("Please file an issue", "Check the documentation"))]
            detail = next((line for line in lines if line), "no detail given")
            reason = f"the weights-only unpickler rejected it: {detail.rstrip('.')}"
        else:
            reason = message.splitlines()[0].rstrip(".") if message else ""
            reason = f"{type(error).__name__}: {reason}" if reason else type(error).__name__
        raise ConfigError(
            f"cannot read checkpoint {path} ({reason}). The file is corrupt or truncated, or is not "
            f"a PyTorch checkpoint of tensors and plain values (files that need arbitrary "
            f"unpickling are rejected)"
        ) from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        hint = ""
        if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
            hint = (" It looks like a plain state dict (for example torchvision weights or a "
                    "backbone.pt); pass the checkpoint.pt of a run instead")
        else:
            hint = (" Pass the checkpoint.pt that simclr.py (or another method script of this "
                    "collection) wrote into its run folder")
        raise ConfigError(f"{path} is not a checkpoint written by this collection.{hint}")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(
            f"{path} has checkpoint version {state.get('version')}, but this code reads version "
            f"{CHECKPOINT_VERSION}"
        )
    if method is not None and state["method"] != method:
        raise ConfigError(
            f"{path} was written by {state['method']}.py, not {method}.py; resume it with "
            f"{state['method']}.py, or start a new run"
        )
    return state


def knn_datasets(info: DataInfo, knn_every: int, env: DistEnv) -> Optional[tuple[Dataset, Dataset]]:
    """Return the (train, test) splits of the kNN monitor with the evaluation transform, or None when
    the monitor is off or the dataset has no evaluation split (which rank 0 reports)."""
    if knn_every > 0 and info.has_eval_split:
        plain_transform = eval_transform(info.image_size, info.mean, info.std)
        return eval_datasets(info, plain_transform, plain_transform)
    if knn_every > 0 and env.is_main:
        print(f"note: {info.root} has no val/ or test/ folder, so the kNN monitor is off")
    return None


def write_args_json(output_dir: str, resolved_args: Any, derived: dict[str, Any]) -> None:
    """Write the run's resolved arguments and the values derived from them to args.json."""
    with open(os.path.join(output_dir, "args.json"), "w") as f:
        json.dump({**to_jsonable(resolved_args), **derived}, f, indent=2)


def restore_training_state(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                           scaler: Optional[torch.amp.GradScaler], env: DistEnv) -> int:
    """Load a checkpoint's model, optimiser, scaler and (for the same number of processes) random
    states into this run; return the step to continue from."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    # NOTE: with loader workers the data order after a resume is exact, but the augmentations are
    # not: the workers restart with fresh random states, so a resumed run crops and jitters
    # differently. With --workers 0 the augmentation uses the restored state and repeats exactly.
    if state["world_size"] == env.world_size:
        restore_rng_state(state["rng"][env.rank])
    elif env.is_main:
        print(f"note: the checkpoint was written by a run of {state['world_size']} process(es) and this "
              f"run has {env.world_size}; data order is kept, augmentation random states start fresh")
    return state["step"]


def check_finite_loss(loss_value: float, step: int, lr: float, last_finite: tuple[Optional[int], Optional[float]],
                      checkpoint_step: Optional[int], output_dir: str) -> None:
    """Raise TrainingError when the logged loss is NaN or infinite, naming the step, the learning
    rate, the last finite loss and the checkpoint that is left on disk."""
    if math.isfinite(loss_value):
        return
    saved = (f"{output_dir}/checkpoint.pt is from step {checkpoint_step}" if checkpoint_step
             else "no checkpoint was written")
    raise TrainingError(
        f"loss is {loss_value} at step {step} (learning rate {lr:.4g}); the last finite "
        f"logged loss was {last_finite[1]} at step {last_finite[0]}, and {saved}. "
        f"Lower --lr, or use --precision fp32 if it was bf16 or fp16"
    )


# Arguments that may differ between a run and its resumption. Any other difference is an error,
# because it would change the schedule, the data order or the model.
RESUMABLE_CHANGES = {
    "resume", "output_dir", "overwrite", "max_steps", "log_every", "knn_every",
    "checkpoint_every", "workers", "compile", "channels_last", "data_dir", "precision", "sync_bn",
    "augment_on_device", "dist_timeout",
}


def check_resume(state: dict[str, Any], resolved_args: Any, steps_per_epoch: Optional[int], path: str) -> None:
    """Raise ConfigError unless this run's resolved arguments and data match the checkpoint's.

    Arguments are compared after their defaults are resolved (image size, colour strength and so
    on), so spelling out a default is no change. The steps per epoch must match too (checked by
    check_resume_steps unless `steps_per_epoch` is None, for a call before the data is loaded).
    A --max-steps below the checkpoint's step is an error too, because the run cannot go back.
    """
    if resolved_args.max_steps is not None and resolved_args.max_steps < state["step"]:
        raise ConfigError(
            f"--max-steps {resolved_args.max_steps} is below step {state['step']} of {path}, so the run "
            f"would have to go back; pass --max-steps {state['step']} or more"
        )
    saved, current = state["args"], to_jsonable(resolved_args)

    def shown(value: Any) -> str:
        return "unset" if value is None else repr(value)

    changed = [
        f"--{key.replace('_', '-')} {shown(saved.get(key))} -> {shown(current[key])}"
        for key in current
        if key not in RESUMABLE_CHANGES and saved.get(key) != current[key]
    ]
    if changed:
        raise ConfigError(
            f"cannot resume {path} with different settings: {'; '.join(changed)}. Repeat the "
            f"original command with --resume, or start a new run"
        )
    if steps_per_epoch is not None:
        check_resume_steps(state, steps_per_epoch, path)


def check_resume_steps(state: dict[str, Any], steps_per_epoch: int, path: str) -> None:
    """Raise ConfigError unless the data gives the checkpoint's steps per epoch, because the step
    counter maps to an epoch and a position in it only for the same number of images."""
    if state["steps_per_epoch"] != steps_per_epoch:
        raise ConfigError(
            f"cannot resume {path}: the training data now gives {steps_per_epoch} steps per epoch, "
            f"but the checkpoint was trained with {state['steps_per_epoch']}; resume with the same "
            f"images, or start a new run"
        )


def log_metrics(record: dict[str, Any], jsonl_path: str) -> None:
    """Print one line of `record` and append it as JSON to `jsonl_path`."""
    parts = []
    for key, value in record.items():
        if isinstance(value, float):
            text = f"{value:.4g}" if key != "lr" else f"{value:.3e}"
        else:
            text = str(value)
        parts.append(f"{key} {text}")
    print(" | ".join(parts), flush=True)
    with open(jsonl_path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------
# Feature extraction and the kNN monitor
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_features(
    encoder: nn.Module, dataset: Dataset, batch_size: int, workers: int, env: DistEnv, precision: str,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every image of `dataset`; return float32 features and labels in dataset order, on every rank.

    Each rank encodes every W-th image (rank r takes r, r+W, ...), then the shards are gathered.
    `encoder` must already be in eval mode.
    """
    indices = list(range(env.rank, len(dataset), env.world_size))
    # A private generator, so that encoding (the kNN monitor during training) does not advance the
    # global random state and a resumed run draws the same numbers as an uninterrupted one.
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                        num_workers=workers, pin_memory=env.device.type == "cuda", generator=torch.Generator(),
                        worker_init_fn=ignore_stop_signals)
    features, labels = [], []
    for images, targets in loader:
        with autocast(env.device, precision):
            out = encoder(images.to(env.device, memory_format=memory_format, non_blocking=True))
        features.append(out.float())
        labels.append(targets.to(env.device))
    if features:
        local_features, local_labels = torch.cat(features), torch.cat(labels)
    else:  # more ranks than images: learn the feature width from one image
        with autocast(env.device, precision):
            width = encoder(dataset[0][0].unsqueeze(0).to(env.device)).shape[1]
        local_features = torch.zeros(0, width, device=env.device)
        local_labels = torch.zeros(0, dtype=torch.long, device=env.device)
    feature_shards = gather_uneven(local_features)
    label_shards = gather_uneven(local_labels)
    width = max(shard.shape[1] for shard in feature_shards)
    out_features = torch.empty(len(dataset), width, device=env.device)
    out_labels = torch.empty(len(dataset), dtype=torch.long, device=env.device)
    for rank, (f, y) in enumerate(zip(feature_shards, label_shards)):
        out_features[rank :: env.world_size] = f
        out_labels[rank :: env.world_size] = y
    return out_features, out_labels


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                num_classes: int, k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Predict labels by weighted k-nearest-neighbour vote (Wu et al. 2018).

    Features are L2-normalised. Each of the k most cosine-similar training images votes for its
    label with weight exp(similarity / temperature), and the class with the largest total wins.
    """
    bank = F.normalize(train_features.float(), dim=1)
    k = min(k, bank.shape[0])
    predictions = []
    for start in range(0, test_features.shape[0], chunk):
        queries = F.normalize(test_features[start : start + chunk].float(), dim=1)
        similarity = queries @ bank.T  # (chunk, N_train)
        top_similarity, top_index = similarity.topk(k, dim=1)
        weights = (top_similarity / temperature).exp()
        votes = torch.zeros(queries.shape[0], num_classes, device=queries.device)
        votes.scatter_add_(1, train_labels[top_index], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)


def knn_top1(train_features, train_labels, test_features, test_labels, num_classes: int,
             k: int = 200, temperature: float = 0.1) -> float:
    """Fraction of test images whose weighted-kNN label is right."""
    predictions = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature)
    return (predictions == test_labels).float().mean().item()


def knn_monitor(backbone: nn.Module, train_set: Dataset, test_set: Dataset, batch_size: int, workers: int,
                env: DistEnv, precision: str, memory_format: torch.memory_format = torch.contiguous_format,
                k: int = 200, temperature: float = 0.1) -> float:
    """Weighted-kNN top-1 of `backbone`'s features (k=200, T=0.1 as in Wu et al. 2018's CIFAR code).

    Every rank takes part. The backbone runs in eval mode, so BatchNorm uses its running
    statistics, and is put back in its previous mode afterwards. Those statistics are first
    copied from rank 0, because without SyncBatchNorm each rank's differ from the checkpoint's
    (rank 0's) since DDP last broadcast them.
    """
    if dist.is_available() and dist.is_initialized():
        for buffer in backbone.buffers():
            dist.broadcast(buffer, src=0)
    was_training = backbone.training
    backbone.eval()
    train_features, train_labels = extract_features(backbone, train_set, batch_size, workers, env, precision,
                                                    memory_format)
    test_features, test_labels = extract_features(backbone, test_set, batch_size, workers, env, precision,
                                                  memory_format)
    backbone.train(was_training)
    return knn_top1(train_features, train_labels, test_features, test_labels, num_classes(train_set), k, temperature)
