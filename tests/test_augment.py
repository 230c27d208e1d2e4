"""Batched augmentation on the training device (`common.augment_batch` and its helpers), checked
against torchvision's per-image transforms.

Distribution tests draw thousands of parameters with fixed seeds. They compare frequencies and
means within 4 standard errors, and quantiles within a band of 2 percentage points of the quantiles
of torchvision's draws. Deterministic tests compare single transforms with torchvision's functional
ones on the same input.
"""

from __future__ import annotations

import colorsys
import dataclasses
import math
import time

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF

import common

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
SIMCLR_SCALE, MOCO_SCALE = (0.08, 1.0), (0.2, 1.0)
RATIO = (3 / 4, 4 / 3)


def unchanged_recipe(image_size: int, **changes) -> common.AugmentRecipe:
    """A recipe that returns a square image of `image_size` unchanged, with `changes` applied."""
    fields = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0)
    fields.update(changes)
    return common.AugmentRecipe(image_size, MEAN, STD, **fields)


def random_images(count: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Uniform random uint8 images (count, 3, height, width)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, height, width), generator=generator, dtype=torch.uint8)


def constant_images(count: int, rgb: tuple[float, float, float], side: int = 2) -> torch.Tensor:
    """Float images (count, 3, side, side) in [0, 1] of one colour."""
    return torch.tensor(rgb).view(1, 3, 1, 1).expand(count, 3, side, side).clone()


def assert_frequency(count: int, total: int, prob: float, label: str, reference_total: int | None = None) -> None:
    """Assert that count/total is within 4 standard errors of prob, itself a frequency over
    `reference_total` draws when that is given."""
    error = math.sqrt(prob * (1 - prob) * (1 / total + (1 / reference_total if reference_total else 0)))
    frequency = count / total
    assert abs(frequency - prob) <= 4 * error, (
        f"{label}: frequency {frequency:.4f} over {total} draws, expected {prob} +/- {4 * error:.4f}")


def assert_quantiles_match(values: torch.Tensor, reference: torch.Tensor, label: str, band: float = 0.02) -> None:
    """Assert that each quantile of `values` lies between the quantiles of `reference` at p - band and
    p + band, which allows for sampling noise and for distributions with point masses."""
    values, reference = values.double(), reference.double()
    for p in QUANTILES:
        value = torch.quantile(values, p).item()
        low = torch.quantile(reference, p - band).item()
        high = torch.quantile(reference, p + band).item()
        assert low - 1e-9 <= value <= high + 1e-9, (
            f"{label}: the {p:.0%} quantile {value:.4f} is outside torchvision's "
            f"{p - band:.0%} to {p + band:.0%} quantiles [{low:.4f}, {high:.4f}]")


def assert_range_covered(values: torch.Tensor, low: float, high: float, label: str, tol: float = 1e-5) -> None:
    """Assert that all values lie in [low, high] and that they reach within 2% of both ends."""
    margin = 0.02 * (high - low)
    smallest, largest = values.min().item(), values.max().item()
    assert smallest >= low - tol, f"{label}: minimum {smallest:.5f} is below the lower end {low}"
    assert largest <= high + tol, f"{label}: maximum {largest:.5f} is above the upper end {high}"
    assert smallest <= low + margin, f"{label}: minimum {smallest:.5f} does not reach the lower end {low}"
    assert largest >= high - margin, f"{label}: maximum {largest:.5f} does not reach the upper end {high}"


def assert_mean(values: torch.Tensor, expected: float, label: str, reference: torch.Tensor | None = None) -> None:
    """Assert that the sample mean is within 4 standard errors of `expected`, the mean of `reference`
    when given, whose own standard error then adds to the tolerance."""
    values = values.double()
    variance = values.var().item() / values.numel()
    if reference is not None:
        variance += reference.double().var().item() / reference.numel()
    error = math.sqrt(variance)
    mean = values.mean().item()
    assert abs(mean - expected) <= 4 * error, f"{label}: mean {mean:.4f}, expected {expected:.4f} +/- {4 * error:.4f}"


# ----------------------------------------------------------------------------------------------
# Crop boxes against RandomResizedCrop.get_params
# ----------------------------------------------------------------------------------------------


def torchvision_boxes(count: int, height: int, width: int, scale, ratio) -> torch.Tensor:
    """(count, 4) rows of (top, left, height, width) from RandomResizedCrop.get_params."""
    image = torch.empty(1, height, width)
    return torch.tensor([T.RandomResizedCrop.get_params(image, scale, ratio) for _ in range(count)],
                        dtype=torch.float64)


