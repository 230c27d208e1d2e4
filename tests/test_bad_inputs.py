"""Invalid inputs: each run must exit with a one-line error that names the value and the fix, and
must leave the files already on disk unchanged."""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

import common
from conftest import SMOKE_ARGS, describe_failure, read_metrics, run_script

CPU = torch.device("cpu")


def folder_digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder`, by relative path."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def assert_config_error(result, *fragments: str) -> None:
    """Check a clean ConfigError exit: code 2, no traceback, and every fragment in the error output."""
    assert result.returncode == 2, describe_failure(result)
    assert "Traceback" not in result.stderr, describe_failure(result)
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} missing from the error output:\n{result.stderr}"


@pytest.fixture
def existing_output(tmp_path) -> Path:
    """An --output-dir that already contains a file from an earlier run."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    return folder


@pytest.fixture
def run_copy(pretrained_run, tmp_path) -> Path:
    """A copy of the pretrained run folder that a test may point a failing command at."""
    folder = tmp_path / "run"
    shutil.copytree(pretrained_run.dir, folder)
    return folder


def test_missing_data_folder(tmp_path, existing_output):
    before = folder_digest(existing_output)
    result = run_script("simclr.py", *SMOKE_ARGS, "--data-dir", str(tmp_path / "nowhere"),
                        "--output-dir", str(existing_output))
    assert_config_error(result, f"error: data folder {tmp_path / 'nowhere' / 'train'} not found",
                        "DATA_DIR/train/<class>/<image>")
    assert folder_digest(existing_output) == before


def test_empty_data_folder(tmp_path, existing_output):
    (tmp_path / "data" / "train" / "cats").mkdir(parents=True)
    before = folder_digest(existing_output)
    result = run_script("simclr.py", *SMOKE_ARGS, "--data-dir", str(tmp_path / "data"),
                        "--output-dir", str(existing_output))
    train_dir = tmp_path / "data" / "train"
    assert_config_error(result, f"data folder {train_dir} contains no images in class folders",
                        f"expected {train_dir}/<class>/<image>")
    assert folder_digest(existing_output) == before


def test_class_folder_without_images(image_folder, tmp_path, existing_output):
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    (data / "train" / "class_d").mkdir()
    before = folder_digest(existing_output)
    result = run_script("simclr.py", *SMOKE_ARGS, "--data-dir", str(data), "--output-dir", str(existing_output))
    assert_config_error(result, f"class folders without images in {data / 'train'}: class_d",
                        "add images to them or remove them")
    assert folder_digest(existing_output) == before


def test_unknown_dataset_rejected(tmp_path):
    result = run_script("simclr.py", "--dataset", "imagenet", "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2, describe_failure(result)
    assert "invalid choice 'imagenet' for argument '--dataset'" in result.stderr
    assert "'cifar10', 'cifar100', 'stl10', 'folder'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_batch_not_divisible(image_folder, tmp_path):
    # torchrun's variables for rank 0 of 3; the batch check runs before the process group starts.
    dist_env = {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "3"}
    result = run_script("simclr.py", *SMOKE_ARGS, "--data-dir", str(image_folder), "--output-dir",
                        str(tmp_path / "out"), env=dist_env)
    assert_config_error(result, "--batch-size 8 is the global batch", "number of processes (3)",
                        "use for example --batch-size 6 or 9")
    assert not (tmp_path / "out").exists()


def test_sync_bn_needs_cuda(image_folder, tmp_path):
    dist_env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    result = run_script("simclr.py", *SMOKE_ARGS, "--data-dir", str(image_folder), "--output-dir",
                        str(tmp_path / "out"), env=dist_env)
    assert_config_error(result, "--sync-bn needs CUDA", "pass --no-sync-bn")


def test_checkpoint_of_other_method(pretrained_run, image_folder, tmp_path):
    state = torch.load(pretrained_run.checkpoint, weights_only=True)
    state["method"] = "moco"
    run_dir = tmp_path / "moco_run"
    run_dir.mkdir()
    torch.save(state, run_dir / "checkpoint.pt")
    before = folder_digest(run_dir)
    result = run_script("simclr.py", *SMOKE_ARGS, "--data-dir", str(image_folder), "--max-steps", "4",
                        "--resume", str(run_dir / "checkpoint.pt"))
    assert_config_error(result, f"{run_dir / 'checkpoint.pt'} was written by moco.py, not simclr.py",
                        "resume it with moco.py")
    assert folder_digest(run_dir) == before


def test_truncated_checkpoint(pretrained_run, image_folder, tmp_path):
    data = pretrained_run.checkpoint.read_bytes()
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(data[: len(data) // 2])
    result = run_script("simclr.py", *SMOKE_ARGS, "--data-dir", str(image_folder), "--max-steps", "4",
                        "--resume", str(path))
    assert_config_error(result, f"cannot read checkpoint {path}", "The file is corrupt or truncated")
    assert path.read_bytes() == data[: len(data) // 2]


class CodeRunningPickle:
    """An object whose unpickling runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_code_running_pickle_rejected(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "contrastive-ssl-checkpoint", "payload": CodeRunningPickle(marker)}, path)
    result = run_script("eval_linear.py", "--checkpoint", str(path), "--workers", "0")
    assert_config_error(result, f"cannot read checkpoint {path}", "files that need arbitrary unpickling are rejected",
                        "the weights-only unpickler rejected it")
    assert "weights_only` set to `False`" not in result.stderr, "the error repeats torch's unsafe advice"
    assert not marker.exists(), "loading the checkpoint ran the code in the pickle"


