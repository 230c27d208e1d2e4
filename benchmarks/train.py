"""End-to-end training throughput and peak memory of every method script, one configuration at a time.

For each method (simclr, moco, dcl, infonce_cpc) and each configuration of --configs, this script
runs the method script itself as a subprocess, with these flags:

    METHOD.py --dataset folder --data-dir DATA --arch ARCH --image-size S --batch-size B \\
        --max-steps STEPS --log-every L --knn-every 0 --checkpoint-every 1000000 \\
        --output-dir RUN --overwrite [configuration flags] [--method-args]

so the figures include everything a user's run does per step: data loading (decoding and
augmentation in loader workers, or batched augmentation on the device), the optimiser and logging.
The kNN monitor is off. The checkpoint that every run writes after its last step is outside the
timed intervals.

Throughput is read from the run's metrics.jsonl. Each logged line gives img_per_s, the global
batch times the steps since the last log line, divided by their wall time. On CUDA, that time
ends after a synchronising .item(). The first --warmup-intervals intervals are dropped, because
they include loader start-up, the first CUDA calls and torch.compile. The reported rate is the median
of the rest. An image is one source image of the global batch. SimCLR, MoCo and DCL encode two
views of it, CPC one grid of patches, so rates compare configurations of one method, not methods.
The epoch time is --epoch-images divided by that rate, which leaves out the per-epoch work
(loader restart, checkpoint, kNN monitor).

Peak memory comes from a small launcher: each run executes as this script with `--_child
MEMORY_JSON` followed by the method script and its flags. The launcher runs the method script with
runpy, as Python would run it directly, and then records the memory. On CUDA it records torch.cuda.max_memory_allocated, the peak of
the tensors that PyTorch's caching allocator handed out, including the dataset that
--augment-on-device holds on the GPU. The memory the allocator reserved and the CUDA context are
not in it. On the CPU it records the peak resident set size (getrusage ru_maxrss) of the training
process, which counts the Python interpreter and the loaded libraries but not the loader workers.

A configuration is "baseline" or a name made of these parts joined with "+". Each part turns on
one flag, and the baseline passes the flag in brackets instead:
    device-aug   --augment-on-device (baseline: --no-augment-on-device, views made in loader workers)
    bf16         --precision bf16    (baseline: --precision fp32)
    cl           --channels-last     (baseline: --no-channels-last)
    compile      --compile           (baseline: --no-compile)
Every run passes all four settings, so the scripts' defaults, which depend on CUDA, do not matter.

Without --data-dir, the script writes a synthetic `folder` dataset of random-noise JPEGs of the
requested size into the work folder: 2 classes, enough training images for one epoch longer than
--steps, and 4 test images per class. Its images are no larger than the crops, so decoding costs
less than for full-size photographs. Pass --data-dir for loader-bound figures on real images.
MoCo runs get --queue-size K, the smallest multiple of the keys enqueued per step that is at least
4096 (the queue of the MoCo authors' CIFAR-10 recipe), unless --method-args sets one.

Run (CPU, about a minute on 2 cores):
    OMP_NUM_THREADS=1 python benchmarks/train.py --methods simclr,infonce_cpc --batch-size 16 \\
        --steps 6 --log-every 2 --configs baseline,device-aug
Run (one GPU: SimCLR ResNet-18 on CIFAR-sized images at batch 512, from the baseline to
on-device augmentation with bf16, channels-last and torch.compile):
    python benchmarks/train.py --methods simclr --arch resnet18 --image-size 32 --batch-size 512 \\
        --configs baseline,device-aug+bf16+cl+compile --json simclr-gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("simclr", "moco", "dcl", "infonce_cpc")
# Each configuration part: (flags when it is in the name, flags when it is not).
CONFIG_PARTS = {
    "device-aug": (["--augment-on-device"], ["--no-augment-on-device"]),
    "bf16": (["--precision", "bf16"], ["--precision", "fp32"]),
    "cl": (["--channels-last"], ["--no-channels-last"]),
    "compile": (["--compile"], ["--no-compile"]),
}
DEFAULT_CONFIGS = "baseline,device-aug,device-aug+bf16,device-aug+bf16+cl,device-aug+bf16+cl+compile"
MOCO_MIN_QUEUE = 4096
SYNTHETIC_CLASSES = 2
SYNTHETIC_TEST_PER_CLASS = 4
OUTPUT_TAIL_LINES = 40
MIB = 2**20


# ----------------------------------------------------------------------------------------------
# Launcher of one run: the method script in this process, then its peak memory
# ----------------------------------------------------------------------------------------------


def run_method_and_record_memory(memory_path: str, script: str, script_args: list[str]) -> None:
    """Run `script` as `python script script_args...` would, then write its peak memory to
    `memory_path` as JSON, even when the script exits with an error."""
    import runpy

    import torch

    sys.argv = [script, *script_args]
    sys.path.insert(0, ROOT)  # the method scripts import common.py from the repository root
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        rusage = resource.getrusage(resource.RUSAGE_SELF)
        # ru_maxrss is in KiB on Linux and in bytes on macOS.
        peak_rss = rusage.ru_maxrss if sys.platform == "darwin" else rusage.ru_maxrss * 1024
        memory = {"cpu_peak_rss_mib": round(peak_rss / MIB, 1), "threads": torch.get_num_threads()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            memory["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / MIB, 1)
            memory["cuda_max_reserved_mib"] = round(torch.cuda.max_memory_reserved() / MIB, 1)
            memory["gpu"] = torch.cuda.get_device_name()
        with open(memory_path, "w") as f:
            json.dump(memory, f)


# ----------------------------------------------------------------------------------------------
# Data, configurations and commands
# ----------------------------------------------------------------------------------------------


def write_synthetic_folder(root: str, train_per_class: int, side: int) -> None:
    """Write random-noise JPEGs of side x side pixels in class folders at root/train and root/test.

    A file named `complete` marks a finished folder, which later calls with the same root reuse.
    """
    from PIL import Image

    marker = os.path.join(root, "complete")
    if os.path.exists(marker):
        return
    rng = np.random.default_rng(0)
    for split, per_class in (("train", train_per_class), ("test", SYNTHETIC_TEST_PER_CLASS)):
        for class_index in range(SYNTHETIC_CLASSES):
            folder = os.path.join(root, split, f"class{class_index}")
            os.makedirs(folder, exist_ok=True)
            for image_index in range(per_class):
                pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{image_index:06d}.jpg"), quality=75)
    with open(marker, "w") as f:
        f.write(f"{train_per_class} training images per class, {side} px\n")


def parse_configs(text: str) -> list[str]:
    """Split --configs into names, raising ValueError for an unknown or repeated part."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("--configs is empty")
    for name in names:
        if name == "baseline":
            continue
        parts = name.split("+")
        unknown = [part for part in parts if part not in CONFIG_PARTS]
        if unknown or len(set(parts)) != len(parts):
            raise ValueError(f"--configs entry {name!r} must be 'baseline' or parts from "
                             f"{', '.join(CONFIG_PARTS)} joined with '+', each once")
    return names