@pytest.mark.parametrize("scale", [SIMCLR_SCALE, MOCO_SCALE], ids=["simclr", "moco"])
@pytest.mark.parametrize("height, width", [(32, 32), (40, 64), (8, 100)], ids=["square", "wide", "elongated"])
def test_crop_boxes_match_torchvision(height, width, scale):
    count = 20000
    torch.manual_seed(0)
    boxes = common.sample_crop_boxes(count, height, width, scale, RATIO, torch.device("cpu")).double()
    reference = torchvision_boxes(count, height, width, scale, RATIO)
    top, left, h, w = boxes.unbind(1)

    assert torch.equal(boxes, boxes.round()), "crop boxes must be whole pixels"
    assert (h >= 1).all(), "a crop has no rows"
    assert (w >= 1).all(), "a crop has no columns"
    assert (top >= 0).all(), "a crop starts above the image"
    assert (left >= 0).all(), "a crop starts left of the image"
    assert (top + h <= height).all(), "a crop ends below the image"
    assert (left + w <= width).all(), "a crop ends right of the image"

    ref_top, ref_left, ref_h, ref_w = reference.unbind(1)
    assert_quantiles_match(h * w / (height * width), ref_h * ref_w / (height * width), "area fraction")
    assert_quantiles_match(w / h, ref_w / ref_h, "aspect ratio")
    # Offsets as a fraction of the free space, for boxes smaller than the image in that direction.
    # Few boxes of the elongated image can move, so their offsets are compared by the mean.
    for name, offset, side, image_side, ref_offset, ref_side in (("top", top, h, height, ref_top, ref_h),
                                                                  ("left", left, w, width, ref_left, ref_w)):
        movable, ref_movable = side < image_side, ref_side < image_side
        assert_frequency(movable.sum().item(), count, ref_movable.double().mean().item(), f"crops that can move {name}",
                         reference_total=count)
        if ref_movable.sum() < 2:
            continue
        position = offset[movable] / (image_side - side[movable])
        ref_position = ref_offset[ref_movable] / (image_side - ref_side[ref_movable])
        assert_mean(position, ref_position.mean().item(), f"{name} offset relative to the free space",
                    reference=ref_position)


@pytest.mark.parametrize("height, width", [(32, 32), (40, 64)], ids=["square", "wide"])
def test_crop_offsets_uniform(height, width):
    count = 20000
    torch.manual_seed(1)
    top, left, h, w = common.sample_crop_boxes(count, height, width, SIMCLR_SCALE, RATIO,
                                               torch.device("cpu")).double().unbind(1)
    for name, offset, free in (("top", top, height - h), ("left", left, width - w)):
        movable = free > 0
        assert (offset == 0).any(), f"no {name} offset is 0"
        assert (offset == free)[movable].any(), f"no {name} offset reaches the far side (image side - crop)"
        # Uniform over the integers 0..free: (offset + 0.5) / (free + 1) is uniform on (0, 1).
        position = (offset[movable] + 0.5) / (free[movable] + 1)
        assert_mean(position, 0.5, f"{name} offset relative to the free space")


def test_crop_boxes_fallback_centred():
    # A MoCo crop covers at least 20% of an 8 x 100 image (160 pixels), but a crop of height 8 and
    # aspect ratio at most 4/3 has at most 8 x 11 pixels. So every box is the fallback, which has the
    # full height and the width round(8 * 4/3) = 11 and is centred.
    torch.manual_seed(2)
    boxes = common.sample_crop_boxes(500, 8, 100, MOCO_SCALE, RATIO, torch.device("cpu"))
    reference = T.RandomResizedCrop.get_params(torch.empty(1, 8, 100), MOCO_SCALE, RATIO)
    assert tuple(reference) == (0, 44, 8, 11), f"torchvision's fallback changed: {reference}"
    assert (boxes == torch.tensor([0.0, 44.0, 8.0, 11.0])).all(), f"fallback boxes differ: {boxes.unique(dim=0)}"


def test_crop_areas_independent():
    count = 20000
    torch.manual_seed(3)
    _, _, h, w = common.sample_crop_boxes(count, 32, 32, SIMCLR_SCALE, RATIO, torch.device("cpu")).double().unbind(1)
    area = h * w
    correlation = torch.corrcoef(torch.stack([area[:-1], area[1:]]))[0, 1].item()
    assert abs(correlation) < 4 / math.sqrt(count), f"areas of consecutive crops correlate: r = {correlation:.4f}"


