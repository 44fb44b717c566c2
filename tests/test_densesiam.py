"""DenseSiam: released seg-mode values (D1-D6), PixSim geometry, losses, seg evaluation, runs."""
import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import common
import densesiam
from ddp_runner import ROOT


# --------------------------------------------------------------------------------------------------
# D1-D5: values from running the released seg-mode functions (ZwwWayne/DenseSiam @ 99f8ce1:
# densesiam/models/architectures/densesiam.py; ReplayRandomResizedCrop in
# densesiam/datasets/pipelines/index_transforms.py). D6: this repo's PixSim grid (Sec. 3.2),
# a hand-checked case.
# --------------------------------------------------------------------------------------------------
def test_d1_ce_similarity():
    torch.manual_seed(0)
    p1, z2 = torch.randn(2, 27, 5, 5), torch.randn(2, 27, 5, 5)
    assert densesiam.ce_similarity(p1, z2).mean().item() == pytest.approx(3.807234, abs=1e-5)


def test_d2_self_label_loss():
    torch.manual_seed(0)
    p1, z2 = torch.randn(2, 27, 5, 5), torch.randn(2, 27, 5, 5)
    plain = densesiam.self_label_loss(p1, z2, rebalance=False).item()
    rebalanced = densesiam.self_label_loss(p1, z2, rebalance=True).item()
    assert plain == pytest.approx(3.691272, abs=1e-5)
    assert rebalanced == pytest.approx(0.200133, abs=1e-5)


def test_d3_auto_weights():
    w_sim, w_aux = densesiam.auto_loss_weights(27, 128)
    assert w_aux == pytest.approx(0.404503, abs=1e-6)
    assert w_sim == pytest.approx(0.595497, abs=1e-6)


def test_d4_region_term_by_hand():
    torch.manual_seed(3)
    batch, regions, channels = 2, 4, 5
    logits1, logits2 = torch.randn(batch, regions, 3, 3), torch.randn(batch, regions, 3, 3)
    feats1, feats2 = torch.randn(batch, channels, 3, 3), torch.randn(batch, channels, 3, 3)
    # Eq. 4 by hand: e[b, n] = sum over pixels of softmax_n(logits)[b, :, pixel] * feats[b, :,
    # pixel]
    e1 = densesiam.region_embeddings(logits1, feats1)
    masks = torch.softmax(logits1, dim=1)
    for b in range(batch):
        for n in range(regions):
            by_hand = sum(masks[b, n, i, j] * feats1[b, :, i, j]
                          for i in range(3) for j in range(3))
            assert torch.allclose(e1[b, n], by_hand, atol=1e-5)
    # identity projector, no predictor (u = v = e): InfoNCE over the N x N region similarities, T =
    # 0.1, weight 0.1
    e2 = densesiam.region_embeddings(logits2, feats2)
    loss = 0.1 * densesiam.regionsim_loss(e1, e1, e2, e2, temperature=0.1)

    def contrast(u, v):
        total = 0.0
        for b in range(batch):
            for n in range(regions):
                sims = [float(F.cosine_similarity(u[b, n], v[b, m], dim=0)) / 0.1
                        for m in range(regions)]
                total += -(sims[n] - math.log(sum(math.exp(x) for x in sims)))
        return total / (batch * regions)

    by_hand = 0.1 * 0.5 * (contrast(e1, e2) + contrast(e2, e1))
    assert loss.item() == pytest.approx(by_hand, abs=1e-5)


def test_d5_replay_crop():
    def crop(s, a, b, size):
        box = common.replay_crop(torch.tensor(s), torch.tensor(a), torch.tensor(b), size)
        return tuple(int(v) for v in box)

    assert crop(0.75, 0.3, 0.6, 640) == (480, 48, 96)
    assert crop(0.75, 0.3, 0.6, 80) == (60, 6, 12)
    # the released code rounds at each resolution separately: image and feature crops disagree for s
    # = 0.77 ...
    assert crop(0.77, 0.3, 0.6, 640) == (492, 44, 89)
    assert crop(0.77, 0.3, 0.6, 80) == (61, 6, 11)
    # ... we crop the feature map with the image crop's normalised box instead, so the two stay
    # pixel-aligned: a 640 image whose pixels hold their column index, cropped at 640 and at 80 (8x8
    # average-pooled) agree.
    side, top, left = crop(0.77, 0.3, 0.6, 640)
    box = torch.tensor([[left / 640, top / 640, (left + side) / 640, (top + side) / 640]])
    columns = torch.arange(640.0).view(1, 1, 1, 640).expand(1, 1, 640, 640)
    image_crop = common.crop_resize(columns, box, torch.tensor([False]), 80)
    feature_crop = common.crop_resize(F.avg_pool2d(columns, 8), box, torch.tensor([False]), 80)
    assert (image_crop - feature_crop).abs().max() < 1e-3


