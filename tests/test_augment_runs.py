"""Training with --augment-on-device on the CPU: a short run of every method script, the images
held in memory, the worker path for folders of mixed image sizes, and 2 processes. Exact resume
with the views made on the device is tested with preemption, in test_preemption.py.

Runs use the synthetic image folder (26 training images of 32 px) with a global batch of 8, so an
epoch has 3 steps.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import describe_failure, read_metrics, run_script, run_torchrun

RUN_ARGS = ("--dataset", "folder", "--arch", "resnet18", "--batch-size", "8", "--workers", "0",
            "--knn-every", "1", "--log-every", "1", "--augment-on-device")
# Each method with the flags that a batch of 8 needs (MoCo's queue is a multiple of the batch)
# and, for CPC, 16-pixel crops so that its 7 x 7 patch grid stays small.
METHOD_ARGS = {
    "simclr.py": ("--epochs", "4", "--warmup-epochs", "1"),
    "dcl.py": ("--epochs", "4", "--warmup-epochs", "1"),
    "moco.py": ("--epochs", "4", "--queue-size", "16"),
    "infonce_cpc.py": ("--epochs", "4", "--image-size", "16"),
}


def run_method(script: str, image_folder, output_dir, *extra: str):
    result = run_script(script, *RUN_ARGS, *METHOD_ARGS[script], "--data-dir", str(image_folder),
                        "--output-dir", str(output_dir), *extra)
    assert result.returncode == 0, describe_failure(result)
    return result


def load(run_dir) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


def losses(run_dir) -> list[float]:
    return [line["loss"] for line in read_metrics(run_dir) if "loss" in line]


@pytest.mark.parametrize("script", sorted(METHOD_ARGS))
def test_method_trains_on_device(script, image_folder, tmp_path):
    run_dir = tmp_path / "run"
    result = run_method(script, image_folder, run_dir, "--max-steps", "3")
    assert "images held on the device and augmented there in batches" in result.stdout
    assert json.loads((run_dir / "args.json").read_text())["augment_on_device"] is True
    values = losses(run_dir)
    assert len(values) == 3
    assert all(math.isfinite(value) for value in values), values
    assert load(run_dir)["step"] == 3
    knn = [line["knn_top1"] for line in read_metrics(run_dir) if "knn_top1" in line]
    assert len(knn) == 1


def test_on_device_differs_from_workers(image_folder, tmp_path):
    # The flag must change where the views are made: same seed, other augmentation draws.
    device_dir, workers_dir = tmp_path / "device", tmp_path / "workers"
    run_method("simclr.py", image_folder, device_dir, "--max-steps", "1")
    run_method("simclr.py", image_folder, workers_dir, "--max-steps", "1", "--no-augment-on-device")
    assert losses(device_dir) != losses(workers_dir)


def test_in_memory_images_match_files(image_folder):
    info = common.describe_dataset("folder", str(image_folder), None)
    images = common.in_memory_images(info)
    folder = common.image_folder(str(image_folder / "train"), None)
    assert images.dtype == torch.uint8
    assert images.shape == (len(folder), 3, 32, 32)
    for index, (path, _) in enumerate(folder.samples):
        expected = torch.from_numpy(np.array(common.load_rgb_image(path))).permute(2, 0, 1)
        assert torch.equal(images[index], expected), path


@pytest.fixture
def mixed_size_folder(tmp_path):
    """Class folders of images of two sizes, which cannot be stacked into one tensor."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for class_name in ("a", "b"):
            for i in range(6):
                side = (40, 40) if i % 2 else (36, 48)
                path = tmp_path / split / class_name / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (*side, 3), dtype=np.uint8)).save(path)
    return tmp_path