# ----------------------------------------------------------------------------------------------
# Colour jitter
# ----------------------------------------------------------------------------------------------


def jitter_one(op: int, strength: float, x: torch.Tensor) -> torch.Tensor:
    """Apply ColorJitter's adjustment `op` (0 brightness, 1 contrast, 2 saturation, 3 hue) to every image."""
    strengths = [0.0, 0.0, 0.0, 0.0]
    strengths[op] = strength
    return common.color_jitter_batch(x, strengths, 1.0)


def hue_turns(rgb: torch.Tensor) -> torch.Tensor:
    """Hue in turns of (M, 3) RGB rows, computed by colorsys."""
    return torch.tensor([colorsys.rgb_to_hsv(*row)[0] for row in rgb.double().tolist()], dtype=torch.float64)


@pytest.mark.parametrize("strength", [0.8, 1.5])
def test_jitter_brightness_range(strength):
    torch.manual_seed(10)
    grey = 0.3  # 0.3 * (1 + 1.5) < 1, so no value is clipped
    out = jitter_one(0, strength, constant_images(4000, (grey, grey, grey)))
    factor = out[:, 0, 0, 0].double() / grey
    low, high = max(0.0, 1 - strength), 1 + strength
    assert_range_covered(factor, low, high, "brightness factor")
    assert_mean(factor, (low + high) / 2, "brightness factor")


def test_jitter_contrast_range():
    torch.manual_seed(11)
    x = constant_images(4000, (0.4, 0.4, 0.4))
    x[:, :, 1] = 0.6  # two grey levels: contrast scales their difference by the factor
    out = jitter_one(1, 0.8, x)
    factor = (out[:, 0, 1, 0] - out[:, 0, 0, 0]).double() / 0.2
    assert_range_covered(factor, 0.2, 1.8, "contrast factor", tol=1e-4)
    assert_mean(factor, 1.0, "contrast factor")


def test_jitter_saturation_range():
    torch.manual_seed(12)
    out = jitter_one(2, 0.8, constant_images(4000, (0.6, 0.4, 0.5)))
    # Blending with the grey level adds the same amount to every channel, so the difference of two
    # channels scales by the factor.
    factor = (out[:, 0, 0, 0] - out[:, 1, 0, 0]).double() / 0.2
    assert_range_covered(factor, 0.2, 1.8, "saturation factor", tol=1e-4)
    assert_mean(factor, 1.0, "saturation factor")


@pytest.mark.parametrize("strength", [0.1, 0.4])
def test_jitter_hue_range(strength):
    torch.manual_seed(13)
    colour = (0.8, 0.3, 0.4)
    out = jitter_one(3, strength, constant_images(4000, colour))
    shift = hue_turns(out[:, :, 0, 0]) - colorsys.rgb_to_hsv(*colour)[0]
    shift = (shift + 0.5) % 1 - 0.5  # the shortest way round
    assert_range_covered(shift, -strength, strength, "hue shift in turns", tol=1e-4)
    assert_mean(shift, 0.0, "hue shift in turns")


def test_jitter_order_random():
    # Let c be a one-colour image, h the hue rotation, L the grey level and f the contrast factor.
    # Contrast then hue gives f*h(c) + (1-f)*L(c), and hue then contrast gives f*h(c) + (1-f)*L(h(c)).
    torch.manual_seed(14)
    colour = (0.6, 0.4, 0.5)
    out = common.color_jitter_batch(constant_images(4000, colour), [0.0, 0.8, 0.0, 0.4], 1.0)[:, :, 0, 0].double()
    hue, saturation, value = colorsys.rgb_to_hsv(*colour)
    shift = hue_turns(out) - hue
    factor = (out.amax(dim=1) - out.amin(dim=1)) / (max(colour) - min(colour))
    weights = torch.tensor((0.2989, 0.587, 0.114), dtype=torch.float64)  # rgb_to_grayscale's
    grey_level = weights @ torch.tensor(colour, dtype=torch.float64)
    rotated = torch.tensor([colorsys.hsv_to_rgb((hue + s) % 1, saturation, value) for s in shift.tolist()],
                           dtype=torch.float64)  # (count, 3)
    contrast_first = factor[:, None] * rotated + ((1 - factor) * grey_level)[:, None]
    hue_first = factor[:, None] * rotated + ((1 - factor) * (rotated @ weights))[:, None]
    error_contrast_first = (out - contrast_first).abs().amax(dim=1)
    error_hue_first = (out - hue_first).abs().amax(dim=1)
    distinct = (contrast_first - hue_first).abs().amax(dim=1) > 1e-3

    explained = torch.minimum(error_contrast_first, error_hue_first)[distinct]
    assert explained.max() < 1e-4, f"an output matches neither order: error {explained.max():.2e}"
    assert distinct.sum() > 2000, f"only {distinct.sum()} outputs tell the two orders apart"
    count = (error_contrast_first < error_hue_first)[distinct].sum().item()
    assert_frequency(count, distinct.sum().item(), 0.5, "contrast before hue")