def test_d6_grid_recipe():
    boxes_a, flips_a = torch.tensor([[0.1, 0.2, 0.7, 0.8]]), torch.tensor([False])
    boxes_b, flips_b = torch.tensor([[0.4, 0.3, 0.9, 0.9]]), torch.tensor([True])
    inter, valid = densesiam.box_intersection(boxes_a, boxes_b)
    assert torch.allclose(inter, torch.tensor([[0.4, 0.3, 0.7, 0.8]])) and valid.all()
    grid_a, grid_b, valid = densesiam.intersection_grids(boxes_a, flips_a, boxes_b, flips_b,
                                                         grid_size=2)
    expected_a = torch.tensor([[0.25, -0.25], [0.75, -0.25], [0.25, 0.583333], [0.75, 0.583333]])
    expected_b = torch.tensor([[0.70, -0.583333], [0.10, -0.583333], [0.70, 0.25], [0.10, 0.25]])
    assert torch.allclose(grid_a.view(4, 2), expected_a, atol=1e-5)
    assert torch.allclose(grid_b.view(4, 2), expected_b, atol=1e-5)
    ramp = torch.arange(7.0).view(1, 1, 1, 7).expand(1, 1, 7, 7)
    sampled = densesiam.grid_sample_points(ramp, grid_a).flatten()
    assert torch.allclose(sampled, torch.tensor([3.875, 5.625, 3.875, 5.625]), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# PixSim geometry on real crops, losses, schedules
# --------------------------------------------------------------------------------------------------
def coordinate_image(size):
    """1 x 2 x S x S image whose channels hold the normalised x and y of each pixel centre."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack([xx, yy])[None]


@pytest.mark.parametrize("flip1,flip2",
                         [(False, False), (True, False), (False, True), (True, True)])
def test_grid_points_map_to_same_original_pixels(flip1, flip2):
    size, out, grid_size = 64, 32, 7
    image = coordinate_image(size)
    boxes1 = torch.tensor([[0.05, 0.10, 0.70, 0.65]])
    boxes2 = torch.tensor([[0.30, 0.25, 0.95, 0.90]])
    flips1, flips2 = torch.tensor([flip1]), torch.tensor([flip2])
    view1 = common.crop_resize(image, boxes1, flips1, out)
    view2 = common.crop_resize(image, boxes2, flips2, out)
    grid1, grid2, valid = densesiam.intersection_grids(boxes1, flips1, boxes2, flips2, grid_size)
    assert valid.all()
    where1 = densesiam.grid_sample_points(view1, grid1)              # 1 x 2 x K x K original (x, y)
    where2 = densesiam.grid_sample_points(view2, grid2)
    assert (where1 - where2).abs().max() < 1.0 / size     # same original pixel, up to interpolation
    inter, _ = densesiam.box_intersection(boxes1, boxes2)
    steps = (torch.arange(grid_size) + 0.5) / grid_size
    expected_x = inter[0, 0] + steps * (inter[0, 2] - inter[0, 0])
    assert torch.allclose(where1[0, 0, 0], expected_x, atol=1.0 / size)


FLIPS = [(False, False), (True, False), (False, True), (True, True)]


@pytest.mark.parametrize("flip1,flip2", FLIPS)
def test_constant_map_reads_the_constant_at_every_grid_point(flip1, flip2):
    """One edge of the intersection lies on an edge of one view, so the outer grid points fall in
    the outer half cell of that view's map: they must read its edge cells, not blend in zeros."""
    count = 200
    generator = torch.Generator().manual_seed(0)
    boxes1, boxes2 = (common.sample_crop_boxes(count, 64, 64, (0.2, 1.0), (3 / 4, 4 / 3),
                                               generator, "cpu") for _ in range(2))
    flips1, flips2 = torch.full((count,), flip1), torch.full((count,), flip2)
    grid1, grid2, valid = densesiam.intersection_grids(boxes1, flips1, boxes2, flips2, 7)
    assert valid.sum() >= 150
    for size in (2, 7):                                  # res5 of a 64 px and of a 224 px view
        constant = torch.full((count, 3, size, size), 2.5)
        for grid in (grid1, grid2):
            sampled = densesiam.grid_sample_points(constant, grid)[valid]   # valid x 3 x K x K
            low = sampled.min()
            assert (sampled - 2.5).abs().max() < 1e-5, f"{size}x{size} map read as {low:.3f}"


def ramp_map(batch, size):
    """batch x 2 x size x size float32 map whose channels hold each cell's column and row index
    (integers, exact in bf16 up to 256)."""
    index = torch.arange(size, dtype=torch.float32)
    columns, rows = index.expand(size, size), index[:, None].expand(size, size)
    return torch.stack([columns, rows])[None].expand(batch, -1, -1, -1)


def test_grid_sample_points_geometry_is_float32_under_bf16_autocast():
    """Under autocast a bf16 map is read at the float32 grid points (the grid is not rounded)."""
    generator = torch.Generator().manual_seed(1)
    boxes1, boxes2 = (common.sample_crop_boxes(16, 64, 64, (0.2, 1.0), (3 / 4, 4 / 3),
                                               generator, "cpu") for _ in range(2))
    flips = torch.rand(16, generator=generator) < 0.5
    grid1, _, valid = densesiam.intersection_grids(boxes1, flips, boxes2, ~flips, 7)
    ramp = ramp_map(16, 56)                                       # res2 of a 224 px view
    reference = densesiam.grid_sample_points(ramp, grid1)        # float32: positions in cells
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sampled = densesiam.grid_sample_points(ramp.bfloat16(), grid1)
    error = (sampled.float() - reference)[valid].abs().max()
    assert sampled.dtype == torch.float32
    assert error < 1e-4, f"positions off by up to {error:.3f} cells"


def test_empty_intersection_is_masked():
    boxes1 = torch.tensor([[0.0, 0.0, 0.4, 0.4], [0.0, 0.0, 0.6, 0.6]])
    boxes2 = torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.4, 0.4, 1.0, 1.0]])
    flips = torch.tensor([False, False])
    _, _, valid = densesiam.intersection_grids(boxes1, flips, boxes2, flips, 3)
    assert valid.tolist() == [False, True]
    torch.manual_seed(0)
    p1, z1, p2, z2 = (torch.randn(2, 8, 3, 3) for _ in range(4))
    masked = densesiam.pixsim_loss(p1, z1, p2, z2, valid)
    only_valid = densesiam.pixsim_loss(p1[1:], z1[1:], p2[1:], z2[1:], torch.tensor([True]))
    assert masked.item() == pytest.approx(only_valid.item(), abs=1e-6)
    assert densesiam.pixsim_loss(p1, z1, p2, z2, torch.tensor([False, False])).item() == 0.0


