"""Two-view augmentation throughput: torchvision per image in data-loader workers against the
batched `common.augment_batch`, on the CPU and on CUDA when present.

The three contestants make two views of uint8 images with the same recipe, (a) and (b) of the same
images:

    (a) torchvision   the method scripts' per-image transform (PIL), in W data-loader workers
    (b) batched cpu   common.augment_batch on batches held in memory, with W torch threads
    (c) batched cuda  common.augment_batch on the GPU, on --cuda-images random images of the same
                      size held there, in batches of --cuda-batch-size (only with CUDA)

W is --cores, the number of CPU cores that (a) and (b) may use. The images are random pixels in
the layout of torchvision's CIFAR-10 dataset: an array of H x W x 3 uint8 images, which
__getitem__ turns into PIL images. The cost of the augmentation does not depend on the content.
Each contestant runs --repeats times over --images images after one warm-up pass, and the table
gives the median. The last line of the output is one line of JSON with
speedup_cpu ((b) over (a)) and, with CUDA, speedup_cuda ((c) over (a)).

Run:
    python benchmarks/augment.py                            # SimCLR's CIFAR recipe, 32 px, all cores
    python benchmarks/augment.py --recipe moco-v2 --image-size 96 --cores 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

MEAN, STD = common.NORMALIZATION["cifar10"]
RECIPES = ("simclr", "moco-v1", "moco-v2")


def build_recipe(name: str, image_size: int) -> tuple[object, common.AugmentRecipe]:
    """Return the per-image torchvision transform of one view and the matching batched recipe, as
    the method scripts choose them for `image_size` (blur only above 64 px)."""
    blur = image_size > common.SMALL_IMAGE_MAX_SIDE
    if name == "simclr":
        strength = 0.5 if not blur else 1.0
        return (common.simclr_augmentation(image_size, MEAN, STD, strength, blur),
                common.simclr_recipe(image_size, MEAN, STD, strength, blur))
    aug_plus = name == "moco-v2"
    return (common.moco_augmentation(image_size, MEAN, STD, aug_plus, blur),
            common.moco_recipe(image_size, MEAN, STD, aug_plus, blur))


class ArrayImages(Dataset):
    """uint8 images (count, H, W, 3) served as two augmented views, as torchvision's CIFAR-10 serves them."""

    def __init__(self, images: np.ndarray, transform):
        self.images, self.views = images, common.TwoViews(transform)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.views(Image.fromarray(self.images[index]))


def time_torchvision(images: np.ndarray, transform, batch: int, cores: int, repeats: int) -> list[float]:
    """Time passes of a data loader with `cores` workers over `images`; return images per second per pass."""
    loader = DataLoader(ArrayImages(images, transform), batch_size=batch, shuffle=True, num_workers=cores,
                        drop_last=True, persistent_workers=True, prefetch_factor=4)
    rates = []
    for repeat in range(repeats + 1):  # the first pass starts the workers and is not counted
        start = time.perf_counter()
        count = 0
        for x1, _ in loader:
            count += x1.shape[0]
        if repeat > 0:
            rates.append(count / (time.perf_counter() - start))
    return rates


def time_batched(images: torch.Tensor, recipe: common.AugmentRecipe, batch: int, repeats: int) -> list[float]:
    """Time passes of augment_batch over `images` (count, 3, H, W) on their device.

    Each image gets two views, as the training scripts draw them. Returns images per second per pass.
    """
    device = images.device
    rates = []
    for repeat in range(repeats + 1):  # the first pass warms up allocators and kernels
        order = torch.randperm(len(images), device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        count = 0
        for first in range(0, len(images) - batch + 1, batch):
            x = images[order[first:first + batch]]
            x1, x2 = common.augment_batch(x.repeat(2, 1, 1, 1), recipe).chunk(2)
            count += x1.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        if repeat > 0:
            rates.append(count / (time.perf_counter() - start))
    return rates


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=RECIPES, default="simclr",
                        help="augmentation of one view, as the method scripts build it (default: simclr)")
    parser.add_argument("--image-size", type=int, default=32, help="side of the images and of the views in pixels")
    parser.add_argument("--images", type=int, default=8192, help="images per timed pass")
    parser.add_argument("--batch-size", type=int, default=512, help="images per batch (each gets two views)")
    parser.add_argument("--cuda-batch-size", type=int, default=4096, help="images per batch on CUDA")
    parser.add_argument("--cuda-images", type=int, default=262144, help="images per timed pass on CUDA")
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)),
                        help="CPU cores for (a) and (b): data-loader workers and torch threads (default: all)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per contestant; the median is reported")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random images and of the augmentation")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    for flag in ("image_size", "images", "batch_size", "cuda_batch_size", "cuda_images", "cores", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.images < args.batch_size:
        parser.error(f"--images {args.images} must hold at least one batch of --batch-size {args.batch_size}")
    available = len(os.sched_getaffinity(0))
    if args.cores > available:
        parser.error(f"--cores {args.cores} is more than the {available} cores this process may use")

    torch.manual_seed(args.seed)
    transform, recipe = build_recipe(args.recipe, args.image_size)
    rng = np.random.default_rng(args.seed)
    images = rng.integers(0, 256, (args.images, args.image_size, args.image_size, 3), dtype=np.uint8)

    print(f"two-view {args.recipe} augmentation of {args.image_size}-pixel images | {args.cores} CPU cores | "
          f"torch {torch.__version__}, torchvision {__import__('torchvision').__version__} | "
          f"{platform.processor() or platform.machine()}", flush=True)
    results = {}
    rates = time_torchvision(images, transform, args.batch_size, args.cores, args.repeats)
    results["torchvision"] = {"device": "cpu", "cores": args.cores, "batch": args.batch_size,
                              "images_per_s": statistics.median(rates), "passes": rates}

    torch.set_num_threads(args.cores)
    cpu_images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    rates = time_batched(cpu_images, recipe, args.batch_size, args.repeats)
    results["batched_cpu"] = {"device": "cpu", "cores": args.cores, "batch": args.batch_size,
                              "images_per_s": statistics.median(rates), "passes": rates}

    if torch.cuda.is_available():
        count = args.cuda_images
        gpu_images = torch.randint(0, 256, (count, 3, args.image_size, args.image_size), dtype=torch.uint8,
                                   device="cuda")
        rates = time_batched(gpu_images, recipe, args.cuda_batch_size, args.repeats)
        results["batched_cuda"] = {"device": torch.cuda.get_device_name(), "batch": args.cuda_batch_size,
                                   "images_per_s": statistics.median(rates), "passes": rates}

    baseline = results["torchvision"]["images_per_s"]
    print(f"\n| contestant | device | batch | two-view images/s (median of {args.repeats}) | speedup |")
    print("|---|---|---|---|---|")
    for name, result in results.items():
        print(f"| {name} | {result['device']} | {result['batch']} | {result['images_per_s']:,.0f} | "
              f"{result['images_per_s'] / baseline:.1f}x |")
    summary = {
        "recipe": args.recipe, "image_size": args.image_size, "cores": args.cores, "repeats": args.repeats,
        "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
        "results": results,
        "speedup_cpu": results["batched_cpu"]["images_per_s"] / baseline,
    }
    if "batched_cuda" in results:
        summary["speedup_cuda"] = results["batched_cuda"]["images_per_s"] / baseline
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