def test_jitter_prob():
    torch.manual_seed(15)
    count = 4000
    images = torch.full((count, 3, 4, 4), 100, dtype=torch.uint8)
    recipe = unchanged_recipe(4, jitter=(0.8, 0.0, 0.0, 0.0), jitter_prob=0.8)
    out = common.augment_batch(images, recipe, normalize=False)
    changed = (out - 100 / 255).abs().amax(dim=(1, 2, 3)) > 1e-5
    assert_frequency(changed.sum().item(), count, 0.8, "jittered images")


@pytest.mark.parametrize("op, function", [(0, TF.adjust_brightness), (1, TF.adjust_contrast),
                                          (2, TF.adjust_saturation), (3, TF.adjust_hue)],
                         ids=["brightness", "contrast", "saturation", "hue"])
def test_adjust_color_matches_torchvision(op, function):
    if op == 3:
        factors = [-0.5, -0.3, -0.1, 0.0, 0.05, 0.25, 0.4, 0.5]
    else:
        factors = [0.0, 0.2, 0.6, 1.0, 1.4, 1.8, 2.5, 0.9]
    x = random_images(len(factors), 12, 10, seed=20).float() / 255
    x[:, :, 0, :3] = 0.5  # grey pixels
    x[:, 0, 1, :3] = x[:, 1, 1, :3]  # ties between the largest channels
    out = common.adjust_color(x, op, torch.tensor(factors))
    for image, factor, result in zip(x, factors, out):
        expected = function(image, factor)
        error = (result - expected).abs().max().item()
        assert error < 1e-5, f"factor {factor}: max difference {error:.2e} from torchvision"


def test_grayscale_before_jitter_order():
    # A hue rotation leaves a grey image alone but changes the grey level of a coloured one.
    torch.manual_seed(16)
    images = random_images(200, 6, 6, seed=21)
    grey_levels = TF.rgb_to_grayscale(images.float() / 255, num_output_channels=3)
    recipe = unchanged_recipe(6, jitter=(0.0, 0.0, 0.0, 0.4), jitter_prob=1.0, grayscale_prob=1.0,
                              grayscale_before_jitter=True)
    out = common.augment_batch(images, recipe, normalize=False)
    same = (out - grey_levels).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert same.all(), f"grey before the jitter: {(~same).sum()} of 200 images differ from their grey level"

    recipe = dataclasses.replace(recipe, grayscale_before_jitter=False)
    out = common.augment_batch(images, recipe, normalize=False)
    same = (out - grey_levels).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert same.sum() < 20, f"grey after the jitter: {same.sum()} of 200 images keep their grey level"


# ----------------------------------------------------------------------------------------------
# Greyscale, flip, blur and solarisation
# ----------------------------------------------------------------------------------------------


def test_grayscale_and_flip_frequency():
    torch.manual_seed(30)
    count = 4000
    image = random_images(1, 8, 8, seed=30)
    recipe = unchanged_recipe(8, flip_prob=0.5, grayscale_prob=0.2)
    out = common.augment_batch(image.expand(count, -1, -1, -1), recipe, normalize=False)
    x = image.float()[0] / 255
    candidates = torch.stack([x, TF.hflip(x), TF.rgb_to_grayscale(x, 3), TF.rgb_to_grayscale(TF.hflip(x), 3)])
    error = (out[:, None] - candidates[None]).abs().amax(dim=(2, 3, 4))  # (count, 4)
    best = error.argmin(dim=1)
    assert error.amin(dim=1).max() < 1e-5, "an output is neither the image, its mirror image nor their grey versions"
    flipped = (best % 2 == 1).long()
    grey = (best >= 2).long()

    assert_frequency(flipped.sum().item(), count, 0.5, "flips")
    assert_frequency(grey.sum().item(), count, 0.2, "greyscale")
    assert_frequency((flipped[:-1] & flipped[1:]).sum().item(), count - 1, 0.25, "flips of consecutive images")
    assert_frequency((grey[:-1] & grey[1:]).sum().item(), count - 1, 0.04, "greyscale of consecutive images")
    assert_frequency((flipped & grey).sum().item(), count, 0.1, "images both flipped and grey")


