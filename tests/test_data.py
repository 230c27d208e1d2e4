"""Augmentation, evaluation transforms, the folder dataset, dataset description and the backbone."""

from __future__ import annotations

import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image
from torch import nn

import common
from conftest import CLASS_NAMES, TRAIN_IMAGES_PER_CLASS, write_image

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def test_augmentation_small_images():
    steps = common.simclr_augmentation(32, MEAN, STD, strength=0.5, blur=False).transforms
    assert [type(step) for step in steps] == [
        T.RandomResizedCrop, T.RandomHorizontalFlip, T.RandomApply, T.RandomGrayscale, T.ToTensor, T.Normalize]

    crop = steps[0]
    assert crop.size == (32, 32)
    assert crop.scale == (0.08, 1.0)
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3))

    assert steps[1].p == 0.5

    assert steps[2].p == 0.8
    assert len(steps[2].transforms) == 1
    jitter = steps[2].transforms[0]
    assert isinstance(jitter, T.ColorJitter)
    # ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) at s=0.5 stores factor ranges 1 -/+ 0.4 and hue -/+ 0.1.
    assert tuple(jitter.brightness) == pytest.approx((0.6, 1.4))
    assert tuple(jitter.contrast) == pytest.approx((0.6, 1.4))
    assert tuple(jitter.saturation) == pytest.approx((0.6, 1.4))
    assert tuple(jitter.hue) == pytest.approx((-0.1, 0.1))

    assert steps[3].p == 0.2

    assert list(steps[5].mean) == list(MEAN)
    assert list(steps[5].std) == list(STD)


def test_augmentation_large_images_blur():
    steps = common.simclr_augmentation(224, MEAN, STD, strength=1.0, blur=True).transforms
    assert [type(step) for step in steps] == [
        T.RandomResizedCrop, T.RandomHorizontalFlip, T.RandomApply, T.RandomGrayscale, T.RandomApply, T.ToTensor,
        T.Normalize]
    jitter = steps[2].transforms[0]
    assert tuple(jitter.brightness) == pytest.approx((0.2, 1.8))
    assert tuple(jitter.hue) == pytest.approx((-0.2, 0.2))

    blur = steps[4]
    assert blur.p == 0.5
    assert len(blur.transforms) == 1
    assert isinstance(blur.transforms[0], T.GaussianBlur)
    assert tuple(blur.transforms[0].kernel_size) == (23, 23)
    assert tuple(blur.transforms[0].sigma) == (0.1, 2.0)


def test_augmentation_no_blur_flag():
    steps = common.simclr_augmentation(224, MEAN, STD, strength=1.0, blur=False).transforms
    blurs = [step for step in steps if isinstance(step, T.RandomApply) and isinstance(step.transforms[0], T.GaussianBlur)]
    assert blurs == []


def test_augmentation_output_shape():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    view = common.simclr_augmentation(32, MEAN, STD, strength=0.5, blur=False)(image)
    assert view.shape == (3, 32, 32)