def test_pixsim_loss_values_and_stop_gradient():
    torch.manual_seed(0)
    z = torch.randn(2, 8, 3, 3)
    valid = torch.tensor([True, True])
    same = densesiam.pixsim_loss(z, z, z, z, valid, "cosine").item()
    opposite = densesiam.pixsim_loss(z, -z, z, -z, valid, "cosine").item()
    assert same == pytest.approx(-1.0, abs=1e-6)
    assert opposite == pytest.approx(1.0, abs=1e-6)
    p = torch.randn(2, 8, 3, 3, requires_grad=True)
    target = torch.randn(2, 8, 3, 3, requires_grad=True)
    densesiam.pixsim_loss(p, target, p, target, valid, "ce").backward()
    assert p.grad is not None and target.grad is None                   # z side is stop-gradded


def test_region_weight_schedule():
    total = 100
    assert densesiam.region_weight_at(0, total, 0.5, 0.1) == 0.0
    assert densesiam.region_weight_at(49, total, 0.5, 0.1) == 0.0
    assert densesiam.region_weight_at(50, total, 0.5, 0.1) == 0.1
    assert densesiam.region_weight_at(99, total, 0.5, 0.1) == 0.1


# --------------------------------------------------------------------------------------------------
# Seg-mode evaluation
# --------------------------------------------------------------------------------------------------
def test_hungarian_fallback_matches_brute_force_and_scipy():
    torch.manual_seed(0)
    for n in (1, 2, 5, 6):
        cost = torch.randint(0, 20, (n, n)).double()
        fallback = common._hungarian_python(cost.tolist())
        best = min(sum(cost[i, perm[i]] for i in range(n))
                   for perm in itertools.permutations(range(n)))
        assert sorted(fallback) == list(range(n))
        assert sum(cost[i, fallback[i]] for i in range(n)) == best
    cost = torch.rand(27, 27).double()
    fallback = torch.tensor(common._hungarian_python(cost.tolist()))
    chosen = common.linear_assignment(cost)                             # scipy when installed
    rows = torch.arange(27)
    assert cost[rows, fallback].sum().item() == pytest.approx(cost[rows, chosen].sum().item())


