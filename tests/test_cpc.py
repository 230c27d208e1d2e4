"""infonce_cpc.py against plain-loop references and hand-computed values: the InfoNCE loss, the
causality of the context network and the whole model, the patch-grid helpers of common.py, the
per-patch augmentation and the training transform."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn

import common
from infonce_cpc import CPC, Args, ContextNetwork, PatchViews, info_nce


def reference_info_nce(predictions: torch.Tensor, targets_all: torch.Tensor, skip: int, tau: float,
                       offset: int) -> tuple[torch.Tensor, float]:
    """Compute CPC's InfoNCE by Python loops over torch scalars, so autograd gives reference gradients.

    The prediction of step k at (image n, row i, column j) has as candidates every target of
    targets_all (B, D, G, G) in (image, row, column) order. Its true target is at
    (offset + n, i + k + skip, j), and its loss is log(sum_m exp(p.t_m / tau)) - p.t_true / tau.
    Returns the loss averaged over positions, then over steps, and the top-1 accuracy averaged the
    same way.
    """
    steps, n, _, g, _ = predictions.shape
    b = targets_all.shape[0]
    step_losses, step_accuracies = [], []
    for k in range(1, steps + 1):
        losses, hits = [], 0
        for image in range(n):
            for row in range(g - k - skip):
                for column in range(g):
                    p = predictions[k - 1, image, :, row, column]
                    true_position = (offset + image, row + k + skip, column)
                    logits, true_indices = [], []
                    for other in range(b):
                        for target_row in range(g):
                            for target_column in range(g):
                                if (other, target_row, target_column) == true_position:
                                    true_indices.append(len(logits))
                                logits.append(torch.dot(p, targets_all[other, :, target_row, target_column]) / tau)
                    assert len(true_indices) == 1, f"true target found {len(true_indices)} times"
                    true_index = true_indices[0]

                    denominator = sum(torch.exp(logit) for logit in logits)
                    losses.append(torch.log(denominator) - logits[true_index])
                    best = max(range(len(logits)), key=lambda m: logits[m].item())
                    hits += best == true_index
        step_losses.append(sum(losses) / len(losses))
        step_accuracies.append(hits / len(losses))
    return sum(step_losses) / steps, sum(step_accuracies) / steps


def random_inputs(steps: int, n: int, dim: int, g: int, b: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw float64 predictions (K, N, D, G, G) and targets_all (B, D, G, G) from N(0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    predictions = torch.randn(steps, n, dim, g, g, generator=generator, dtype=torch.float64)
    targets_all = torch.randn(b, dim, g, g, generator=generator, dtype=torch.float64)
    return predictions, targets_all


def one_hot_targets(b: int, g: int) -> torch.Tensor:
    """Build targets_all (B, D, G, G) with D = B*G*G where target (b, r, c) is the one-hot vector
    of its candidate index (b*G + r)*G + c, so all candidates are orthogonal."""
    count = b * g * g
    return torch.eye(count, dtype=torch.float64).view(b, g, g, count).permute(0, 3, 1, 2).contiguous()


def small_backbone(norm_layer) -> nn.Module:
    """Build a patch encoder (M, 3, 8, 8) -> (M, 8): two normalised 3x3 convolutions, then pooling."""
    return nn.Sequential(
        nn.Conv2d(3, 8, kernel_size=3, padding=1), norm_layer(8), nn.ReLU(),
        nn.Conv2d(8, 8, kernel_size=3, stride=2, padding=1), norm_layer(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )


# The three default patch grids: patches a quarter of the image side, starting every eighth of it,
# so G = 7.
DEFAULT_GRIDS = [(32, 8, 4), (64, 16, 8), (256, 64, 32)]

# (K, N, D, G, skip, tau, B, offset). B = 2N with offset N is rank 1 of 2, and offset 1 with
# N = 1 and B = 3 is the middle one of three processes.
LOSS_CASES = [
    (1, 2, 3, 3, 0, 1.0, 2, 0),
    (2, 2, 4, 4, 1, 0.5, 2, 0),
    (3, 1, 5, 5, 0, 0.1, 1, 0),
    (2, 2, 4, 4, 1, 0.5, 4, 2),
    (1, 1, 2, 3, 1, 2.0, 3, 1),
]
LOSS_IDS = ["one step", "two steps skip one", "three steps tau 0.1", "rank 1 of 2", "rank 1 of 3"]


# ---------------------------------------------------------------------------------------------
# info_nce: plain-loop reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps, n, dim, g, skip, tau, b, offset", LOSS_CASES, ids=LOSS_IDS)
def test_info_nce_matches_loop_reference(steps, n, dim, g, skip, tau, b, offset):
    predictions, targets_all = random_inputs(steps, n, dim, g, b, seed=steps * 100 + g * 10 + b)
    loss, accuracy = info_nce(predictions, targets_all, skip, tau, offset)
    expected_loss, expected_accuracy = reference_info_nce(predictions, targets_all, skip, tau, offset)
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-12)
    # info_nce averages hits in float32, which is exact to about 1e-7 for these few predictions.
    assert accuracy.item() == pytest.approx(expected_accuracy, abs=1e-6)


@pytest.mark.parametrize("steps, n, dim, g, skip, tau, b, offset", LOSS_CASES, ids=LOSS_IDS)
def test_info_nce_gradients_match_reference(steps, n, dim, g, skip, tau, b, offset):
    predictions, targets_all = random_inputs(steps, n, dim, g, b, seed=steps * 100 + g * 10 + b + 1)

    predictions_leaf = predictions.clone().requires_grad_(True)
    targets_leaf = targets_all.clone().requires_grad_(True)
    loss, _ = info_nce(predictions_leaf, targets_leaf, skip, tau, offset)
    loss.backward()

    reference_predictions = predictions.clone().requires_grad_(True)
    reference_targets = targets_all.clone().requires_grad_(True)
    expected_loss, _ = reference_info_nce(reference_predictions, reference_targets, skip, tau, offset)
    expected_loss.backward()

    torch.testing.assert_close(predictions_leaf.grad, reference_predictions.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(targets_leaf.grad, reference_targets.grad, rtol=1e-10, atol=1e-12)
    # The targets of the other processes are negatives, so they get gradient too.
    assert targets_leaf.grad.abs().sum().item() > 0


# ---------------------------------------------------------------------------------------------
# info_nce: values computed by hand
# ---------------------------------------------------------------------------------------------


def two_image_grid() -> tuple[torch.Tensor, torch.Tensor]:
    """Build float64 predictions (K=1, N=2, D=2, G=2, G=2) and targets (2, 2, 2, 2) for the
    hand-computed cases. With G=2, K=1 and skip 0, context row 0 predicts row 1 in the same
    column, so each image has one prediction per column and every prediction has 2*2*2 = 8
    candidates.

    Predictions of image 0 are [1, 0], those of image 1 are [0, 1]. Row 1 of the predictions has
    no target row and is set to 100, which info_nce must ignore. Every target is [1, 0]."""
    predictions = torch.zeros(1, 2, 2, 2, 2, dtype=torch.float64)
    predictions[0, 0, 0, 0, :] = 1.0  # image 0, row 0, both columns: [1, 0]
    predictions[0, 1, 1, 0, :] = 1.0  # image 1, row 0, both columns: [0, 1]
    predictions[0, :, :, 1, :] = 100.0
    targets = torch.zeros(2, 2, 2, 2, dtype=torch.float64)
    targets[:, 0] = 1.0
    return predictions, targets


def test_info_nce_normalises_over_candidates():
    # z0 = z1 = [1, 0] at every position. Image 0's predictions score 1 with all 8 candidates and
    # image 1's score 0 with all 8, so each prediction's softmax over its own candidates is uniform:
    # l = log(8 e^1) - 1 = log(8 e^0) - 0 = log 8.
    # Normalising over the 4 predictions instead would give every target the scores [1, 1, 0, 0],
    # and the loss (log(2e + 2) - 1 + log(2e + 2)) / 2 = log(2e + 2) - 1/2, about 1.506.
    predictions, targets = two_image_grid()
    loss, _ = info_nce(predictions, targets, skip=0)
    assert loss.item() == pytest.approx(math.log(8), abs=1e-12)


def test_info_nce_log_sum_exp_by_hand():
    # As above with tau = 0.5, but the 4 targets in row 0 (never a true target) are [0, 0].
    # Image 0's predictions [1, 0]: 4 candidates score 0 and 4 (row 1, the true one among them)
    # score 1/0.5 = 2, so l = log(4 e^0 + 4 e^2) - 2. Image 1's predictions [0, 1] score 0 with all
    # 8 candidates: l = log 8. The loss is the mean of 2 predictions of each image.
    predictions, targets = two_image_grid()
    targets[:, :, 0, :] = 0.0
    loss, _ = info_nce(predictions, targets, skip=0, tau=0.5)
    image0 = math.log(4 + 4 * math.exp(2)) - 2
    image1 = math.log(8)
    assert loss.item() == pytest.approx((2 * image0 + 2 * image1) / 4, abs=1e-12)


# (K, N, G, skip, B, offset)
IDENTICAL_CASES = [(1, 2, 2, 0, 2, 0), (2, 3, 4, 1, 3, 0), (3, 1, 5, 1, 1, 0), (2, 2, 4, 0, 6, 4)]


@pytest.mark.parametrize("steps, n, g, skip, b, offset", IDENTICAL_CASES)
def test_info_nce_identical_encodings_give_log_candidates(steps, n, g, skip, b, offset):
    # Every score is v.v / tau, so each softmax is uniform over its B*G*G candidates.
    v = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    predictions = v.view(1, 1, 3, 1, 1).expand(steps, n, 3, g, g).contiguous()
    targets_all = v.view(1, 3, 1, 1).expand(b, 3, g, g).contiguous()
    loss, _ = info_nce(predictions, targets_all, skip, tau=0.7, offset=offset)
    assert loss.item() == pytest.approx(math.log(b * g * g), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# info_nce: labels and input checks
# ---------------------------------------------------------------------------------------------

# (K, N, G, skip, B, offset)
LABEL_CASES = [(1, 2, 3, 0, 2, 0), (2, 2, 4, 1, 2, 0), (2, 1, 4, 1, 2, 1), (1, 2, 3, 1, 4, 2)]
LABEL_IDS = ["one step", "two steps skip one", "rank 1 of 2 one image", "rank 1 of 2"]


def pointing_predictions(steps: int, n: int, g: int, skip: int, b: int, offset: int, scale: float,
                         image_shift: int = 0, row_shift: int = 0, column_shift: int = 0) -> torch.Tensor:
    """Build predictions for one_hot_targets(b, g). Each prediction that has a target is `scale`
    times the one-hot vector of its true target, moved by the shifts modulo B or G. The rows
    without a target row stay 0."""
    count = b * g * g
    predictions = torch.zeros(steps, n, count, g, g, dtype=torch.float64)
    for k in range(1, steps + 1):
        for image in range(n):
            for row in range(g - k - skip):
                for column in range(g):
                    target_image = (offset + image + image_shift) % b
                    target_row = (row + k + skip + row_shift) % g
                    target_column = (column + column_shift) % g
                    index = (target_image * g + target_row) * g + target_column
                    predictions[k - 1, image, index, row, column] = scale
    return predictions


@pytest.mark.parametrize("steps, n, g, skip, b, offset", LABEL_CASES, ids=LABEL_IDS)
def test_info_nce_true_target_counted_once(steps, n, g, skip, b, offset):
    # Orthogonal one-hot targets and predictions 5 times their true target: the true candidate
    # scores s = 5/tau and the other M-1 score 0, so l = log(e^s + M - 1) - s. A true target
    # counted twice would give log(2 e^s + M - 2) - s.
    tau = 0.5
    s = 5 / tau
    candidates = b * g * g
    predictions = pointing_predictions(steps, n, g, skip, b, offset, scale=5.0)
    loss, accuracy = info_nce(predictions, one_hot_targets(b, g), skip, tau, offset)
    assert accuracy.item() == 1.0
    assert loss.item() == pytest.approx(math.log(math.exp(s) + candidates - 1) - s, rel=1e-12)


@pytest.mark.parametrize("steps, n, g, skip, b, offset", LABEL_CASES, ids=LABEL_IDS)
@pytest.mark.parametrize("image_shift, row_shift, column_shift", [(1, 0, 0), (0, 1, 0), (0, 0, 1)],
                         ids=["next image", "next row", "next column"])
def test_info_nce_wrong_target_scores_zero(steps, n, g, skip, b, offset, image_shift, row_shift, column_shift):
    # Each prediction points at a candidate next to its true target, whose score is then 0 while
    # the pointed-at one scores s: accuracy 0 and l = log(e^s + M - 1).
    s = 5.0
    candidates = b * g * g
    predictions = pointing_predictions(steps, n, g, skip, b, offset, s, image_shift, row_shift, column_shift)
    loss, accuracy = info_nce(predictions, one_hot_targets(b, g), skip, 1.0, offset)
    assert accuracy.item() == 0.0
    assert loss.item() == pytest.approx(math.log(math.exp(s) + candidates - 1), rel=1e-12)


@pytest.mark.parametrize(
    "predictions_shape, targets_shape, offset",
    [
        ((1, 2, 3, 4, 4), (2, 5, 4, 4), 0),
        ((1, 2, 3, 4, 4), (2, 3, 5, 5), 0),
        ((1, 2, 3, 4, 4), (2, 3, 4, 5), 0),
        ((1, 2, 3, 4, 5), (2, 3, 4, 4), 0),
    ],
    ids=["feature width", "grid side", "targets not square", "predictions not square"],
)
def test_info_nce_rejects_mismatched_shapes(predictions_shape, targets_shape, offset):
    with pytest.raises(ValueError, match="do not match"):
        info_nce(torch.zeros(predictions_shape), torch.zeros(targets_shape), skip=0, offset=offset)


@pytest.mark.parametrize("offset", [2, -1])
def test_info_nce_rejects_offset_out_of_range(offset):
    # Two images of this process cannot start at row 2 of three gathered images, nor before row 0.
    with pytest.raises(ValueError, match=f"offset {offset} leaves no room for this process's 2 images"):
        info_nce(torch.zeros(1, 2, 3, 4, 4), torch.zeros(3, 3, 4, 4), skip=0, offset=offset)


def test_info_nce_rejects_negative_skip():
    with pytest.raises(ValueError, match="skip -1 must not be negative"):
        info_nce(torch.zeros(1, 2, 3, 4, 4), torch.zeros(2, 3, 4, 4), skip=-1)


@pytest.mark.parametrize("steps, g, skip", [(2, 3, 1), (2, 2, 0), (1, 1, 0), (5, 6, 1)])
def test_info_nce_rejects_grid_too_small(steps, g, skip):
    # Only the G - K - skip top rows have a target K + skip rows below, and info_nce needs one.
    with pytest.raises(ValueError, match="leaves no context row"):
        info_nce(torch.zeros(steps, 2, 3, g, g), torch.zeros(2, 3, g, g), skip)


def test_info_nce_accepts_one_context_row():
    # G=7, K=5, skip 1 (the CIFAR defaults) leave exactly one context row for step 5.
    predictions, targets_all = random_inputs(5, 1, 2, 7, 1, seed=0)
    loss, _ = info_nce(predictions, targets_all, skip=1)
    expected, _ = reference_info_nce(predictions, targets_all, 1, 1.0, 0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# ContextNetwork and CPC: no information from the rows below
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_context_ignores_changes_below(blocks):
    torch.manual_seed(blocks)
    context = ContextNetwork(dim=4, hidden=6, blocks=blocks).double()
    g = 6
    z = torch.randn(2, 4, g, g, dtype=torch.float64)
    c = context(z)
    for i in range(g - 1):
        changed = z.clone()
        changed[:, :, i + 1:] += torch.randn(2, 4, g - i - 1, g, dtype=torch.float64)
        c_changed = context(changed)
        torch.testing.assert_close(c_changed[:, :, : i + 1], c[:, :, : i + 1], rtol=0, atol=0,
                                   msg=lambda message: f"rows 0..{i} changed: {message}")
        assert not torch.equal(c_changed[:, :, i + 1], c[:, :, i + 1]), f"row {i + 1} ignores its own z"


@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_context_gradient_rows(blocks):
    # Each block's 2x3 convolution reaches one row up, so c at row i depends on z rows
    # i - blocks .. i and on no row below i.
    torch.manual_seed(blocks)
    context = ContextNetwork(dim=4, hidden=6, blocks=blocks).double()
    g = 6
    z = torch.randn(2, 4, g, g, dtype=torch.float64, requires_grad=True)
    for i in range(g):
        (gradient,) = torch.autograd.grad(context(z)[:, :, i, :].sum(), z)
        first_seen = max(0, i - blocks)
        assert (gradient[:, :, i + 1:] == 0).all(), f"c row {i} depends on z rows below it"
        assert (gradient[:, :, :first_seen] == 0).all(), f"c row {i} depends on z rows above {first_seen}"
        for row in range(first_seen, i + 1):
            assert (gradient[:, :, row] != 0).any(), f"c row {i} does not depend on z row {row}"


def prediction_row_gradients(model: CPC, patches: torch.Tensor, row: int) -> torch.Tensor:
    """Compute the maximum absolute gradient of the sum of the predictions at `row` with respect
    to each patch row: a (G,) tensor."""
    patches = patches.clone().requires_grad_(True)
    predictions, _ = model(patches)  # (K, N, F, G, G)
    (gradient,) = torch.autograd.grad(predictions[:, :, :, row, :].sum(), patches)  # (N, G, G, 3, P, P)
    return gradient.abs().transpose(0, 1).flatten(1).max(dim=1).values


@pytest.mark.parametrize("row", range(4))
def test_cpc_predictions_causal_with_layer_norm(row):
    torch.manual_seed(0)
    model = CPC(small_backbone(common.norm_layer("layer")), 8, pred_steps=2, context_blocks=2,
                context_width=8).double().train()
    patches = torch.randn(2, 4, 4, 3, 8, 8, dtype=torch.float64)
    gradient = prediction_row_gradients(model, patches, row)
    # Two context blocks: the predictions at row i see patch rows i-2 .. i.
    for patch_row in range(max(0, row - 2), row + 1):
        assert gradient[patch_row].item() > 0, f"predictions at row {row} ignore patch row {patch_row}"
    for patch_row in range(row + 1, 4):
        assert gradient[patch_row].item() == 0, f"predictions at row {row} depend on patch row {patch_row}"


@pytest.mark.parametrize("row", range(3))
def test_cpc_batch_norm_leaks_rows_below(row):
    # BatchNorm in training mode normalises with statistics over all patches of the batch, so every
    # prediction depends on the patches it must predict, the shortcut that per-patch
    # normalisation avoids.
    torch.manual_seed(0)
    model = CPC(small_backbone(nn.BatchNorm2d), 8, pred_steps=2, context_blocks=2,
                context_width=8).double().train()
    patches = torch.randn(2, 4, 4, 3, 8, 8, dtype=torch.float64)
    gradient = prediction_row_gradients(model, patches, row)
    for patch_row in range(row + 1, 4):
        assert gradient[patch_row].item() > 0, f"BatchNorm predictions at row {row} ignore patch row {patch_row}"


@pytest.mark.parametrize("norm, leaks", [("layer", False), ("batch", True)])
def test_cpc_resnet18_leak_by_norm(norm, leaks):
    # The real encoder: a CIFAR-stem ResNet-18 on 8-pixel patches with the normalisation that
    # infonce_cpc.py builds ("layer") and with torchvision's default BatchNorm ("batch").
    torch.manual_seed(0)
    backbone, feature_dim = common.build_backbone("resnet18", cifar_stem=True, norm_layer=common.norm_layer(norm))
    model = CPC(backbone, feature_dim, pred_steps=1, context_blocks=1, context_width=16).train()
    gradient = prediction_row_gradients(model, torch.randn(1, 3, 3, 3, 8, 8), row=0)
    assert gradient[0].item() > 0
    if leaks:
        assert gradient[1:].min().item() > 0, f"BatchNorm shows no leak: {gradient.tolist()}"
    else:
        assert gradient[1:].max().item() == 0, f"row 0 depends on rows below: {gradient.tolist()}"


def test_cpc_targets_depend_on_own_patch():
    # With per-patch normalisation and the 1x1 target projection, target (r, c) is a function of
    # patch (r, c) alone.
    torch.manual_seed(0)
    model = CPC(small_backbone(common.norm_layer("layer")), 8, pred_steps=1, context_blocks=1,
                context_width=8, target_projection=True).double().train()
    g = 3
    patches = torch.randn(2, g, g, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    _, targets = model(patches)  # (N, F, G, G)
    for r in range(g):
        for c in range(g):
            (gradient,) = torch.autograd.grad(targets[:, :, r, c].sum(), patches, retain_graph=True)
            per_patch = gradient.abs().sum(dim=(0, 3, 4, 5))  # (G, G)
            others = per_patch.clone()
            others[r, c] = 0
            assert per_patch[r, c].item() > 0, f"target ({r}, {c}) ignores its own patch"
            assert others.max().item() == 0, f"target ({r}, {c}) depends on other patches: {per_patch.tolist()}"


# ---------------------------------------------------------------------------------------------
# Patch grid: common.patch_grid_side and common.extract_patches
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_size, patch_size, stride", DEFAULT_GRIDS)
def test_grid_side_defaults(image_size, patch_size, stride):
    assert common.patch_grid_side(image_size, patch_size, stride) == 7


@pytest.mark.parametrize("image_size, patch_size, stride, expected",
                         [(33, 8, 4, 7), (35, 8, 4, 7), (36, 8, 4, 8), (8, 8, 4, 1), (32, 8, 8, 4)])
def test_grid_side_other_sizes(image_size, patch_size, stride, expected):
    # Pixels past the last full patch are left out.
    assert common.patch_grid_side(image_size, patch_size, stride) == expected


@pytest.mark.parametrize("image_size, patch_size, stride", [(32, 40, 4), (32, 8, 0), (32, 0, 4), (32, 8, -4)],
                         ids=["patch larger than image", "stride 0", "patch 0", "negative stride"])
def test_grid_side_rejects_bad_sizes(image_size, patch_size, stride):
    with pytest.raises(common.ConfigError):
        common.patch_grid_side(image_size, patch_size, stride)


@pytest.mark.parametrize("image_size, patch_size, stride", DEFAULT_GRIDS)
def test_extract_patches_shape(image_size, patch_size, stride):
    images = torch.rand(2, 3, image_size, image_size)
    patches = common.extract_patches(images, patch_size, stride)
    assert patches.shape == (2, 7, 7, 3, patch_size, patch_size)


@pytest.mark.parametrize("image_size, patch_size, stride", DEFAULT_GRIDS)
def test_extract_patches_match_slices(image_size, patch_size, stride):
    images = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(image_size))
    patches = common.extract_patches(images, patch_size, stride)
    for i in range(7):
        for j in range(7):
            expected = images[:, :, i * stride : i * stride + patch_size, j * stride : j * stride + patch_size]
            assert torch.equal(patches[:, i, j], expected), f"patch ({i}, {j})"


@pytest.mark.parametrize("image_size, patch_size, stride", DEFAULT_GRIDS)
def test_extract_patches_overlap_half(image_size, patch_size, stride):
    # stride = P/2: the right half of patch (i, j) is the left half of (i, j+1), and its bottom half
    # is the top half of (i+1, j).
    half = patch_size // 2
    images = torch.rand(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    patches = common.extract_patches(images, patch_size, stride)[0]  # (G, G, 3, P, P)
    for i in range(6):
        for j in range(6):
            assert torch.equal(patches[i, j, :, :, half:], patches[i, j + 1, :, :, :half]), f"({i}, {j}) and right"
            assert torch.equal(patches[i, j, :, half:, :], patches[i + 1, j, :, :half, :]), f"({i}, {j}) and below"
    # Patches two steps apart share nothing, so the overlap is exactly half a patch.
    assert not torch.equal(patches[0, 0, :, :, half:], patches[0, 2, :, :, :half])


# ---------------------------------------------------------------------------------------------
# PatchPooledEncoder and build_encoder
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True])
def test_pooled_encoder_matches_loop(channels_last):
    torch.manual_seed(0)
    backbone = small_backbone(common.norm_layer("layer")).double().eval()
    encoder = common.PatchPooledEncoder(backbone, patch_size=8, stride=4)
    images = torch.rand(2, 3, 16, 16, dtype=torch.float64)  # a 3 x 3 grid
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        output = encoder(images)
        expected = []
        for image in images:
            codes = [backbone(image[:, i * 4 : i * 4 + 8, j * 4 : j * 4 + 8].unsqueeze(0))[0]
                     for i in range(3) for j in range(3)]
            expected.append(sum(codes) / len(codes))
    assert output.shape == (2, 8)
    torch.testing.assert_close(output, torch.stack(expected), rtol=1e-12, atol=1e-12)


def test_build_encoder_cpc_checkpoint():
    meta = {"arch": "resnet18", "cifar_stem": True, "feature_dim": 512, "norm": "layer", "patch_size": 8,
            "patch_stride": 4}
    encoder, resnet, feature_dim = common.build_encoder(meta, "resnet18")
    assert isinstance(encoder, common.PatchPooledEncoder)
    assert encoder.backbone is resnet
    assert (encoder.patch_size, encoder.stride) == (8, 4)
    assert feature_dim == 512
    assert not any(isinstance(module, nn.BatchNorm2d) for module in resnet.modules())
    assert any(isinstance(module, nn.GroupNorm) and module.num_groups == 1 for module in resnet.modules())


def test_build_encoder_plain_checkpoint():
    # Checkpoints of the other methods record no patch grid and no normalisation: the ResNet itself.
    meta = {"arch": "resnet18", "cifar_stem": True, "feature_dim": 512}
    encoder, resnet, _ = common.build_encoder(meta, "resnet18")
    assert encoder is resnet
    assert any(isinstance(module, nn.BatchNorm2d) for module in resnet.modules())


# ---------------------------------------------------------------------------------------------
# common.jitter_batch on patches
# ---------------------------------------------------------------------------------------------


def random_patches(m: int, seed: int) -> torch.Tensor:
    return torch.rand(m, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_augment_without_changes_is_identity():
    x = random_patches(12, seed=0)
    torch.manual_seed(0)
    assert torch.equal(common.jitter_batch(x, jitter=0.4, jitter_prob=0.0, grayscale_prob=0.0), x)


def test_augment_grayscale_all_patches():
    x = random_patches(12, seed=1)
    torch.manual_seed(0)
    output = common.jitter_batch(x, jitter=0.4, jitter_prob=0.0, grayscale_prob=1.0)
    luma = 0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]  # torchvision's rgb_to_grayscale weights, (M, P, P)
    assert torch.equal(output[:, 0], output[:, 1])
    assert torch.equal(output[:, 0], output[:, 2])
    torch.testing.assert_close(output[:, 0], luma, rtol=0, atol=1e-6)


def test_augment_jitter_matches_torchvision():
    # common.jitter_batch draws, in this order, one uniform number per patch for "jittered?", then one
    # per patch for each of brightness, contrast and saturation, each factor 1 + (2u - 1) * jitter.
    # Re-seeding and drawing the same numbers gives the factors, and torchvision's adjust_* applied
    # per patch in the same order give the expected output.
    m, jitter, seed = 16, 0.4, 3
    x = random_patches(m, seed=2)
    torch.manual_seed(seed)
    output = common.jitter_batch(x, jitter=jitter, jitter_prob=1.0, grayscale_prob=0.0)

    torch.manual_seed(seed)
    torch.rand(m, 1, 1, 1)  # the draw that picks the jittered patches, all of them at jitter_prob 1
    brightness, contrast, saturation = (1 + (torch.rand(m) * 2 - 1) * jitter for _ in range(3))
    expected = []
    for i in range(m):
        patch = TF.adjust_brightness(x[i], brightness[i].item())
        patch = TF.adjust_contrast(patch, contrast[i].item())
        patch = TF.adjust_saturation(patch, saturation[i].item())
        expected.append(patch)
    torch.testing.assert_close(output, torch.stack(expected), rtol=0, atol=1e-6)


def test_augment_jitter_differs_per_patch():
    m = 16
    x = random_patches(1, seed=3).expand(m, -1, -1, -1).contiguous()  # one patch, 16 times
    torch.manual_seed(0)
    output = common.jitter_batch(x, jitter=0.4, jitter_prob=1.0, grayscale_prob=0.0)
    for i in range(m):
        for j in range(i + 1, m):
            assert not torch.equal(output[i], output[j]), f"patches {i} and {j} got the same jitter"


def test_augment_output_in_unit_range():
    x = random_patches(256, seed=4)
    x[:64] = 1.0  # white patches, where brightness factors above 1 must clip
    torch.manual_seed(0)
    output = common.jitter_batch(x, jitter=0.9, jitter_prob=1.0, grayscale_prob=0.5)
    assert output.min().item() >= 0
    assert output.max().item() <= 1


# ---------------------------------------------------------------------------------------------
# PatchViews
# ---------------------------------------------------------------------------------------------


def random_image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def all_zero_channels(views: torch.Tensor) -> torch.Tensor:
    """Count the all-zero channels of each patch of views (G, G, 3, P, P): a (G*G,) tensor."""
    return (views.flatten(0, 1) == 0).all(dim=(2, 3)).sum(dim=1)


def test_patch_views_shape():
    mean, std = common.NORMALIZATION["cifar10"]
    torch.manual_seed(0)
    views = PatchViews(Args(), 32, 8, 4, mean, std)(random_image(0))
    assert views.shape == (7, 7, 3, 8, 8)
    assert all_zero_channels(views).max().item() == 0, "a channel is dropped with --color-drop-prob 0"


def test_patch_views_color_drop():
    mean, std = common.NORMALIZATION["cifar10"]
    torch.manual_seed(0)
    views = PatchViews(Args(color_drop_prob=1.0), 32, 8, 4, mean, std)(random_image(1))
    assert views.shape == (7, 7, 3, 8, 8)
    assert all_zero_channels(views).tolist() == [2] * 49