def test_two_views_differ():
    torch.manual_seed(0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    view1, view2 = common.TwoViews(common.simclr_augmentation(32, MEAN, STD, 0.5, False))(image)
    assert not torch.equal(view1, view2), "the two views should come from independent random draws"


@pytest.mark.parametrize("image_size, kernel", [(224, 23), (96, 9), (64, 7), (32, 3), (10, 1)])
def test_blur_kernel_size(image_size, kernel):
    assert common.blur_kernel_size(image_size) == kernel


def test_eval_transform_small():
    transform = common.eval_transform(32, MEAN, STD)
    resize, crop = transform.transforms[:2]
    assert isinstance(resize, T.Resize) and resize.size == 32
    assert isinstance(crop, T.CenterCrop) and crop.size == (32, 32)
    assert transform(Image.new("RGB", (50, 40))).shape == (3, 32, 32)


def test_eval_transform_large():
    transform = common.eval_transform(224, MEAN, STD)
    resize, crop = transform.transforms[:2]
    assert isinstance(resize, T.Resize) and resize.size == 256, "224/0.875 = 256"
    assert isinstance(crop, T.CenterCrop) and crop.size == (224, 224)
    assert transform(Image.new("RGB", (400, 300))).shape == (3, 224, 224)


def folder_info(image_folder: Path) -> common.DataInfo:
    return common.describe_dataset("folder", str(image_folder), None)


def sample_of(dataset, relative_path: str):
    paths = [path for path, _ in dataset.samples]
    return dataset[paths.index(relative_path)][0]


@pytest.mark.parametrize("name, mode", [("grey.png", "L"), ("rgba.png", "RGBA")])
def test_folder_converts_to_rgb(image_folder, name, mode):
    class_name = "class_a" if mode == "L" else "class_b"
    path = str(image_folder / "train" / class_name / name)
    with Image.open(path) as image:
        assert image.mode == mode, "the fixture image has the wrong mode, so this test checks nothing"
    dataset = common.pretrain_dataset(folder_info(image_folder), T.ToTensor())
    tensor = sample_of(dataset, path)
    assert tensor.shape == (3, 32, 32)
    with Image.open(path) as image:
        expected = T.functional.to_tensor(image.convert("RGB"))
    assert torch.equal(tensor, expected)


def test_folder_two_views_shapes(image_folder):
    info = folder_info(image_folder)
    augmentation = common.simclr_augmentation(info.image_size, info.mean, info.std, 0.5, False)
    dataset = common.pretrain_dataset(info, common.TwoViews(augmentation))
    view1, view2 = sample_of(dataset, str(image_folder / "train" / "class_a" / "grey.png"))
    assert view1.shape == view2.shape == (3, 32, 32)
    assert len(dataset) == len(CLASS_NAMES) * TRAIN_IMAGES_PER_CLASS + 2


def test_eval_datasets_folder(image_folder):
    plain = common.eval_transform(32, MEAN, STD)
    train, test = common.eval_datasets(folder_info(image_folder), plain, plain)
    assert train.classes == list(CLASS_NAMES)
    assert test.classes == list(CLASS_NAMES)
    assert len(test) == 9
    assert common.num_classes(train) == 3


def test_describe_small_folder(image_folder):
    info = folder_info(image_folder)
    assert info.image_size == 32
    assert info.small_images
    assert info.has_eval_split
    assert info.root == str(image_folder)
    assert info.mean == common.NORMALIZATION["folder"][0]


@pytest.mark.parametrize("side, expected", [(64, 64), (65, 224), (80, 224), (20, 20)])
def test_describe_folder_image_size(tmp_path, side, expected):
    write_image(tmp_path / "train" / "a" / "x.png", "RGB", 0, np.random.default_rng(0), side=side)
    info = common.describe_dataset("folder", str(tmp_path), None)
    assert info.image_size == expected
    assert info.has_eval_split is False


def test_describe_explicit_image_size(image_folder):
    assert common.describe_dataset("folder", str(image_folder), 48).image_size == 48


@pytest.mark.parametrize("name, size", [("cifar10", 32), ("cifar100", 32), ("stl10", 96)])
def test_describe_torchvision_sizes(tmp_path, name, size):
    info = common.describe_dataset(name, str(tmp_path), None)
    assert info.image_size == size
    assert info.mean == common.NORMALIZATION[name][0]


def test_describe_unknown_dataset(tmp_path):
    with pytest.raises(common.ConfigError, match="unknown dataset 'imagenet'; choose one of cifar10, cifar100, stl10, folder"):
        common.describe_dataset("imagenet", str(tmp_path), None)


def test_describe_missing_folder(tmp_path):
    with pytest.raises(common.ConfigError) as error:
        common.describe_dataset("folder", str(tmp_path / "nowhere"), None)
    assert f"data folder {tmp_path / 'nowhere' / 'train'} not found" in str(error.value)
    assert "DATA_DIR/train/<class>/<image>" in str(error.value)


def test_describe_empty_folder(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(common.ConfigError) as error:
        common.describe_dataset("folder", str(tmp_path), None)
    assert f"data folder {tmp_path / 'train'} contains no images" in str(error.value)
    assert ".png" in str(error.value)


def test_describe_empty_eval_split(image_folder, tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    write_image(tmp_path / "train" / "a" / "x.png", "RGB", 0, np.random.default_rng(0))
    (tmp_path / "val").mkdir()
    with pytest.raises(common.ConfigError, match="contains no images"):
        common.describe_dataset("folder", str(tmp_path), None)


def test_describe_unreadable_image(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(common.ConfigError, match="cannot read image .*broken.png"):
        common.describe_dataset("folder", str(tmp_path), None)


def test_describe_image_size_too_small(image_folder):
    with pytest.raises(common.ConfigError, match="--image-size 4 is too small; use at least 8 pixels"):
        common.describe_dataset("folder", str(image_folder), 4)


def test_eval_datasets_without_split(tmp_path):
    write_image(tmp_path / "train" / "a" / "x.png", "RGB", 0, np.random.default_rng(0))
    info = common.describe_dataset("folder", str(tmp_path), None)
    with pytest.raises(common.ConfigError, match="has no val/ or test/ folder"):
        common.eval_datasets(info, None, None)


def test_eval_datasets_class_mismatch(tmp_path):
    rng = np.random.default_rng(0)
    write_image(tmp_path / "train" / "a" / "x.png", "RGB", 0, rng)
    write_image(tmp_path / "train" / "b" / "x.png", "RGB", 1, rng)
    write_image(tmp_path / "val" / "a" / "x.png", "RGB", 0, rng)
    info = common.describe_dataset("folder", str(tmp_path), None)
    with pytest.raises(common.ConfigError, match="class folders of .*val differ from those of"):
        common.eval_datasets(info, None, None)


def test_resnet_arch_matches_torchvision():
    family = {name for name in torchvision.models.list_models(module=torchvision.models)
              if name.startswith(("resnet", "resnext", "wide_resnet"))}
    assert set(typing.get_args(common.ResNetArch)) == family


@pytest.mark.parametrize("arch, feature_dim", [("resnet18", 512), ("resnet50", 2048)])
def test_backbone_cifar_stem(arch, feature_dim):
    backbone, width = common.build_backbone(arch, cifar_stem=True)
    assert width == feature_dim
    assert backbone.conv1.kernel_size == (3, 3)
    assert backbone.conv1.stride == (1, 1)
    assert backbone.conv1.padding == (1, 1)
    assert backbone.conv1.bias is None
    assert isinstance(backbone.maxpool, nn.Identity)
    assert isinstance(backbone.fc, nn.Identity)
    with torch.no_grad():
        assert backbone.eval()(torch.randn(2, 3, 32, 32)).shape == (2, feature_dim)


@pytest.mark.parametrize("arch, last_norm", [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_backbone_zero_init_residual(arch, last_norm):
    backbone, _ = common.build_backbone(arch, cifar_stem=True, zero_init_residual=True)
    blocks = [block for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4) for block in layer]
    nonzero = [i for i, block in enumerate(blocks) if getattr(block, last_norm).weight.abs().sum() != 0]
    assert nonzero == [], f"blocks whose last BatchNorm scale is not 0: {nonzero}"


def test_backbone_default_init_residual():
    backbone, _ = common.build_backbone("resnet18", cifar_stem=True)
    assert (backbone.layer1[0].bn2.weight == 1).all()


def test_backbone_imagenet_stem():
    backbone, width = common.build_backbone("resnet18", cifar_stem=False)
    assert width == 512
    assert backbone.conv1.kernel_size == (7, 7)
    assert backbone.conv1.stride == (2, 2)
    assert isinstance(backbone.maxpool, nn.MaxPool2d)


def test_backbone_loads_into_torchvision():
    backbone, _ = common.build_backbone("resnet18", cifar_stem=True)
    reference = torchvision.models.resnet18()
    reference.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    reference.maxpool = nn.Identity()
    reference.fc = nn.Identity()
    reference.load_state_dict(backbone.state_dict(), strict=True)


def test_backbone_unknown_arch():
    with pytest.raises(common.ConfigError, match="unknown --arch 'vgg16'; choose one of resnet18"):
        common.build_backbone("vgg16", cifar_stem=True)