def test_matched_segmentation_iou_perfect_permuted_prediction():
    torch.manual_seed(0)
    num_classes = 6
    target = torch.randint(0, num_classes, (4, 16, 16))
    target[0, 0, :4] = 255                                               # ignored pixels
    permutation = torch.randperm(num_classes)
    pred = permutation[target.clamp(max=num_classes - 1)]
    scores = common.matched_segmentation_iou(common.confusion_matrix(pred, target, num_classes),
                                             thing_classes=(0, 1))
    assert scores["miou"] == pytest.approx(1.0) and scores["pixel_acc"] == pytest.approx(1.0)
    assert scores["miou_things"] == pytest.approx(1.0)
    assert scores["miou_stuff"] == pytest.approx(1.0)
    assert torch.equal(scores["cluster_to_class"][permutation], torch.arange(num_classes))
    random_pred = torch.randint(0, num_classes, target.shape)
    confusion = common.confusion_matrix(random_pred, target, num_classes)
    scores = common.matched_segmentation_iou(confusion)
    assert 0.0 <= scores["miou"] < 0.5 and 0.0 <= scores["pixel_acc"] <= 1.0


def test_things_and_stuff_miou_by_hand():
    """mIoU^St / mIoU^Th as the released evaluator computes them: ONE Hungarian matching over all
    classes, then the mIoU of the things x things and stuff x stuff blocks of the matched matrix,
    so pixels confused between a thing and a stuff class count in neither. This is how Table 3
    can report 16.4 overall with 24.5 stuff and 29.5 things."""
    # Rows: ground truth, classes 0 and 1 things, 2 and 3 stuff. Column j: pixels predicted as the
    # cluster matched to class j. Each row's largest count is on the diagonal, so the Hungarian
    # matching is the diagonal one (25 of 40 pixels).
    matched = torch.tensor([[8, 2, 2, 0],
                            [1, 6, 0, 3],
                            [2, 0, 5, 1],
                            [0, 2, 2, 6]])
    class_of_cluster = [2, 0, 3, 1]                  # the network numbers its clusters its own way
    confusion = matched[:, class_of_cluster]         # column k: cluster k
    # All classes, IoU = tp / (row sum + column sum - tp):
    #   class 0: 8 / (12 + 11 - 8) = 8/15     class 1: 6 / (10 + 10 - 6) = 3/7
    #   class 2: 5 / (8 + 9 - 5) = 5/12       class 3: 6 / (10 + 10 - 6) = 3/7     mean 0.451786
    # Things block [[8, 2], [1, 6]]: 8 / (10 + 9 - 8) = 8/11, 6 / (7 + 8 - 6) = 2/3: 23/33 = 0.6970
    # Stuff block [[5, 1], [2, 6]]:  5 / (6 + 7 - 5) = 5/8,   6 / (8 + 7 - 6) = 2/3: 31/48 = 0.6458
    scores = common.matched_segmentation_iou(confusion, thing_classes=(0, 1))
    assert scores["cluster_to_class"].tolist() == class_of_cluster
    assert scores["miou"] == pytest.approx((8 / 15 + 3 / 7 + 5 / 12 + 3 / 7) / 4, abs=1e-9)
    assert scores["miou_things"] == pytest.approx(23 / 33, abs=1e-9)
    assert scores["miou_stuff"] == pytest.approx(31 / 48, abs=1e-9)
    assert scores["pixel_acc"] == pytest.approx(25 / 40, abs=1e-9)
    # Thing class 0 predicted only as the cluster of stuff class 2: its things block [[0]] is
    # empty, IoU 0 (the released nanmean would skip it). Matching: the diagonal (11 pixels) beats
    # every other permutation (at most 6). Stuff block [[5, 1], [1, 6]]: 5/7 and 6 / (7 + 7 - 6).
    confusion = torch.tensor([[0, 0, 4], [0, 5, 1], [0, 1, 6]])
    scores = common.matched_segmentation_iou(confusion, thing_classes=(0,))
    assert scores["miou_things"] == 0.0
    assert scores["miou_stuff"] == pytest.approx((5 / 7 + 3 / 4) / 2, abs=1e-9)


