"""Shared fixtures: a tiny synthetic ImageFolder, helpers that run the scripts under `python` and
under `torchrun`, and the short simclr.py runs that several test files inspect.

Everything runs on the CPU and nothing is downloaded. Scripts run with the repository root as the
working directory, one OpenMP thread per process, and every distributed run stays on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# Maximum seconds for one script run, so that a hung run fails instead of blocking the suite.
# A 2-step simclr.py run took about 20 s on two shared CPU cores, mostly to import torch.
SCRIPT_TIMEOUT_S = 300

CLASS_NAMES = ("class_a", "class_b", "class_c")
TRAIN_IMAGES_PER_CLASS = 8  # with grey.png and rgba.png, 26 images: 3 steps per epoch at --batch-size 8
TEST_IMAGES_PER_CLASS = 3  # 9 images: uneven shards over 2 processes

# Arguments of every short simclr.py run on the synthetic folder: 3 steps per epoch, a 12-step
# schedule with 3 warm-up steps, so the learning rate is non-zero from step 1 on.
SMOKE_ARGS = ("--dataset", "folder", "--batch-size", "8", "--workers", "0", "--knn-every", "1",
              "--log-every", "1", "--epochs", "4", "--warmup-epochs", "1")

# torchrun's variables: a subprocess that inherits them would think it is one of several ranks.
DIST_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def script_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a script run: this one without torchrun's variables, one OpenMP thread."""
    env = {key: value for key, value in os.environ.items() if key not in DIST_VARIABLES}
    env["OMP_NUM_THREADS"] = "1"
    env["COLUMNS"] = "200"  # tyro wraps --help to the terminal width
    env.update(extra or {})
    return env


def run_script(*args: str, env: dict[str, str] | None = None,
               timeout: float = SCRIPT_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run `python ARGS` in the repository root and return the finished process with its output."""
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=script_env(env), capture_output=True,
                          text=True, timeout=timeout)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(*args: str, processes: int = 2, env: dict[str, str] | None = None,
                 timeout: float = SCRIPT_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run `torchrun --nproc_per_node=PROCESSES ARGS` on 127.0.0.1 with a free port."""
    loopback = "lo" if sys.platform.startswith("linux") else "lo0"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args]
    # Gloo otherwise picks the interface that the host name resolves to.
    run_env = {"GLOO_SOCKET_IFNAME": loopback, **(env or {})}
    return subprocess.run(command, cwd=REPO_ROOT, env=script_env(run_env), capture_output=True, text=True,
                          timeout=timeout)


def describe_failure(result: subprocess.CompletedProcess) -> str:
    """The command, return code and the end of both output streams, for assert messages."""
    return (f"command {result.args} returned {result.returncode}\n--- stdout ---\n{result.stdout[-3000:]}"
            f"\n--- stderr ---\n{result.stderr[-3000:]}")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def write_image(path: Path, mode: str, class_index: int, rng: np.random.Generator, side: int = 32) -> None:
    """Write a noisy image whose colour depends on its class, so that classes are separable."""
    pixels = rng.integers(0, 96, size=(side, side, 3), dtype=np.uint8)
    pixels[..., class_index] += 150
    image = Image.fromarray(pixels, "RGB")
    if mode == "L":
        image = image.convert("L")
    elif mode == "RGBA":
        image = image.convert("RGBA")
        image.putalpha(128)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """DATA_DIR with train/ and test/ class folders of 32x32 images.

    train/class_a/grey.png is greyscale, train/class_b/rgba.png has an alpha channel, and the
    other images are RGB PNGs and JPEGs.
    """
    root = tmp_path_factory.mktemp("image_folder")
    rng = np.random.default_rng(0)
    for split, count in (("train", TRAIN_IMAGES_PER_CLASS), ("test", TEST_IMAGES_PER_CLASS)):
        for class_index, class_name in enumerate(CLASS_NAMES):
            for i in range(count):
                extension = "jpg" if i % 2 else "png"
                write_image(root / split / class_name / f"image_{i}.{extension}", "RGB", class_index, rng)
    write_image(root / "train" / "class_a" / "grey.png", "L", 0, rng)
    write_image(root / "train" / "class_b" / "rgba.png", "RGBA", 1, rng)
    return root


@dataclass
class Run:
    """A finished script run and its run folder."""

    dir: Path
    result: subprocess.CompletedProcess

    @property
    def checkpoint(self) -> Path:
        return self.dir / "checkpoint.pt"


@pytest.fixture(scope="session")
def pretrained_run(image_folder, tmp_path_factory) -> Run:
    """A 2-step simclr.py run on one process; tests must leave its folder unchanged."""
    run_dir = tmp_path_factory.mktemp("pretrained") / "run"
    result = run_script("simclr.py", *SMOKE_ARGS, "--data-dir", str(image_folder), "--max-steps", "2",
                        "--output-dir", str(run_dir))
    assert result.returncode == 0, describe_failure(result)
    return Run(run_dir, result)


@pytest.fixture(scope="session")
def resumed_run(pretrained_run, image_folder, tmp_path_factory) -> Run:
    """A copy of `pretrained_run` resumed from step 2 to step 4, in the checkpoint's own folder."""
    run_dir = tmp_path_factory.mktemp("resumed") / "run"
    shutil.copytree(pretrained_run.dir, run_dir)
    result = run_script("simclr.py", *SMOKE_ARGS, "--data-dir", str(image_folder),
                        "--resume", str(run_dir / "checkpoint.pt"), "--max-steps", "4")
    assert result.returncode == 0, describe_failure(result)
    return Run(run_dir, result)


@pytest.fixture(scope="session")
def two_process_run(image_folder, tmp_path_factory) -> Run:
    """A 2-step simclr.py run on two gloo processes, with the global batch of `pretrained_run`."""
    run_dir = tmp_path_factory.mktemp("two_process") / "run"
    result = run_torchrun("simclr.py", "--no-sync-bn", *SMOKE_ARGS, "--data-dir", str(image_folder),
                          "--max-steps", "2", "--output-dir", str(run_dir))
    assert result.returncode == 0, describe_failure(result)
    return Run(run_dir, result)