def test_blur_matches_torchvision():
    x = torch.rand(6, 3, 32, 40, generator=torch.Generator().manual_seed(31))
    sigma = torch.tensor([0.1, 0.3, 0.7, 1.0, 1.5, 2.0])
    for kernel_size in (3, 9, 23):
        out = common.gaussian_blur_batch(x, kernel_size, sigma)
        for image, s, result in zip(x, sigma.tolist(), out):
            expected = TF.gaussian_blur(image, [kernel_size, kernel_size], [s, s])
            error = (result - expected).abs().max().item()
            assert error < 1e-5, f"kernel {kernel_size}, sigma {s}: max difference {error:.2e} from torchvision"


def test_blur_sigma_range_and_prob():
    # The blur of one white pixel on black is k(0)^2 at the pixel and k(1) * k(0) next to it, where
    # k is the 3-tap kernel of 32-pixel images and k(1) / k(0) = exp(-1 / (2 sigma^2)).
    torch.manual_seed(32)
    count = 4000
    images = torch.zeros(count, 3, 32, 32, dtype=torch.uint8)
    images[:, :, 16, 16] = 255
    recipe = unchanged_recipe(32, blur_prob=0.5, blur_sigma=(0.1, 2.0))
    out = common.augment_batch(images, recipe, normalize=False).double()
    centre, neighbour = out[:, 0, 16, 16], out[:, 0, 16, 15]
    blurred = neighbour > 0
    assert_frequency(blurred.sum().item(), count, 0.5, "blurred images")
    assert (centre[~blurred] > 1 - 1e-6).all(), "an image that was not blurred lost its white pixel"

    sigma = torch.sqrt(-0.5 / torch.log(neighbour[blurred] / centre[blurred]))
    assert_range_covered(sigma, 0.1, 2.0, "blur sigma", tol=1e-4)
    assert_mean(sigma, 1.05, "blur sigma")


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_solarize_prob_one(threshold):
    torch.manual_seed(33)
    images = random_images(8, 16, 16, seed=33)
    out = common.augment_batch(images, unchanged_recipe(16, solarize_prob=1.0, solarize_threshold=threshold),
                               normalize=False)
    expected = TF.solarize(images.float() / 255, threshold)
    error = (out - expected).abs().max().item()
    assert error < 1e-5, f"max difference {error:.2e} from torchvision's solarize"


def test_flip_prob_one():
    torch.manual_seed(34)
    images = random_images(8, 16, 16, seed=34)
    out = common.augment_batch(images, unchanged_recipe(16, flip_prob=1.0), normalize=False)
    error = (out - TF.hflip(images.float() / 255)).abs().max().item()
    assert error < 1e-5, f"max difference {error:.2e} from torchvision's hflip"


def test_grayscale_prob_one():
    torch.manual_seed(35)
    images = random_images(8, 16, 16, seed=35)
    out = common.augment_batch(images, unchanged_recipe(16, grayscale_prob=1.0), normalize=False)
    expected = TF.rgb_to_grayscale(images.float() / 255, num_output_channels=3)
    error = (out - expected).abs().max().item()
    assert error < 1e-5, f"max difference {error:.2e} from torchvision's rgb_to_grayscale"


@pytest.mark.parametrize("crop", [True, False], ids=["crop", "uncropped"])
def test_identity_when_probs_zero(crop):
    torch.manual_seed(36)
    images = random_images(16, 24, 24, seed=36)
    out = common.augment_batch(images, unchanged_recipe(24), crop=crop)
    restored = out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    error = (restored - images.float() / 255).abs().max().item()
    assert error < 1e-5, f"max difference {error:.2e} from the unchanged images"


# ----------------------------------------------------------------------------------------------
# Crop and resize against torchvision's resize
# ----------------------------------------------------------------------------------------------

# (top, left, height, width, output side) on a 40 x 64 image
CROP_CASES = {
    "down": (3, 5, 30, 50, 24),
    "whole_down": (0, 0, 40, 64, 17),
    "up": (7, 9, 10, 14, 32),
    "up_down": (2, 40, 6, 24, 16),
    "down_up": (10, 3, 25, 5, 20),
    "same_size": (0, 0, 40, 40, 40),
    "corner": (33, 57, 7, 7, 9),
}


