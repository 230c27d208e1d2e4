"""Pretrain a method on CIFAR-10 JPEGs, then score it and a random backbone with eval_linear.py.

Builds a `folder` dataset of the first --train-per-class training and --test-per-class test images
of each class from a CIFAR-10 copy in class folders (SRC/train/<class>/*.jpg, SRC/test/...), runs

    python METHOD.py --dataset folder --data-dir SUBSET --arch resnet18 --batch-size 128 --max-steps 170
    python eval_linear.py --checkpoint RUN/checkpoint.pt
    python eval_linear.py --checkpoint RUN/checkpoint.pt --random-init

and prints the kNN and linear-probe figures of both at the final step, the wall times, the machine
and the software, ending with one line of JSON. With --min-knn and --min-knn-gain it exits with
status 1 when the pretrained kNN top-1 falls below the bound or beats the random backbone by less
than the gain.

The defaults are the CPU budget of the records in benchmarks/README.md: 1,000 training and 200
test images per class, 170 steps of batch 128. --max-steps 0 trains the method's whole schedule,
and 5,000 and 1,000 images per class are all of CIFAR-10. --method picks the script (simclr, moco,
dcl or infonce_cpc), and --method-args adds flags to its command.

Run (about 40 minutes for SimCLR on a 2-core CPU):
    python benchmarks/reproduce.py --method simclr --cifar10-dir CIFAR10_JPEG_DIR --work-dir WORK_DIR
    python benchmarks/reproduce.py --method moco --cifar10-dir CIFAR10_JPEG_DIR --work-dir WORK_DIR \
        --method-args "--queue-size 4096 --momentum 0.99 --temperature 0.1 --weight-decay 5e-4 --cos --aug-plus"
The full-length run of SimCLR's defaults on all of CIFAR-10 (a GPU run):
    python benchmarks/reproduce.py --method simclr --cifar10-dir CIFAR10_JPEG_DIR --work-dir WORK_DIR \
        --train-per-class 5000 --test-per-class 1000 --batch-size 512 --max-steps 0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Flags that this script sets on the method's command and reports in its summary, so that
# --method-args must not set them again.
OWN_FLAGS = ("--dataset", "--data-dir", "--arch", "--batch-size", "--max-steps", "--output-dir")


def link_or_copy(src: str, dst: str) -> None:
    if os.path.exists(dst):  # left by an earlier, interrupted run in the same --work-dir
        return
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copyfile(src, dst)


def git_commit() -> Optional[str]:
    """Return the repository's commit, with "+changes" when tracked files differ from it, or None."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+changes" if changed else "")


def build_subset(source: str, target: str, per_class: dict[str, int]) -> dict[str, int]:
    """Take the first images (by file name) of every class of each split; return the counts."""
    if not os.path.isdir(source):
        sys.exit(f"error: --cifar10-dir {source} not found; give the folder that holds CIFAR-10's train/ and test/ "
                 f"class folders")
    for split in per_class:
        if not os.path.isdir(os.path.join(source, split)):
            sys.exit(f"error: {os.path.join(source, split)} not found; --cifar10-dir must contain train/ and test/ "
                     f"class folders")
    counts = {}
    for split, limit in per_class.items():
        split_dir = os.path.join(source, split)
        counts[split] = 0
        for class_name in sorted(os.listdir(split_dir)):
            class_dir = os.path.join(split_dir, class_name)
            if not os.path.isdir(class_dir):
                continue
            os.makedirs(os.path.join(target, split, class_name), exist_ok=True)
            for filename in sorted(os.listdir(class_dir))[:limit]:
                link_or_copy(os.path.join(class_dir, filename), os.path.join(target, split, class_name, filename))
                counts[split] += 1
    return counts


def run(command: list[str], log_path: str) -> tuple[float, str]:
    """Run `command` in the repository root, teeing its output to `log_path`; return (seconds, output)."""
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in process.stdout:
            print(line, end="", flush=True)
            log.write(line)
            lines.append(line)
        status = process.wait()
    seconds = time.perf_counter() - start
    if status != 0:
        sys.exit(f"error: the command above failed with exit status {status}; its output is in {log_path}")
    return seconds, "".join(lines)