def test_mixed_sizes_use_workers(mixed_size_folder, tmp_path):
    info = common.describe_dataset("folder", str(mixed_size_folder), 32)
    assert common.in_memory_images(info) is None
    result = run_script("simclr.py", *RUN_ARGS, "--data-dir", str(mixed_size_folder), "--image-size", "32",
                        "--max-steps", "2", "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 0, describe_failure(result)
    assert "loader workers per process: 0, decoding and cropping; the device augments" in result.stdout
    assert all(math.isfinite(value) for value in losses(tmp_path / "run"))


def device_two_view_batches(data_dir, image_size, batch_per_process: int):
    """Build the on-device two-view loader of a folder, as simclr.py does; return its loader, epoch-0
    batches and image count."""
    info = common.describe_dataset("folder", str(data_dir), image_size)
    recipe = common.simclr_recipe(32, info.mean, info.std, 0.5, blur=False)
    loader, sampler, count = common.device_pretrain_loader(info, recipe, 2, lambda views: tuple(views.chunk(2)),
                                                           batch_per_process, 0, common.read_dist_env(), seed=0)
    sampler.set_epoch(0)
    return loader, [views for views, _ in loader], count


def test_device_loader_batches(image_folder):
    loader, batches, count = device_two_view_batches(image_folder, None, 8)
    assert count == 26
    assert len(batches) == len(loader) == 3
    for x1, x2 in batches:
        assert x1.shape == x2.shape == (8, 3, 32, 32)
        assert x1.dtype == torch.float32
        assert not torch.equal(x1, x2)


def test_worker_crops_finished_on_device(mixed_size_folder):
    _, batches, count = device_two_view_batches(mixed_size_folder, 32, 4)
    assert count == 12
    assert len(batches) == 3
    for x1, x2 in batches:
        assert x1.shape == x2.shape == (4, 3, 32, 32)
        assert not torch.equal(x1, x2)


def test_two_process_on_device_run(image_folder, tmp_path):
    run_dir = tmp_path / "run"
    result = run_torchrun("simclr.py", "--no-sync-bn", *RUN_ARGS, *METHOD_ARGS["simclr.py"], "--data-dir",
                          str(image_folder), "--max-steps", "2", "--output-dir", str(run_dir))
    assert result.returncode == 0, describe_failure(result)
    assert "processes 2" in result.stdout
    assert len(losses(run_dir)) == 2


def test_large_images_stay_on_disk(tmp_path):
    # Images larger than 64 px are not held in memory, even for small training crops.
    for i in range(2):
        path = tmp_path / "train" / "a" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((80, 80, 3), dtype=np.uint8)).save(path)
    info = common.describe_dataset("folder", str(tmp_path), 32)
    assert common.in_memory_images(info) is None


def test_sampler_keeps_no_image_copy(image_folder):
    info = common.describe_dataset("folder", str(image_folder), None)
    recipe = common.simclr_recipe(32, info.mean, info.std, 0.5, blur=False)
    _, sampler, _ = common.device_pretrain_loader(info, recipe, 2, lambda v: v, 8, 0, common.read_dist_env(), 0)
    assert isinstance(sampler.dataset, range)


def test_unreadable_image_in_memory_skipped(image_folder, tmp_path, capsys):
    # The folder replaces an undecodable image by the next one and prints a warning.
    import shutil
    shutil.copytree(image_folder, tmp_path / "data")
    broken = tmp_path / "data" / "train" / "class_c" / "broken.png"
    broken.write_bytes(b"not a png")
    info = common.describe_dataset("folder", str(tmp_path / "data"), None)
    images = common.in_memory_images(info)
    samples = [path for path, _ in common.image_folder(str(tmp_path / "data" / "train"), None).samples]
    index = samples.index(str(broken))
    assert images.shape[0] == len(samples)
    assert torch.equal(images[index], images[index + 1])
    assert f"warning: skipped unreadable image {broken}" in capsys.readouterr().err


@pytest.mark.parametrize("images", [torch.rand(2, 3, 8, 8), torch.zeros(2, 1, 8, 8, dtype=torch.uint8),
                                    torch.zeros(3, 8, 8, dtype=torch.uint8)], ids=["float", "grey", "unbatched"])
def test_augment_batch_rejects_other_input(images):
    recipe = common.AugmentRecipe(8, (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(ValueError, match="augment_batch takes uint8 RGB images"):
        common.augment_batch(images, recipe)


def test_augment_batch_takes_strided_input():
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    recipe = common.AugmentRecipe(16, (0.5,) * 3, (0.25,) * 3, crop_scale=(1, 1), crop_ratio=(1, 1), flip_prob=0)
    out = common.augment_batch(images, recipe, normalize=False)
    assert torch.allclose(out, images.float() / 255, atol=1e-5)