def crop_with_weights(image: torch.Tensor, top: int, left: int, h: int, w: int, size: int) -> torch.Tensor:
    """Crop and resize a float image (3, H, W) with `resize_weights`."""
    rows = common.resize_weights(torch.tensor([float(top)]), torch.tensor([float(h)]), image.shape[1], size)[0]
    cols = common.resize_weights(torch.tensor([float(left)]), torch.tensor([float(w)]), image.shape[2], size)[0]
    return rows @ image @ cols.T


@pytest.mark.parametrize("case", sorted(CROP_CASES))
def test_resize_weights_match_tensor_resize(case):
    top, left, h, w, size = CROP_CASES[case]
    image = random_images(1, 40, 64, seed=40)[0].float()
    expected = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
    error = (crop_with_weights(image, top, left, h, w, size) - expected).abs().max().item()
    assert error < 1e-3, f"max difference {error:.2e} grey levels from torchvision's tensor resize"


@pytest.mark.parametrize("case", sorted(CROP_CASES))
def test_resize_weights_match_pil(case):
    # PIL rounds to whole grey levels after each of its two passes, so it may differ by up to 1.
    top, left, h, w, size = CROP_CASES[case]
    image = random_images(1, 40, 64, seed=41)[0]
    expected = TF.pil_to_tensor(TF.resized_crop(TF.to_pil_image(image), top, left, h, w, [size, size])).float()
    error = (crop_with_weights(image.float(), top, left, h, w, size) - expected).abs().max().item()
    assert error <= 1.01, f"max difference {error:.3f} grey levels from PIL's resize"


@pytest.mark.parametrize("height, width", [(40, 64), (64, 40), (30, 30)], ids=["wide", "tall", "square"])
def test_crop_matrices_resize_crop(height, width):
    size, fraction, count = 24, 0.75, 400
    torch.manual_seed(42)
    image = random_images(1, height, width, seed=42)[0].float()
    recipe = common.AugmentRecipe(size, MEAN, STD, resize_crop=fraction)
    rows, cols = common.crop_matrices(count, height, width, recipe, torch.device("cpu"))
    assert rows.shape == (count, size, height), f"row matrices have shape {tuple(rows.shape)}"
    assert cols.shape == (count, size, width), f"column matrices have shape {tuple(cols.shape)}"
    out = rows.unsqueeze(1) @ image @ cols.transpose(1, 2).unsqueeze(1)  # (count, 3, S, S)

    resized = T.Resize(round(size / fraction), antialias=True)(image)  # (3, h, w)
    crops = resized.unfold(1, size, 1).unfold(2, size, 1)  # (3, free rows + 1, free columns + 1, S, S)
    free_rows, free_cols = crops.shape[1] - 1, crops.shape[2] - 1
    crops = crops.permute(1, 2, 0, 3, 4).reshape(-1, 3 * size * size)
    distance = torch.cdist(out.reshape(count, -1), crops, p=float("inf"))  # (count, offsets)
    error, best = distance.min(dim=1)
    assert error.max() < 1e-3, f"a crop differs by {error.max():.2e} grey levels from every crop of the resized image"
    top, left = best // (free_cols + 1), best % (free_cols + 1)
    assert top.min() == 0, f"the smallest top offset is {top.min()}, not 0"
    assert top.max() == free_rows, f"the largest top offset is {top.max()}, not {free_rows}"
    assert left.min() == 0, f"the smallest left offset is {left.min()}, not 0"
    assert left.max() == free_cols, f"the largest left offset is {left.max()}, not {free_cols}"


def test_crop_matrices_rejects_small_resize():
    recipe = common.AugmentRecipe(24, MEAN, STD, resize_crop=1.2)  # resize the shorter side to 20 pixels
    with pytest.raises(common.ConfigError, match="smaller than the 24-pixel crop"):
        common.crop_matrices(2, 40, 64, recipe, torch.device("cpu"))


# ----------------------------------------------------------------------------------------------
# Whole batches
# ----------------------------------------------------------------------------------------------


def test_augment_output_type_and_range():
    torch.manual_seed(50)
    recipe = common.AugmentRecipe(16, MEAN, STD, jitter=(0.8, 0.8, 0.8, 0.2), jitter_prob=0.8, grayscale_prob=0.2,
                                  blur_prob=0.5, solarize_prob=0.2)
    images = random_images(64, 40, 64, seed=50)
    out = common.augment_batch(images, recipe, normalize=False)
    assert out.dtype == torch.float32, f"dtype {out.dtype}"
    assert out.shape == (64, 3, 16, 16), f"shape {tuple(out.shape)}"
    assert out.min() >= 0, f"minimum {out.min():.3g} below 0 before normalisation"
    assert out.max() <= 1, f"maximum {out.max():.3g} above 1 before normalisation"