def test_synthetic_segmentation_set():
    images, labels = common.make_synthetic_segmentation(6, image_size=32, seed=1)
    again, _ = common.make_synthetic_segmentation(6, image_size=32, seed=1)
    assert images.shape == (6, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images, again)
    assert labels.shape == (6, 32, 32) and labels.min() >= 0 and labels.max() < 6
    assert (labels < 3).any() and (labels >= 3).any()                # things and stuff both present


def test_fpn_decoder_shape():
    decoder = densesiam.FPNDecoder({"res2": 64, "res3": 128, "res4": 256, "res5": 512}, dim=16)
    feats = {name: torch.randn(2, c, 32 // s, 32 // s)
             for name, c, s in (("res2", 64, 4), ("res3", 128, 8), ("res4", 256, 16),
                                ("res5", 512, 32))}
    assert decoder(feats).shape == (2, 16, 8, 8)


def test_grid_points_agree_through_common_augment():
    """Random crops and flips drawn by common.augment: every grid point reads the same original
    pixel in both views."""
    size, out = 64, 48
    coords = torch.round(coordinate_image(size) * 255) / 255
    image = torch.cat([coords, torch.zeros(1, 1, size, size)], 1)
    image = (image * 255).round().to(torch.uint8).expand(16, -1, -1, -1)
    recipe = dataclasses.replace(common.GEOMETRY_ONLY, crop_scale=(0.3, 1.0))
    generator = torch.Generator().manual_seed(0)
    (view1, boxes1, flips1), (view2, boxes2, flips2) = (
        common.augment(image, recipe, out, generator) for _ in range(2))
    assert flips1.any() and (~flips1).any()
    mean = torch.tensor(common.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1)
    view1, view2 = view1 * std + mean, view2 * std + mean       # back to [0, 1]: channels 0/1 = x/y
    grid1, grid2, valid = densesiam.intersection_grids(boxes1, flips1, boxes2, flips2, 7)
    where1 = densesiam.grid_sample_points(view1[:, :2], grid1)
    where2 = densesiam.grid_sample_points(view2[:, :2], grid2)
    assert valid.sum() >= 8
    assert (where1 - where2)[valid].abs().max() < 1.5 / size


# --------------------------------------------------------------------------------------------------
# Models: RegionSim switch, loss weights, seg forward/eval
# --------------------------------------------------------------------------------------------------
SMALL = dict(proj_dim=32, pred_hidden=16, dense_dim=8, dense_pred_hidden=8, region_dim=16,
             grid_size=3)


def test_regionsim_inactive_before_start_and_weights_applied():
    cfg = densesiam.Config(**SMALL, dense_weight=0.7, region_weight=0.3, region_start=0.5)
    model = densesiam.DenseSiam(cfg)
    torch.manual_seed(0)
    views = [torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)]
    boxes1 = torch.tensor([[0.0, 0.0, 0.8, 0.8]] * 3 + [[0.0, 0.0, 0.15, 0.15]])
    boxes2 = torch.tensor([[0.2, 0.2, 1.0, 1.0]] * 4)
    flips = torch.tensor([False, True, False, True])
    grid1, grid2, valid = densesiam.intersection_grids(boxes1, flips, boxes2, ~flips, cfg.grid_size)
    assert valid.tolist() == [True, True, True, False]
    region_heads = (list(model.region_projector.parameters())
                    + list(model.region_predictor.parameters()))
    for step, expect_region in ((49, False), (50, True)):
        model.zero_grad(set_to_none=True)
        weight = densesiam.region_weight_at(step, 100, cfg.region_start, cfg.region_weight)
        outputs = model(views, (grid1, grid2), weight > 0)
        loss, terms = densesiam.densesiam_loss(outputs, valid, cfg.dense_weight, weight, cfg)
        expected = (terms["loss_sim"] + 0.7 * terms["loss_dense"]
                    + (0.3 * terms["loss_region"] if expect_region else 0.0))
        assert ("loss_region" in terms) == expect_region
        assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
        loss.backward()
        assert all((p.grad is not None) == expect_region for p in region_heads)
        assert model.dense_projector[0].weight.grad.abs().sum() > 0
    assert outputs[0]["dense_z"].shape == (4, 8, 3, 3) and outputs[0]["u"].shape == (4, 8, 16)


def seg_config(**overrides):
    values = dict(num_classes=4, num_things=1, num_aux_classes=6, fpn_dim=16, image_size=32)
    values.update(overrides)
    return densesiam.Config(**{**densesiam.SEG, **values})