def last_json_line(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give 0 or more")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive; give 1 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cifar10-dir", required=True, help="CIFAR-10 as class folders: DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg")
    parser.add_argument("--work-dir", required=True, help="folder for the subset and the run (created; must not hold a run already)")
    parser.add_argument("--train-per-class", type=positive_int, default=1000, help="training images per class (default 1000; 5000 is all of CIFAR-10)")
    parser.add_argument("--test-per-class", type=positive_int, default=200, help="test images per class (default 200; 1000 is all of CIFAR-10)")
    parser.add_argument("--max-steps", type=non_negative_int, default=170, help="optimiser steps of pretraining (default 170); 0 trains the method's whole schedule")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="global batch size of pretraining (default 128)")
    parser.add_argument("--arch", default="resnet18", help="backbone (default resnet18)")
    parser.add_argument("--method", choices=("simclr", "moco", "dcl", "infonce_cpc"), default="simclr", help="method script to pretrain with (default simclr)")
    parser.add_argument("--method-args", default="", help="further flags of the method script, one quoted string (for example \"--epochs 3 --warmup-epochs 0.1\"); "
                             "write a single flag with an equals sign, as in --method-args=--weighted, because argparse "
                             "reads a lone value that starts with -- as an option")
    parser.add_argument("--nproc-per-node", type=positive_int, default=1, help="processes (GPUs) of pretraining and evaluation; more than 1 runs both under torchrun --standalone")
    parser.add_argument("--min-knn", type=float, default=None, help="fail when the pretrained kNN top-1 is below this fraction")
    parser.add_argument("--min-knn-gain", type=float, default=None, help="fail when the pretrained kNN top-1 beats the random backbone by less than this")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    for token in shlex.split(args.method_args):
        if token.split("=", 1)[0] in OWN_FLAGS:
            parser.error(f"--method-args sets {token.split('=', 1)[0]}, which this script sets itself; use its own "
                         f"flag of that name (--dataset, --data-dir and --output-dir are fixed)")
    # The method scripts run in the repository root, so relative paths must not depend on it.
    args.cifar10_dir, args.work_dir = os.path.abspath(args.cifar10_dir), os.path.abspath(args.work_dir)
    commit = git_commit()  # before the runs, which read the files as they are now

    data_dir = os.path.join(args.work_dir, "data")
    run_dir = os.path.join(args.work_dir, "run")
    if os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
        sys.exit(f"error: {run_dir} already holds a run; choose another --work-dir")
    counts = build_subset(args.cifar10_dir, data_dir, {"train": args.train_per_class, "test": args.test_per_class})
    print(f"subset: {counts['train']} training and {counts['test']} test images in {data_dir}", flush=True)

    launcher = [sys.executable]
    if args.nproc_per_node > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc_per_node}"]
    step_limit = ["--max-steps", str(args.max_steps)] if args.max_steps > 0 else []
    train_seconds, _ = run(
        [*launcher, f"{args.method}.py", "--dataset", "folder", "--data-dir", data_dir, "--arch", args.arch,
         "--batch-size", str(args.batch_size), *step_limit, "--output-dir", run_dir, *shlex.split(args.method_args)],
        os.path.join(args.work_dir, "train.log"),
    )
    checkpoint = os.path.join(run_dir, "checkpoint.pt")
    eval_seconds, eval_output = run([*launcher, "eval_linear.py", "--checkpoint", checkpoint],
                                    os.path.join(args.work_dir, "eval.log"))
    random_seconds, random_output = run([*launcher, "eval_linear.py", "--checkpoint", checkpoint, "--random-init"],
                                        os.path.join(args.work_dir, "eval_random_init.log"))
    pretrained, random_init = last_json_line(eval_output), last_json_line(random_output)

    import torch
    import torchvision

    import numpy
    import tyro

    from train import cpu_model  # benchmarks/train.py, beside this script, which reports the same machine facts

    steps = torch.load(checkpoint, map_location="cpu", weights_only=True)["step"]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    result = {
        "knn_top1": pretrained["knn_top1"],
        "linear_top1": pretrained["linear_top1"],
        "random_knn_top1": random_init["knn_top1"],
        "random_linear_top1": random_init["linear_top1"],
        "knn_gain": pretrained["knn_top1"] - random_init["knn_top1"],
        "train_images": counts["train"], "test_images": counts["test"],
        "steps": steps, "epochs": round(steps * args.batch_size / counts["train"], 2),
        "max_steps": args.max_steps, "batch_size": args.batch_size, "arch": args.arch,
        "method": args.method, "method_args": args.method_args,
        "train_s": round(train_seconds, 1), "eval_s": round(eval_seconds, 1), "random_eval_s": round(random_seconds, 1),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "processor": cpu_model(), "gpu": gpu, "processes": args.nproc_per_node,
        "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
        "tyro": tyro.__version__, "numpy": numpy.__version__, "commit": commit,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    print()
    print(f"{'backbone':<22}{'kNN top-1':>10}{'linear top-1':>14}")
    print(f"{args.method + ', ' + str(steps) + ' steps':<22}{result['knn_top1']:>10.4f}{result['linear_top1']:>14.4f}")
    print(f"{'random init':<22}{result['random_knn_top1']:>10.4f}{result['random_linear_top1']:>14.4f}")
    hardware = f"{args.nproc_per_node} x {gpu}" if gpu else f"{result['cpus']} CPUs ({result['processor']})"
    print(f"figures at the final step: {steps} steps = {result['epochs']} epochs of {counts['train']} images "
          f"at batch {args.batch_size}")
    print(f"pretraining {train_seconds / 60:.1f} min, evaluation {eval_seconds / 60:.1f} + {random_seconds / 60:.1f} min "
          f"on {hardware}")
    print(f"Python {result['python']}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"tyro {tyro.__version__}, numpy {numpy.__version__}; commit {result['commit']}, {result['date']} (UTC)")
    print(json.dumps(result), flush=True)

    failures = []
    if args.min_knn is not None and result["knn_top1"] < args.min_knn:
        failures.append(f"kNN top-1 {result['knn_top1']:.4f} is below --min-knn {args.min_knn}")
    if args.min_knn_gain is not None and result["knn_gain"] < args.min_knn_gain:
        failures.append(f"kNN gain over the random backbone {result['knn_gain']:.4f} is below --min-knn-gain {args.min_knn_gain}")
    if failures:
        sys.exit("error: " + "; ".join(failures))


if __name__ == "__main__":
    main()