def test_views_differ():
    torch.manual_seed(51)
    recipe = common.simclr_recipe(16, MEAN, STD, strength=0.5, blur=False)
    image = random_images(1, 32, 32, seed=51)
    views = common.augment_batch(image.expand(32, -1, -1, -1), recipe).flatten(1)
    distance = torch.cdist(views, views)
    distance.fill_diagonal_(float("inf"))
    assert distance.min() > 1e-3, "two views of the same image in one batch are equal"
    first, second = common.augment_batch(image, recipe), common.augment_batch(image, recipe)
    assert not torch.allclose(first, second), "two calls on the same image return the same view"


def test_augment_uncropped_rejects_wrong_size():
    images = random_images(2, 20, 24, seed=52)
    with pytest.raises(ValueError, match="uncropped images must be 24 x 24"):
        common.augment_batch(images, unchanged_recipe(24), crop=False)


# ----------------------------------------------------------------------------------------------
# Recipes against the per-image transforms
# ----------------------------------------------------------------------------------------------


def transform_fields(transform: T.Compose) -> dict:
    """Read the AugmentRecipe fields, and the blur kernel size, off a Compose of torchvision transforms."""
    fields = dict(flip_prob=0.0, jitter=(0.0, 0.0, 0.0, 0.0), jitter_prob=0.0, grayscale_prob=0.0,
                  grayscale_before_jitter=False, blur_prob=0.0, solarize_prob=0.0, resize_crop=None)
    jitter_seen = False
    for step in transform.transforms:
        prob = 1.0
        if isinstance(step, T.RandomApply):
            assert len(step.transforms) == 1, f"RandomApply of {len(step.transforms)} transforms: {step}"
            prob, step = step.p, step.transforms[0]
        if isinstance(step, T.RandomResizedCrop):
            fields.update(image_size=step.size[0], crop_scale=tuple(step.scale), crop_ratio=tuple(step.ratio))
        elif isinstance(step, T.RandomHorizontalFlip):
            fields["flip_prob"] = prob * step.p
        elif isinstance(step, T.ColorJitter):
            # ColorJitter stores the factor ranges [max(0, 1 - s), 1 + s] and the hue range [-s, s].
            ranges = (step.brightness, step.contrast, step.saturation)
            strengths = [0.0 if r is None else r[1] - 1 for r in ranges]
            strengths.append(0.0 if step.hue is None else step.hue[1])
            fields.update(jitter=tuple(strengths), jitter_prob=prob)
            jitter_seen = True
        elif isinstance(step, T.RandomGrayscale):
            fields.update(grayscale_prob=prob * step.p, grayscale_before_jitter=not jitter_seen)
        elif isinstance(step, T.GaussianBlur):
            fields.update(blur_prob=prob, blur_sigma=tuple(step.sigma), blur_kernel=tuple(step.kernel_size))
        elif isinstance(step, T.Normalize):
            fields.update(mean=tuple(step.mean), std=tuple(step.std))
        elif not isinstance(step, T.ToTensor):
            raise AssertionError(f"unexpected step {step}")
    return fields


# The per-image transform and the recipe of each method, built from the same arguments.
BUILDERS = {"simclr": (common.simclr_augmentation, common.simclr_recipe),
            "moco": (common.moco_augmentation, common.moco_recipe)}
RECIPE_CASES = {
    "simclr_cifar": ("simclr", dict(image_size=32, strength=0.5, blur=False)),
    "simclr_cifar_blur": ("simclr", dict(image_size=32, strength=0.5, blur=True)),
    "simclr_imagenet": ("simclr", dict(image_size=224, strength=1.0, blur=True)),
    "simclr_stl": ("simclr", dict(image_size=96, strength=1.0, blur=False)),
    "moco_v1": ("moco", dict(image_size=32, aug_plus=False, blur=False)),
    "moco_v1_blur": ("moco", dict(image_size=224, aug_plus=False, blur=True)),
    "moco_v2": ("moco", dict(image_size=32, aug_plus=True, blur=False)),
    "moco_v2_blur": ("moco", dict(image_size=224, aug_plus=True, blur=True)),
    "moco_v2_scale": ("moco", dict(image_size=96, aug_plus=True, blur=True, min_crop_scale=0.08)),
}