def test_seg_loss_weights_and_alignment():
    cfg = seg_config()
    model = densesiam.SegDenseSiam(cfg)
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    boxes, flips = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2), torch.tensor([False, True])
    outputs = model([images, images], (boxes, flips), True)
    assert outputs[0]["z"].shape == (2, 4, 8, 8) and outputs[0]["aux_z"].shape == (2, 6, 8, 8)
    loss, terms = densesiam.seg_loss(outputs, 0.1, cfg)
    w_dense, w_aux = densesiam.auto_loss_weights(4, 6)
    expected = (w_dense * terms["loss_dense"] + w_aux * terms["loss_aux"] + terms["loss_seg"]
                + 0.1 * terms["loss_region"])
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    # identical views and the whole-image box without flip: both feature maps are the same map
    model.eval()
    with torch.no_grad():
        first, second = model([images, images],
                              (boxes[:1].expand(2, 4), torch.tensor([False, False])), False)
    assert torch.allclose(first["z"], second["z"], atol=1e-5)


def test_seg_crop_boxes_are_squares_inside_the_image():
    boxes, flips = common.seg_crop_boxes(64, 640, (0.5, 1.0), torch.Generator().manual_seed(0),
                                         "cpu")
    sides = boxes[:, 2] - boxes[:, 0]
    assert torch.allclose(sides, boxes[:, 3] - boxes[:, 1])
    assert (sides >= 0.5 - 1e-6).all() and (sides <= 1).all()
    assert (boxes >= 0).all() and (boxes <= 1).all() and flips.any() and (~flips).any()
    # whole pixels of the input, as released
    assert torch.allclose(boxes * 640, (boxes * 640).round(), atol=1e-3)