def test_plain_state_dict_rejected(tmp_path):
    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    result = run_script("eval_linear.py", "--checkpoint", str(path), "--workers", "0")
    assert_config_error(result, f"{path} is not a checkpoint written by this collection",
                        "It looks like a plain state dict", "pass the checkpoint.pt of a run instead")


def test_foreign_dict_rejected(tmp_path):
    path = tmp_path / "dict.pt"
    torch.save({"epoch": 3, "note": "not ours"}, path)
    result = run_script("eval_linear.py", "--checkpoint", str(path), "--workers", "0")
    assert_config_error(result, f"{path} is not a checkpoint written by this collection",
                        "Pass the checkpoint.pt that simclr.py")


def test_output_dir_with_checkpoint(run_copy, image_folder):
    checkpoint_bytes = (run_copy / "checkpoint.pt").read_bytes()
    before = folder_digest(run_copy)
    result = run_script("simclr.py", *SMOKE_ARGS, "--data-dir", str(image_folder), "--max-steps", "2",
                        "--output-dir", str(run_copy))
    assert_config_error(result, f"{run_copy} already contains a checkpoint; pass --resume",
                        f"pass --resume {run_copy / 'checkpoint.pt'} to continue that run", "--overwrite",
                        "choose another --output-dir")
    assert (run_copy / "checkpoint.pt").read_bytes() == checkpoint_bytes, "the old checkpoint changed"
    assert folder_digest(run_copy) == before


def test_resume_into_other_run(run_copy, pretrained_run, image_folder):
    before = folder_digest(run_copy)
    result = run_script("simclr.py", *SMOKE_ARGS, "--data-dir", str(image_folder), "--max-steps", "4",
                        "--resume", str(pretrained_run.checkpoint), "--output-dir", str(run_copy))
    assert_config_error(result, f"{run_copy} already contains a checkpoint; pass --resume", "--overwrite")
    assert folder_digest(run_copy) == before


def test_overwrite_starts_new_log(run_copy, image_folder):
    result = run_script("simclr.py", *SMOKE_ARGS, "--data-dir", str(image_folder), "--max-steps", "1",
                        "--knn-every", "0", "--output-dir", str(run_copy), "--overwrite")
    assert result.returncode == 0, describe_failure(result)
    steps = [record["step"] for record in read_metrics(run_copy)]
    assert steps == [1], f"metrics.jsonl should hold only the new run's step, got {steps}"


def test_augmented_probe_needs_full_batch(pretrained_run):
    result = run_script("eval_linear.py", "--checkpoint", str(pretrained_run.checkpoint), "--augment",
                        "--epochs", "1", "--workers", "0")
    assert_config_error(result, "--augment needs at least one full batch", "--batch-size is 256",
                        "lower --batch-size")


def test_resume_changed_batch_size(run_copy, image_folder):
    before = folder_digest(run_copy)
    arguments = [value if value != "8" else "16" for value in SMOKE_ARGS]  # --batch-size 16
    result = run_script("simclr.py", *arguments, "--data-dir", str(image_folder), "--max-steps", "4",
                        "--resume", str(run_copy / "checkpoint.pt"))
    assert_config_error(result, f"cannot resume {run_copy / 'checkpoint.pt'} with different settings",
                        "--batch-size 8 -> 16", "Repeat the original command with --resume")
    assert folder_digest(run_copy) == before


