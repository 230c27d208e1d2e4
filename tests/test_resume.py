"""Mid-epoch resume: the sampler's skip, and the images a resumed simclr.main visits.

The runs here call simclr.main in this process, so that a patched ImageFolder can record which
images each training step loads. They use 8-pixel crops to keep the ResNet-18 steps cheap.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torchvision

import common
import simclr
from conftest import read_metrics


def env_of(rank: int, world_size: int) -> common.DistEnv:
    return common.DistEnv(rank, rank, world_size, world_size, torch.device("cpu"))


@pytest.mark.parametrize("world_size", [1, 2])
def test_sampler_skip_drops_prefix(world_size):
    dataset = list(range(26))
    for rank in range(world_size):
        full = common.ResumableDistributedSampler(dataset, env_of(rank, world_size), seed=3)
        full.set_epoch(1)
        order = list(full)
        resumed = common.ResumableDistributedSampler(dataset, env_of(rank, world_size), seed=3)
        resumed.set_epoch(1)
        resumed.skip = 8
        assert list(resumed) == order[8:], f"rank {rank}"
        assert len(resumed) == len(order) - 8, f"rank {rank}"


def test_sampler_order_depends_on_epoch():
    sampler = common.ResumableDistributedSampler(list(range(26)), env_of(0, 1), seed=3)
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == epoch0, "the order of an epoch must depend only on seed and epoch"
    assert epoch1 != epoch0
    assert sorted(epoch0) == list(range(26))


def test_sampler_ranks_disjoint():
    dataset = list(range(26))
    shards = []
    for rank in range(2):
        sampler = common.ResumableDistributedSampler(dataset, env_of(rank, 2), seed=0)
        sampler.set_epoch(0)
        shards.append(set(sampler))
    assert shards[0].isdisjoint(shards[1])
    assert len(shards[0]) == len(shards[1]) == 13


def simclr_args(image_folder, output_dir, max_steps, resume=None, **overrides) -> simclr.Args:
    """Arguments of a short in-process run: 3 steps per epoch at 8 images per step, 8-pixel crops."""
    values = dict(dataset="folder", data_dir=str(image_folder), image_size=8, batch_size=8, workers=0,
                  knn_every=0, log_every=1, epochs=4, warmup_epochs=1, max_steps=max_steps,
                  output_dir=str(output_dir), resume=resume)
    values.update(overrides)
    return simclr.Args(**values)


@pytest.fixture
def record_training_images(monkeypatch) -> list[int]:
    """The dataset indices that pretraining loads, in order; kNN and evaluation loads are left out."""
    loaded: list[int] = []
    original = torchvision.datasets.ImageFolder.__getitem__

    def recording_getitem(self, index):
        if isinstance(self.transform, common.TwoViews):
            loaded.append(index)
        return original(self, index)

    monkeypatch.setattr(torchvision.datasets.ImageFolder, "__getitem__", recording_getitem)
    return loaded


def test_resume_same_data_order(image_folder, tmp_path, record_training_images):
    # 4 steps in one go against 2 steps then a resume to step 4: the resume starts mid-epoch
    # (step 2 of 3), so the sampler must skip the 16 images already seen in epoch 0.
    simclr.main(simclr_args(image_folder, tmp_path / "straight", max_steps=4))
    straight = list(record_training_images)
    record_training_images.clear()

    simclr.main(simclr_args(image_folder, tmp_path / "split", max_steps=2))
    first_part = list(record_training_images)
    record_training_images.clear()
    simclr.main(simclr_args(image_folder, tmp_path / "split", max_steps=4,
                            resume=str(tmp_path / "split" / "checkpoint.pt")))
    second_part = list(record_training_images)

    assert len(straight) == 4 * 8
    assert first_part == straight[:16]
    assert second_part == straight[16:], "the resumed run loaded other images than the uninterrupted one"
    steps = [line["step"] for line in read_metrics(tmp_path / "split") if "loss" in line]
    assert steps == [1, 2, 3, 4]


def test_resume_other_world_size_note(two_process_run, image_folder, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(two_process_run.checkpoint, run_dir / "checkpoint.pt")
    args = simclr_args(image_folder, run_dir, max_steps=3, resume=str(run_dir / "checkpoint.pt"),
                       image_size=None, knn_every=1, sync_bn=False)
    simclr.main(args)
    output = capsys.readouterr().out
    assert "note: the checkpoint was written by a run of 2 process(es) and this run has 1" in output
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 3