@pytest.mark.parametrize("case", sorted(RECIPE_CASES))
def test_recipe_matches_transform(case):
    method, arguments = RECIPE_CASES[case]
    build_transform, build_recipe = BUILDERS[method]
    fields = transform_fields(build_transform(mean=MEAN, std=STD, **arguments))
    recipe = build_recipe(mean=MEAN, std=STD, **arguments)

    for name in ("image_size", "resize_crop"):
        assert getattr(recipe, name) == fields[name], (
            f"{name}: recipe {getattr(recipe, name)}, transform {fields[name]}")
    for name in ("mean", "std", "crop_scale", "crop_ratio", "flip_prob", "jitter", "jitter_prob", "grayscale_prob",
                 "blur_prob", "solarize_prob"):
        assert getattr(recipe, name) == pytest.approx(fields[name], abs=1e-9), (
            f"{name}: recipe {getattr(recipe, name)}, transform {fields[name]}")
    if fields["jitter_prob"] > 0 and fields["grayscale_prob"] > 0:
        assert recipe.grayscale_before_jitter == fields["grayscale_before_jitter"], (
            f"grayscale_before_jitter: recipe {recipe.grayscale_before_jitter}, "
            f"transform {fields['grayscale_before_jitter']}")
    if fields["blur_prob"] > 0:
        assert recipe.blur_sigma == pytest.approx(fields["blur_sigma"]), (
            f"blur_sigma: recipe {recipe.blur_sigma}, transform {fields['blur_sigma']}")
        kernel = common.blur_kernel_size(recipe.image_size)
        assert fields["blur_kernel"] == (kernel, kernel), (
            f"blur kernel: augment_batch uses {kernel}, transform {fields['blur_kernel']}")


def test_crop_transform_steps():
    recipe = common.AugmentRecipe(24, MEAN, STD, crop_scale=(0.3, 0.9), crop_ratio=(0.5, 2.0))
    steps = common.crop_transform(recipe).transforms
    assert [type(step) for step in steps] == [T.RandomResizedCrop, T.PILToTensor], f"steps {steps}"
    assert steps[0].size == (24, 24), f"crop size {steps[0].size}"
    assert tuple(steps[0].scale) == (0.3, 0.9), f"crop scale {steps[0].scale}"
    assert tuple(steps[0].ratio) == (0.5, 2.0), f"crop ratio {steps[0].ratio}"

    recipe = common.AugmentRecipe(24, MEAN, STD, resize_crop=0.75)
    transform = common.crop_transform(recipe)
    steps = transform.transforms
    assert [type(step) for step in steps] == [T.Resize, T.RandomCrop, T.PILToTensor], f"steps {steps}"
    assert steps[0].size == 32, f"resize to {steps[0].size}"
    assert steps[1].size == (24, 24), f"crop size {steps[1].size}"
    out = transform(TF.to_pil_image(random_images(1, 40, 64, seed=60)[0]))
    assert out.dtype == torch.uint8, f"dtype {out.dtype}"
    assert out.shape == (3, 24, 24), f"shape {tuple(out.shape)}"


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    """Clear torch.compile's caches before and after the test, so that no test reuses another's graphs."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("changes", [dict(flip_prob=0.5), dict(grayscale_prob=0.2, solarize_prob=0.2)],
                         ids=["crop_flip", "grayscale_normalize"])
def test_compile_without_jitter_no_graph_break(changes, fresh_dynamo):
    recipe = common.AugmentRecipe(16, MEAN, STD, **changes)
    images = random_images(4, 20, 24, seed=70)
    explanation = torch._dynamo.explain(common.augment_batch)(images, recipe)
    reasons = [f"{reason.reason.splitlines()[0]} at {reason.user_stack[-1].filename}:{reason.user_stack[-1].lineno}"
               for reason in explanation.break_reasons]
    assert explanation.graph_break_count == 0, f"{explanation.graph_break_count} graph breaks: {reasons}"


def test_compile_full_recipe(fresh_dynamo):
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler as error:
        pytest.fail(f"torch.compile on the CPU needs a C++ compiler; install g++ or set CXX ({error})")
    torch.manual_seed(71)
    recipe = common.simclr_recipe(16, MEAN, STD, strength=1.0, blur=True)
    images = random_images(4, 20, 24, seed=71)
    start = time.perf_counter()
    out = torch.compile(common.augment_batch)(images, recipe)
    seconds = time.perf_counter() - start
    print(f"torch.compile of the full SimCLR recipe: {seconds:.1f} s")
    assert out.shape == (4, 3, 16, 16), f"shape {tuple(out.shape)}"
    assert out.dtype == torch.float32, f"dtype {out.dtype}"
    assert torch.isfinite(out).all(), "the compiled augmentation returned non-finite values"