# In-process checks of common.load_checkpoint, for every kind of file the scripts above reject.


def test_load_missing_checkpoint(tmp_path):
    with pytest.raises(common.ConfigError, match=f"checkpoint {tmp_path / 'none.pt'} not found"):
        common.load_checkpoint(str(tmp_path / "none.pt"))


@pytest.mark.parametrize("content", [b"", b"\x80\x02}q\x00", bytes(100), b"hello"],
                         ids=["empty", "cut pickle", "zeros", "text"])
def test_load_unreadable_checkpoint(tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(common.ConfigError, match="The file is corrupt or truncated"):
        common.load_checkpoint(str(path))


def test_load_backbone_file_hint(pretrained_run):
    with pytest.raises(common.ConfigError, match="It looks like a plain state dict"):
        common.load_checkpoint(str(pretrained_run.dir / "backbone.pt"))


def test_load_other_version(pretrained_run, tmp_path):
    state = torch.load(pretrained_run.checkpoint, weights_only=True)
    state["version"] = 99
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(common.ConfigError, match="has checkpoint version 99, but this code reads version 1"):
        common.load_checkpoint(str(tmp_path / "checkpoint.pt"))


def test_load_checks_method(pretrained_run):
    assert common.load_checkpoint(str(pretrained_run.checkpoint), "simclr")["method"] == "simclr"
    with pytest.raises(common.ConfigError, match="was written by simclr.py, not moco.py"):
        common.load_checkpoint(str(pretrained_run.checkpoint), "moco")


def fake_cifar10(download_error: Exception | None, calls: list[bool]):
    """A CIFAR10 class that is never on disk, and whose download raises `download_error` (or succeeds)."""

    class FakeCIFAR10:
        def __init__(self, root, train=True, transform=None, download=False):
            calls.append(download)
            if download:
                os.makedirs(root, exist_ok=True)  # as torchvision does before it downloads
            if download and download_error is not None:
                raise download_error
            if not download:
                raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")

    return FakeCIFAR10


def test_cifar10_download_failure(tmp_path, monkeypatch):
    calls: list[bool] = []
    error = urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10(error, calls))
    info = common.describe_dataset("cifar10", str(tmp_path), None)
    with pytest.raises(common.ConfigError) as raised:
        common.prepare_download(info, common.DistEnv(0, 0, 1, 1, CPU))
    message = str(raised.value)
    assert f"cifar10 is not in {tmp_path} and downloading it failed" in message
    assert "Temporary failure in name resolution" in message
    assert "point --data-dir at the folder that contains it" in message
    assert calls == [False, True], "one failed check, then one download attempt"


def test_failed_download_leaves_no_folder(tmp_path, monkeypatch):
    error = urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10(error, []))
    info = common.describe_dataset("cifar10", str(tmp_path / "mistyped"), None)
    with pytest.raises(common.ConfigError, match="downloading it failed"):
        common.prepare_download(info, common.DistEnv(0, 0, 1, 1, CPU))
    assert not (tmp_path / "mistyped").exists()


def test_failed_download_keeps_existing_folder(tmp_path, monkeypatch):
    error = urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10(error, []))
    (tmp_path / "data").mkdir()
    info = common.describe_dataset("cifar10", str(tmp_path / "data"), None)
    with pytest.raises(common.ConfigError, match="downloading it failed"):
        common.prepare_download(info, common.DistEnv(0, 0, 1, 1, CPU))
    assert (tmp_path / "data").is_dir()


def test_cifar10_download_succeeds(tmp_path, monkeypatch, capsys):
    calls: list[bool] = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10(None, calls))
    info = common.describe_dataset("cifar10", str(tmp_path), None)
    common.prepare_download(info, common.DistEnv(0, 0, 1, 1, CPU))
    assert calls == [False, True]
    assert f"cifar10 not found in {tmp_path}, or its files failed torchvision's checksum; downloading it" in capsys.readouterr().out


def test_download_only_local_rank_zero(tmp_path, monkeypatch):
    calls: list[bool] = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10(None, calls))
    info = common.describe_dataset("cifar10", str(tmp_path), None)
    common.prepare_download(info, common.DistEnv(1, 1, 2, 2, CPU))  # second process of a node
    assert calls == []
