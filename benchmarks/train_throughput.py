"""Training throughput of simclr.py against a plain PyTorch loop doing the same forward and backward.

Both run in this one invocation, one after the other, on the same machine:
  * simclr.py itself, as users run it: JPEG images decoded and augmented in data-loader workers,
    LARS, logging, the lot (--knn-every 0 keeps evaluation out of the timing);
  * a plain loop with no data loading at all. It runs the same torchvision ResNet with the CIFAR
    stem, the same projection head and the NT-Xent loss written inline, with torch.optim.SGD, on
    random tensors of the same shape (two views of B images) in the same memory layout.
Throughput is images per second (each image gives two views), counted over the steps after the
first --warmup-steps. The two alternate for --rounds rounds (plain loop, then simclr.py), so that
a slow spell of a shared machine hits both. The reported ratio is the median of the per-round
ratios, printed last in one line of JSON with every round's figures.

Run:
    python benchmarks/train_throughput.py                       # ResNet-18, 32 px, batch 128
    python benchmarks/train_throughput.py --data-dir DATA_DIR   # an ImageFolder of your own
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_synthetic_folder(root: str, classes: int, per_class: int, side: int) -> None:
    """Random-noise JPEGs in class folders at root/train, so that decoding costs what real ones do."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = os.path.join(root, "train", f"class{c}")
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{i:05d}.jpg"), quality=75)


def simclr_throughput(data_dir: str, args: argparse.Namespace, output_dir: str) -> float:
    """Images per second of simclr.py over its log intervals after the warm-up steps."""
    command = [
        sys.executable, "simclr.py", "--dataset", "folder", "--data-dir", data_dir, "--arch", args.arch,
        "--batch-size", str(args.batch_size), "--max-steps", str(args.warmup_steps + args.steps),
        "--log-every", str(args.warmup_steps), "--knn-every", "0", "--output-dir", output_dir,
    ]
    if args.image_size is not None:
        command += ["--image-size", str(args.image_size)]
    if not args.channels_last:
        command.append("--no-channels-last")
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if '"img_per_s"' in line]
    timed = [r for r in records if r["step"] > args.warmup_steps]
    # Each record covers the steps since the previous one; sum images and seconds over them.
    images, seconds, previous_step = 0, 0.0, args.warmup_steps
    for record in timed:
        steps = record["step"] - previous_step
        images += steps * args.batch_size
        seconds += steps * args.batch_size / record["img_per_s"]
        previous_step = record["step"]
    return images / seconds


def build_plain_loop(args: argparse.Namespace):
    """Build the plain loop's model and optimiser; return them with its device and memory layout."""
    torch.manual_seed(0)
    backbone = torchvision.models.get_model(args.arch, weights=None)
    backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    backbone.maxpool = nn.Identity()
    width = backbone.fc.in_features
    backbone.fc = nn.Identity()
    head = nn.Sequential(nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
                         nn.Linear(width, 128, bias=False), nn.BatchNorm1d(128))
    model = nn.Sequential(backbone, head)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    # The same device and precision as simclr.py's defaults: bf16 autocast on CUDA, fp32 on CPU.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device, memory_format=layout).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    return model, optimizer, device, layout


def plain_loop_throughput(args: argparse.Namespace, image_size: int, plain) -> tuple[float, list[float]]:
    """Images per second of a minimal SimCLR step on random tensors, and each timed step's seconds."""
    model, optimizer, device, layout = plain
    n = args.batch_size
    targets = ((torch.arange(2 * n) + n) % (2 * n)).to(device)
    step_seconds = []
    for step in range(args.warmup_steps + args.steps):
        x1 = torch.randn(n, 3, image_size, image_size)
        x2 = torch.randn(n, 3, image_size, image_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        x = torch.cat([x1, x2]).to(device, memory_format=layout)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            z = model(x)
        z = F.normalize(z.float(), dim=1)
        logits = (z @ z.T / 0.5).fill_diagonal_(float("-inf"))
        loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup_steps:
            step_seconds.append(time.perf_counter() - start)
    return args.steps * n / sum(step_seconds), step_seconds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None, help="ImageFolder with DATA_DIR/train/<class>/<image>; default: synthetic 32-px JPEGs in a temporary folder")
    parser.add_argument("--arch", default="resnet18", help="torchvision ResNet (default resnet18)")
    parser.add_argument("--image-size", type=int, default=None, help="crop side in pixels (default: simclr.py's, 32 for the synthetic data)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (default 128)")
    parser.add_argument("--warmup-steps", type=int, default=4, help="untimed steps at the start of each run (default 4)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps of each run, a multiple of --warmup-steps (default 8)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="NCHW layout in both runs instead of channels-last")
    parser.add_argument("--workers", type=int, default=None, help="data-loading processes of simclr.py (default: simclr.py's)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both runs; the ratio is the median over rounds (default 3)")
    parser.add_argument("--min-ratio", type=float, default=None, help="exit with status 1 when simclr.py / plain loop is below this")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.steps % args.warmup_steps != 0:
        parser.error(f"--steps {args.steps} must be a multiple of --warmup-steps {args.warmup_steps}, the log interval")

    image_size = args.image_size or 32
    plain = build_plain_loop(args)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        data_dir = args.data_dir
        if data_dir is None:
            data_dir = os.path.join(tmp, "data")
            images = args.batch_size * (args.warmup_steps + args.steps + 1)
            write_synthetic_folder(data_dir, classes=10, per_class=images // 10 + 1, side=32)
        for r in range(args.rounds):
            plain_rate, step_seconds = plain_loop_throughput(args, image_size, plain)
            print(f"round {r + 1}: plain loop {plain_rate:.2f} images/s (step median "
                  f"{statistics.median(step_seconds):.2f} s)", flush=True)
            simclr_rate = simclr_throughput(data_dir, args, os.path.join(tmp, f"run{r}"))
            print(f"round {r + 1}: simclr.py {simclr_rate:.2f} images/s, ratio {simclr_rate / plain_rate:.3f}", flush=True)
            rounds.append({"plain_img_per_s": round(plain_rate, 3), "simclr_img_per_s": round(simclr_rate, 3),
                           "ratio": round(simclr_rate / plain_rate, 4)})

    ratio = statistics.median(r["ratio"] for r in rounds)
    simclr = statistics.median(r["simclr_img_per_s"] for r in rounds)
    plain_median = statistics.median(r["plain_img_per_s"] for r in rounds)
    print()
    print(f"{'run (median over rounds)':<34}{'images/s':>10}")
    print(f"{'simclr.py (data loading included)':<34}{simclr:>10.2f}")
    print(f"{'plain loop (random tensors)':<34}{plain_median:>10.2f}")
    print(f"ratio {ratio:.3f} (median of {len(rounds)} rounds); "
          f"{args.arch}, {image_size} px, batch {args.batch_size}, "
          f"{'channels-last' if args.channels_last else 'NCHW'}, {torch.get_num_threads()} threads")
    result = {
        "simclr_img_per_s": simclr, "plain_img_per_s": plain_median, "ratio": ratio, "rounds": rounds,
        "arch": args.arch, "image_size": image_size, "batch_size": args.batch_size, "steps": args.steps,
        "channels_last": args.channels_last, "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu", "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__, "torchvision": torchvision.__version__,
    }
    print(json.dumps(result), flush=True)
    if args.min_ratio is not None and ratio < args.min_ratio:
        sys.exit(f"error: simclr.py reaches {ratio:.3f} of the plain loop's throughput, below --min-ratio {args.min_ratio}")


if __name__ == "__main__":
    main()