def test_seg_blur_sigma_is_the_released_pixels_at_640():
    """Released config: ReplayRandomGaussianBlur(sigma=[0.1, 2.0]) on the 640 px image, so the
    blur's standard deviation is at most 2 px at load size 640 (not 2 px at 224 scaled to 5.7)."""
    batch, width = 64, 640
    impulse = torch.zeros(batch, 3, 1, width)                     # one bright column per image
    impulse[..., width // 2] = 1.0
    recipe = dataclasses.replace(common.SEG_PHOTOMETRIC, jitter_p=0.0, gray_p=0.0, blur_p=1.0)
    generator = torch.Generator().manual_seed(0)
    blurred = common.color_augment(impulse, recipe, generator)[:, 0, 0]          # B x W
    offsets = (torch.arange(width) - width // 2).float()
    sigma = ((blurred * offsets ** 2).sum(1) / blurred.sum(1)).sqrt()           # measured, px
    assert sigma.max() <= 2.0 + 1e-3, f"blur sigma up to {sigma.max():.2f} px at 640 px"
    assert sigma.max() > 1.5                                      # and the range is used


def test_seg_views_resample_both_views_alike():
    """Both views are shrunk the same way, with antialiasing (the released view 2 and the val
    images go through PIL's resize): view 1 = the crop (whole pixels) resized as
    F.interpolate(antialias=True), mirrored where flipped."""
    def shrink(images):
        return F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False,
                             antialias=True)

    torch.manual_seed(0)
    colour = torch.rand(4, 3, 64, 64)
    whole, no_flip = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(4, 4), torch.zeros(4).bool()
    view1, view2 = common.seg_views(colour, colour, whole, no_flip, 32)
    assert (view1 - view2).abs().max() < 1e-4                     # same image and box: same view
    assert (view2 - common.normalize(shrink(colour))).abs().max() < 1e-4
    pixels = [(8, 4, 56, 52), (0, 16, 48, 64), (10, 10, 64, 64), (20, 20, 44, 44)]   # l, t, r, b
    boxes, flips = torch.tensor(pixels) / 64.0, torch.tensor([True, False, True, False])
    view1, _ = common.seg_views(colour, colour, boxes, flips, 32)
    for index, (left, top, right, bottom) in enumerate(pixels):   # sides 48, 48, 54 and 24
        expected = shrink(colour[index:index + 1, :, top:bottom, left:right])
        expected = expected.flip(-1) if flips[index] else expected
        assert (view1[index:index + 1] - common.normalize(expected)).abs().max() < 1e-4, index


def test_seg_val_labels_are_scored_at_eval_size():
    """Released eval (CocoEvalDataset, res=320): val images and labels are resized to 320 px (the
    training images are loaded at 640) and the labels are scored at 320."""
    cfg = seg_config(synthetic_size=16)
    dist = common.Dist(0, 0, 1, torch.device("cpu"))
    train_loader, val_loader = common.make_seg_loaders(cfg, dist, 8, load_size=64, eval_size=32)
    train_images, _ = next(iter(train_loader))
    val_images, val_labels = next(iter(val_loader))
    assert train_images.shape[-2:] == (64, 64)
    assert val_images.shape[-2:] == (32, 32) and val_labels.shape[-2:] == (32, 32)


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                     reason="needs CUDA"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_crop_resize_geometry_is_float32_under_bf16_autocast(device):
    """The seg forward crops a bf16 feature map under autocast: it must read the positions of the
    float32 geometry (theta, grid, interpolation weights); only the result is rounded to bf16."""
    generator = torch.Generator().manual_seed(0)
    boxes, flips = common.seg_crop_boxes(8, 640, (0.5, 1.0), generator, "cpu")
    boxes, flips = boxes.to(device), flips.to(device)
    ramp = ramp_map(8, 80).to(device)                            # the map of a 320 px view
    reference = common.crop_resize(ramp, boxes, flips, 80)       # float32: positions in cells
    with torch.autocast(device, dtype=torch.bfloat16):
        sampled = common.crop_resize(ramp.bfloat16(), boxes, flips, 80)
    error = (sampled.float() - reference).abs().max()
    assert sampled.dtype == torch.bfloat16
    assert torch.equal(sampled, reference.bfloat16()), f"up to {error:.3f} cells off"


def test_seg_evaluation_returns_fractions():
    cfg = seg_config()
    model = densesiam.SegDenseSiam(cfg)
    images, labels = common.make_synthetic_segmentation(4, 64, seed=0, num_things=1, num_stuff=3)
    loader = common.TensorLoader(images, labels, 2, 0, 1, 0, shuffle=False, drop_last=False)
    scores = common.evaluate_segmentation(model, loader, 4, 1, 32)
    assert all(0.0 <= scores[key] <= 1.0
               for key in ("miou", "pixel_acc", "miou_things", "miou_stuff"))
    assert model.training                                           # evaluation restores train mode


def test_seg_folder_layout(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "labels" / split).mkdir(parents=True)
        for i in range(2):
            image = Image.new("RGB", (48, 40), (40 * i, 90, 160))
            image.save(tmp_path / "images" / split / f"im{i}.jpg")
            label = torch.zeros(40, 48, dtype=torch.uint8)
            label[:, 24:] = 2
            label[0, 0] = 255
            Image.fromarray(label.numpy(), mode="L").save(
                tmp_path / "labels" / split / f"im{i}.png")
    pairs = common.segmentation_pairs(tmp_path, "train", "cocostuff")
    dataset = common.SegmentationPairs(pairs, 32)
    image, label = dataset[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and label.shape == (32, 32)
    assert set(label.unique().tolist()) <= {0, 2, 255}
    (tmp_path / "labels" / "val" / "im1.png").unlink()
    with pytest.raises(common.InputError, match="no label PNG"):
        common.segmentation_pairs(tmp_path, "val", "cocostuff")


# --------------------------------------------------------------------------------------------------
# Command line, DDP, short runs
# --------------------------------------------------------------------------------------------------
TINY = ["--synthetic-size", "16", "--image-size", "32", "--batch-size", "8", "--epochs", "1",
        "--log-every", "1", "--proj-dim", "32", "--pred-hidden", "16", "--dense-dim", "8",
        "--dense-pred-hidden", "8", "--region-dim", "16", "--grid-size", "3",
        "--region-start", "0.5", "--knn-every", "0"]
TINY_SEG = ["--task", "seg", "--synthetic-size", "16", "--image-size", "32", "--batch-size", "8",
            "--epochs", "1", "--log-every", "1", "--fpn-dim", "16", "--num-aux-classes", "8",
            "--region-start", "0.5"]

DDP_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import torch
import common
import densesiam

dist = common.setup_distributed("cpu")
# one launch, both modes, one process group
for mode, args in (("pretrain", {pretrain!r}), ("seg", {seg!r})):
    cfg = densesiam.parse_config(args + ["--out", f"{{sys.argv[1]}}/{{mode}}", "--device", "cpu"])
    densesiam.check_config(cfg, dist.world_size)
    result = densesiam.train(cfg, dist)
    torch.save(dict(model=result["model"].state_dict(), step=result["step"]),
               f"{{cfg.out}}/rank{{dist.rank}}.pt")
common.cleanup_distributed()
"""


def test_two_process_ddp_keeps_ranks_identical(tmp_path):
    """Both modes train under `torchrun --nproc_per_node=2` on CPU, RegionSim switching on
    mid-run."""
    script = tmp_path / "ddp_densesiam.py"
    script.write_text(DDP_SCRIPT.format(root=ROOT, pretrain=TINY, seg=TINY_SEG))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(script), str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for mode in ("pretrain", "seg"):
        states = [torch.load(tmp_path / mode / f"rank{rank}.pt", weights_only=True)
                  for rank in range(2)]
        assert states[0]["step"] == states[1]["step"] == 2               # 16 images, global batch 8
        records = [json.loads(line) for line in open(tmp_path / mode / "metrics.jsonl")]
        assert [r["region_weight"] for r in records if "loss" in r] == [0.0, 0.1], mode
        names = [n for n, v in states[0]["model"].items()
                 if v.is_floating_point() and "running" not in n]
        assert any(n.startswith("region_projector") for n in names)
        for name in names:
            assert torch.equal(states[0]["model"][name], states[1]["model"][name]), \
                f"{mode}: {name} differs"
    # seg: evaluated at init and at the end
    assert "miou" in records[0] and 0.0 <= records[-1]["miou"] <= 1.0


def test_resume_reaches_the_same_weights_bitwise(tmp_path):
    args = TINY + ["--device", "cpu", "--synthetic-size", "24"]  # 3 steps, RegionSim on from step 1
    densesiam.main(args + ["--out", str(tmp_path / "straight")])
    densesiam.main(args + ["--out", str(tmp_path / "resumed"), "--stop-after", "2"])
    densesiam.main(args + ["--out", str(tmp_path / "resumed"), "--resume"])
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["model"]
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_seg_short_training_beats_initialisation(tmp_path):
    """Seg mode on the built-in set: mIoU after a short CPU run beats the same network's mIoU at
    initialisation."""
    result = densesiam.main(["--task", "seg", "--out", str(tmp_path), "--device", "cpu",
                             "--synthetic-size", "128", "--image-size", "32", "--batch-size", "16",
                             "--epochs", "3", "--eval-every", "0", "--base-lr", "0.4",
                             "--log-every", "8"])
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    miou = [r["miou"] for r in records if "miou" in r]
    assert result["scores"]["miou"] == pytest.approx(miou[-1], abs=1e-6)
    assert miou[-1] > miou[0] + 0.05, f"mIoU {miou[0]:.3f} at init -> {miou[-1]:.3f} after training"


@pytest.mark.parametrize("args, message", [
    (["--task", "classify"], "--task must be pretrain or seg"),
    (["--dense-loss", "l2"], "--dense-loss must be one of"),
    (["--region-start", "1.5"], "--region-start is a fraction"),
    (["--task", "seg", "--num-things", "9"], "--num-things < --num-classes"),
    (["--task", "seg", "--data", "/nowhere"], "expected folder /nowhere/images/train"),
    (["--task", "seg", "--init", "/nowhere.pth"], "--init /nowhere.pth: no such file"),
    (["--task", "seg", "--preset", "cocostuff27"], "--init is required (--require-init, on in"),
])
def test_bad_flags(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        densesiam.main(["--out", str(tmp_path), "--device", "cpu", "--epochs", "1",
                        "--synthetic-size", "16"] + args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cocostuff27_trains_from_random_weights_only_when_asked():
    """The paper's seg mode starts from a supervised ImageNet ResNet-18 (Sec. 5.1);
    --no-require-init is the explicit opt-out."""
    paper = ["--task", "seg", "--preset", "cocostuff27"]
    with pytest.raises(common.InputError, match="--init is required"):
        densesiam.check_config(densesiam.parse_config(paper), 1)
    cfg = densesiam.parse_config(paper + ["--no-require-init"])
    densesiam.check_config(cfg, 1)
    assert cfg.init == "" and not cfg.require_init
    densesiam.check_config(densesiam.parse_config(["--task", "seg"]), 1)   # CPU default: allowed


def test_init_weights_from_a_torchvision_state_dict(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    trunk = common.ResNetTrunk("resnet18", "imagenet")
    common.load_torchvision_weights(trunk, tmp_path / "r18.pth")
    assert torch.equal(trunk.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    torch.save({"something": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(common.InputError, match="not a torchvision ResNet state_dict"):
        common.load_torchvision_weights(trunk, tmp_path / "other.pth")