def config_flags(name: str) -> list[str]:
    """Return the method-script flags of configuration `name`, all four settings spelled out."""
    parts = set() if name == "baseline" else set(name.split("+"))
    flags = []
    for part, (on, off) in CONFIG_PARTS.items():
        flags += on if part in parts else off
    return flags


def moco_queue_flags(batch_size: int, method_args: list[str]) -> list[str]:
    """Return --queue-size K for moco.py, the smallest multiple of the keys enqueued per step that is
    at least MOCO_MIN_QUEUE, or nothing when `method_args` sets the queue size."""
    if any(arg == "--queue-size" or arg.startswith("--queue-size=") for arg in method_args):
        return []
    keys_per_step = batch_size * (2 if "--symmetric" in method_args else 1)
    queue_size = -(-MOCO_MIN_QUEUE // keys_per_step) * keys_per_step
    return ["--queue-size", str(queue_size)]


def method_command(method: str, config: str, args: argparse.Namespace, data_dir: str, output_dir: str,
                   method_args: list[str]) -> list[str]:
    """Build the argument list of one run of `method`.py, without the interpreter."""
    command = [
        f"{method}.py", "--dataset", args.dataset, "--data-dir", data_dir, "--arch", args.arch,
        "--batch-size", str(args.batch_size), "--max-steps", str(args.steps),
        "--log-every", str(args.log_every), "--knn-every", "0",
        # No checkpoint at an epoch end within the run. The one after the last step is outside the timing.
        "--checkpoint-every", "1000000", "--output-dir", output_dir, "--overwrite",
    ]
    if args.image_size is not None:
        command += ["--image-size", str(args.image_size)]
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    if method == "moco":
        command += moco_queue_flags(args.batch_size, method_args)
    return command + config_flags(config) + method_args


# ----------------------------------------------------------------------------------------------
# One run: launch, read the log, summarise
# ----------------------------------------------------------------------------------------------


def launch(command: list[str], log_path: str, env: dict[str, str], timeout: float | None) -> tuple[int, list[str], float]:
    """Run `command` in the repository root and tee its output to stdout and `log_path`. Return
    (exit status, output lines, seconds). After `timeout` seconds, kill its process group."""
    start = time.perf_counter()
    lines = []
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
        timed_out = threading.Event()

        def kill_run() -> None:
            timed_out.set()
            os.killpg(process.pid, signal.SIGKILL)  # the run and its loader workers

        timer = threading.Timer(timeout, kill_run) if timeout is not None else None
        if timer is not None:
            timer.start()
        for line in process.stdout:
            print(line, end="", flush=True)
            log.write(line)
            lines.append(line)
        status = process.wait()
        if timer is not None:
            timer.cancel()
    if timed_out.is_set():
        lines.append(f"benchmarks/train.py: killed the run after --timeout {timeout} s\n")
    return status, lines, time.perf_counter() - start


def read_intervals(metrics_path: str) -> list[dict]:
    """Return the throughput records of metrics.jsonl (lines with img_per_s), in the order logged."""
    if not os.path.exists(metrics_path):
        return []
    with open(metrics_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [record for record in records if "img_per_s" in record]


def run_one(method: str, config: str, args: argparse.Namespace, data_dir: str, work_dir: str,
            method_args: list[str], env: dict[str, str]) -> dict:
    """Run one method in one configuration and return its result record."""
    name = f"{method}-{config}"
    output_dir = os.path.join(work_dir, "runs", name)
    log_path = os.path.join(work_dir, "runs", f"{name}.log")
    memory_path = os.path.join(work_dir, "runs", f"{name}.memory.json")
    # Start clean, so that a run that fails early cannot leave an earlier run's figures behind.
    shutil.rmtree(output_dir, ignore_errors=True)
    if os.path.exists(memory_path):
        os.remove(memory_path)

    script_args = method_command(method, config, args, data_dir, output_dir, method_args)
    command_line = shlex.join(["python", *script_args])
    print(f"\n[{name}] $ {command_line}", flush=True)
    launcher = [sys.executable, os.path.abspath(__file__), "--_child", memory_path, *script_args]
    status, lines, seconds = launch(launcher, log_path, env, args.timeout)

    result = {"method": method, "config": config, "command": command_line, "wall_s": round(seconds, 1), "log": log_path}
    problem = None
    intervals = read_intervals(os.path.join(output_dir, "metrics.jsonl"))
    timed = intervals[args.warmup_intervals:]
    if status != 0:
        problem = f"exit status {status}"
    elif not timed:
        problem = (f"the run logged {len(intervals)} throughput interval(s), none after the "
                   f"{args.warmup_intervals} warm-up interval(s)")
    if problem is not None:
        result.update(status="failed", error=problem, output_tail="".join(lines[-OUTPUT_TAIL_LINES:]))
        return result

    rate = statistics.median(record["img_per_s"] for record in timed)
    with open(os.path.join(output_dir, "args.json")) as f:
        run_args = json.load(f)
    memory = {}
    if os.path.exists(memory_path):
        with open(memory_path) as f:
            memory = json.load(f)
    result.update(
        status="ok", img_per_s=round(rate, 3), epoch_s=round(args.epoch_images / rate, 1),
        img_per_s_intervals=[round(record["img_per_s"], 3) for record in intervals],
        interval_end_steps=[record["step"] for record in intervals],
        timed_intervals=len(timed), device=run_args.get("device"), precision=run_args.get("precision"),
        workers=run_args.get("workers"), image_size=run_args.get("image_size"),
        steps_per_epoch=run_args.get("steps_per_epoch"), memory=memory,
    )
    if "cuda_max_allocated_mib" in memory:
        result.update(peak_memory_mib=memory["cuda_max_allocated_mib"], peak_memory_kind="cuda_max_allocated")
    elif "cpu_peak_rss_mib" in memory:
        result.update(peak_memory_mib=memory["cpu_peak_rss_mib"], peak_memory_kind="cpu_peak_rss")
    return result


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """Return the CPU's model name from /proc/cpuinfo, or what the platform module reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> dict:
    import torch
    import torchvision

    machine = {
        "platform": platform.platform(), "cpu": cpu_model(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "gpu": None, "cuda": torch.version.cuda,
    }
    # Queried after the runs, so that this process creates no CUDA context while they train.
    if torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name(0)
    return machine


MEMORY_LABELS = {"cuda_max_allocated": "CUDA max allocated", "cpu_peak_rss": "CPU peak RSS"}


def print_table(results: list[dict], epoch_images: int, machine: dict) -> None:
    epoch_header = f"s per {epoch_images:,} img"
    print()
    print(f"{'method':<12}{'config':<28}{'img/s':>10}{epoch_header:>18}{'peak MiB':>10}  {'memory kind':<20}{'device':<8}")
    for result in results:
        head = f"{result['method']:<12}{result['config']:<28}"
        if result["status"] != "ok":
            print(f"{head}{'failed':>10}")
            continue
        memory = f"{result['peak_memory_mib']:.0f}" if "peak_memory_mib" in result else "n/a"
        kind = MEMORY_LABELS.get(result.get("peak_memory_kind"), "not recorded")
        print(f"{head}{result['img_per_s']:>10.1f}{result['epoch_s']:>18.1f}{memory:>10}  {kind:<20}{result['device']:<8}")
    for result in results:
        if "note" in result:
            print(f"note: {result['method']} {result['config']}: {result['note']}")
    print(f"torch {machine['torch']}, torchvision {machine['torchvision']}, python {machine['python']}; "
          f"CPU {machine['cpu']} ({machine['cpus']} available), GPU {machine['gpu'] or 'none'}")
    print("img/s: median over the logged intervals after the warm-up. CUDA max allocated: "
          "torch.cuda.max_memory_allocated. CPU peak RSS: ru_maxrss of the training process, loader "
          "workers excluded")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated method scripts to run (default {','.join(METHODS)})")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated configurations: 'baseline' or parts from "
                        f"{', '.join(CONFIG_PARTS)} joined with '+' (default {DEFAULT_CONFIGS})")
    parser.add_argument("--arch", default="resnet18", help="backbone of every method (default resnet18)")
    parser.add_argument("--image-size", type=int, default=None, help="side of the training crops in pixels (default: 32 for the "
                        "synthetic data, otherwise the method script's default for the dataset)")
    parser.add_argument("--batch-size", type=int, default=512, help="global batch size in images (default 512)")
    parser.add_argument("--steps", type=int, default=30, help="optimiser steps of each run, a multiple of --log-every (default 30)")
    parser.add_argument("--log-every", type=int, default=5, help="steps per timed interval (default 5)")
    parser.add_argument("--warmup-intervals", type=int, default=1, help="leading intervals left out of the median (default 1)")
    parser.add_argument("--epoch-images", type=int, default=50000, help="images per epoch of the epoch-time column (default 50000, CIFAR-10)")
    parser.add_argument("--dataset", choices=("folder", "cifar10", "cifar100", "stl10"), default="folder",
                        help="--dataset of the method scripts (default folder). The others need --data-dir")
    parser.add_argument("--data-dir", default=None, help="--data-dir of the method scripts (default: synthetic JPEGs in the work folder)")
    parser.add_argument("--workers", type=int, default=None, help="data-loading processes of each run (default: the method script's)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run, which sets torch's CPU threads (default: inherited)")
    parser.add_argument("--method-args", default="", help="further flags for every method script, as one quoted string. Write a single "
                        "flag with an equals sign, as in --method-args=--cos, because argparse reads a lone value that "
                        "starts with -- as an option")
    parser.add_argument("--work-dir", default=None, help="folder for the synthetic data, run folders and logs, kept afterwards "
                        "(default: a temporary folder, removed at the end)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds after which a run is killed and reported as failed (default: none)")
    parser.add_argument("--json", default=None, help="also write the JSON report to this file")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()

    methods = [method.strip() for method in args.methods.split(",") if method.strip()]
    unknown = [method for method in methods if method not in METHODS]
    if unknown or not methods:
        parser.error(f"--methods {args.methods!r} must name one or more of {', '.join(METHODS)}")
    try:
        configs = parse_configs(args.configs)
    except ValueError as error:
        parser.error(str(error))
    for flag in ("batch_size", "steps", "log_every", "epoch_images"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be positive")
    if args.warmup_intervals < 0:
        parser.error(f"--warmup-intervals {args.warmup_intervals} must not be negative")
    if args.steps % args.log_every != 0:
        parser.error(f"--steps {args.steps} must be a multiple of --log-every {args.log_every}, so that every "
                     f"interval has the same number of steps")
    if args.steps // args.log_every <= args.warmup_intervals:
        parser.error(f"--steps {args.steps} gives {args.steps // args.log_every} interval(s) of --log-every "
                     f"{args.log_every} steps, none left after --warmup-intervals {args.warmup_intervals}. "
                     f"Raise --steps")
    if args.image_size is not None and args.image_size < 8:
        parser.error(f"--image-size {args.image_size} is too small; the method scripts need at least 8 pixels")
    if args.dataset != "folder" and args.data_dir is None:
        parser.error(f"--dataset {args.dataset} needs --data-dir, the folder that contains it (torchvision's root for that dataset)")
    method_args = shlex.split(args.method_args)

    env = dict(os.environ)
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    temporary = None
    work_dir = args.work_dir
    if work_dir is None:
        temporary = tempfile.TemporaryDirectory(prefix="train-benchmark-")
        work_dir = temporary.name
    os.makedirs(os.path.join(work_dir, "runs"), exist_ok=True)

    data_dir = args.data_dir
    if data_dir is None:
        if args.image_size is None:
            args.image_size = 32
        # One epoch longer than the run, so no interval includes a loader restart at an epoch end.
        train_images = args.batch_size * (args.steps + 1)
        per_class = -(-train_images // SYNTHETIC_CLASSES)
        data_dir = os.path.join(work_dir, f"synthetic-{args.image_size}px-{per_class}")
        print(f"writing {per_class * SYNTHETIC_CLASSES} synthetic training images of {args.image_size} px to {data_dir}", flush=True)
        write_synthetic_folder(data_dir, per_class, args.image_size)

    results = []
    for method in methods:
        for config in configs:
            result = run_one(method, config, args, data_dir, work_dir, method_args, env)
            steps_per_epoch = result.get("steps_per_epoch")
            if steps_per_epoch is not None and steps_per_epoch < args.steps:
                result["note"] = (f"an epoch has {steps_per_epoch} steps, so some intervals include the "
                                  f"loader restart at an epoch end")
            results.append(result)

    machine = describe_machine()
    report = {
        "machine": machine,
        "command": shlex.join(["python", *sys.argv]),
        "settings": {
            "arch": args.arch, "image_size": args.image_size, "batch_size": args.batch_size, "steps": args.steps,
            "log_every": args.log_every, "warmup_intervals": args.warmup_intervals,
            "epoch_images": args.epoch_images, "dataset": args.dataset,
            "data_dir": args.data_dir if args.data_dir is not None else "synthetic", "workers": args.workers,
            "omp_num_threads": env.get("OMP_NUM_THREADS"), "method_args": args.method_args,
        },
        "runs": results,
    }
    print_table(results, args.epoch_images, machine)
    failures = [result for result in results if result["status"] != "ok"]
    for result in failures:
        print(f"\nerror: {result['method']} in configuration {result['config']} failed ({result['error']})", file=sys.stderr)
        print(f"command: {result['command']}", file=sys.stderr)
        print(f"last lines of its output:\n{result['output_tail']}", end="", file=sys.stderr, flush=True)
    if temporary is not None:
        for result in results:
            result.pop("log")  # the file is removed with the temporary folder
        temporary.cleanup()
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report), flush=True)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    # The launcher of one run: python benchmarks/train.py --_child MEMORY_JSON METHOD.py ARGS...
    if len(sys.argv) >= 4 and sys.argv[1] == "--_child":
        run_method_and_record_memory(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        main()
