"""DenseSiam: cross-checks D1-D6 of shared/notes/methods.md §8 and the invariants of issue 5."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import densesiam


# ----------------------------------------------------------------------------------------------------------------------
# Cross-checks D1-D6 (values from running the official seg-mode functions, notes §8)
# ----------------------------------------------------------------------------------------------------------------------
def test_d1_ce_similarity():
    torch.manual_seed(0)
    p1, z2 = torch.randn(2, 27, 5, 5), torch.randn(2, 27, 5, 5)
    assert densesiam.ce_similarity(p1, z2).mean().item() == pytest.approx(3.807234, abs=1e-5)


def test_d2_self_label_loss():
    torch.manual_seed(0)
    p1, z2 = torch.randn(2, 27, 5, 5), torch.randn(2, 27, 5, 5)
    assert densesiam.self_label_loss(p1, z2, rebalance=False).item() == pytest.approx(3.691272, abs=1e-5)
    assert densesiam.self_label_loss(p1, z2, rebalance=True).item() == pytest.approx(0.200133, abs=1e-5)


def test_d3_auto_weights():
    w_sim, w_aux = densesiam.auto_loss_weights(27, 128)
    assert w_aux == pytest.approx(0.404503, abs=1e-6)
    assert w_sim == pytest.approx(0.595497, abs=1e-6)


def test_d4_region_term_by_hand():
    torch.manual_seed(3)
    batch, regions, channels, dim = 2, 4, 5, 3
    logits1, logits2 = torch.randn(batch, regions, 3, 3), torch.randn(batch, regions, 3, 3)
    feats1, feats2 = torch.randn(batch, channels, 3, 3), torch.randn(batch, channels, 3, 3)
    # Eq. 4 by hand: e[b, n] = sum over pixels of softmax_n(logits)[b, :, pixel] * feats[b, :, pixel]
    e1 = densesiam.region_embeddings(logits1, feats1)
    masks = torch.softmax(logits1, dim=1)
    for b in range(batch):
        for n in range(regions):
            by_hand = sum(masks[b, n, i, j] * feats1[b, :, i, j] for i in range(3) for j in range(3))
            assert torch.allclose(e1[b, n], by_hand, atol=1e-5)
    # identity projector, no predictor (u = v = e): InfoNCE over the N x N region similarities, T = 0.1, weight 0.1
    e2 = densesiam.region_embeddings(logits2, feats2)
    loss = 0.1 * densesiam.regionsim_loss(e1, e1, e2, e2, temperature=0.1)

    def contrast(u, v):
        total = 0.0
        for b in range(batch):
            for n in range(regions):
                sims = [float(F.cosine_similarity(u[b, n], v[b, m], dim=0)) / 0.1 for m in range(regions)]
                total += -(sims[n] - math.log(sum(math.exp(x) for x in sims)))
        return total / (batch * regions)

    by_hand = 0.1 * 0.5 * (contrast(e1, e2) + contrast(e2, e1))
    assert loss.item() == pytest.approx(by_hand, abs=1e-5)


def test_d5_replay_crop():
    assert densesiam.replay_crop(0.75, 0.3, 0.6, 640) == (480, 48, 96)
    assert densesiam.replay_crop(0.75, 0.3, 0.6, 80) == (60, 6, 12)
    # the released code rounds at each resolution separately: image and feature crops disagree for s = 0.77 ...
    assert densesiam.replay_crop(0.77, 0.3, 0.6, 640) == (492, 44, 89)
    assert densesiam.replay_crop(0.77, 0.3, 0.6, 80) == (61, 6, 11)
    # ... we crop the feature map with the image crop's normalised box instead, so the two stay pixel-aligned:
    # a 640 image whose pixels hold their column index, cropped at 640 and at 80 (8x8 average-pooled) agree.
    side, top, left = densesiam.replay_crop(0.77, 0.3, 0.6, 640)
    box = torch.tensor([[left / 640, top / 640, (left + side) / 640, (top + side) / 640]])
    columns = torch.arange(640.0).view(1, 1, 1, 640).expand(1, 1, 640, 640)
    image_crop = densesiam.crop_resize(columns, box, torch.tensor([False]), 80)
    feature_crop = densesiam.crop_resize(F.avg_pool2d(columns, 8), box, torch.tensor([False]), 80)
    assert (image_crop - feature_crop).abs().max() < 1e-3


def test_d6_grid_recipe():
    boxes_a, flips_a = torch.tensor([[0.1, 0.2, 0.7, 0.8]]), torch.tensor([False])
    boxes_b, flips_b = torch.tensor([[0.4, 0.3, 0.9, 0.9]]), torch.tensor([True])
    inter, valid = densesiam.box_intersection(boxes_a, boxes_b)
    assert torch.allclose(inter, torch.tensor([[0.4, 0.3, 0.7, 0.8]])) and valid.all()
    grid_a, grid_b, valid = densesiam.intersection_grids(boxes_a, flips_a, boxes_b, flips_b, grid_size=2)
    expected_a = torch.tensor([[0.25, -0.25], [0.75, -0.25], [0.25, 0.583333], [0.75, 0.583333]])
    expected_b = torch.tensor([[0.70, -0.583333], [0.10, -0.583333], [0.70, 0.25], [0.10, 0.25]])
    assert torch.allclose(grid_a.view(4, 2), expected_a, atol=1e-5)
    assert torch.allclose(grid_b.view(4, 2), expected_b, atol=1e-5)
    ramp = torch.arange(7.0).view(1, 1, 1, 7).expand(1, 1, 7, 7)
    sampled = densesiam.grid_sample_points(ramp, grid_a).flatten()
    assert torch.allclose(sampled, torch.tensor([3.875, 5.625, 3.875, 5.625]), atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# PixSim geometry on real crops, losses, schedules
# ----------------------------------------------------------------------------------------------------------------------
def coordinate_image(size):
    """1 x 2 x S x S image whose channels hold the normalised x and y of each pixel centre."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack([xx, yy])[None]


@pytest.mark.parametrize("flip1,flip2", [(False, False), (True, False), (False, True), (True, True)])
def test_grid_points_map_to_same_original_pixels(flip1, flip2):
    size, out, grid_size = 64, 32, 7
    image = coordinate_image(size)
    boxes1 = torch.tensor([[0.05, 0.10, 0.70, 0.65]])
    boxes2 = torch.tensor([[0.30, 0.25, 0.95, 0.90]])
    flips1, flips2 = torch.tensor([flip1]), torch.tensor([flip2])
    view1 = densesiam.crop_resize(image, boxes1, flips1, out)
    view2 = densesiam.crop_resize(image, boxes2, flips2, out)
    grid1, grid2, valid = densesiam.intersection_grids(boxes1, flips1, boxes2, flips2, grid_size)
    assert valid.all()
    where1 = densesiam.grid_sample_points(view1, grid1)                  # 1 x 2 x K x K original (x, y)
    where2 = densesiam.grid_sample_points(view2, grid2)
    assert (where1 - where2).abs().max() < 1.0 / size                    # same original pixel, up to interpolation
    inter, _ = densesiam.box_intersection(boxes1, boxes2)
    steps = (torch.arange(grid_size) + 0.5) / grid_size
    expected_x = inter[0, 0] + steps * (inter[0, 2] - inter[0, 0])
    assert torch.allclose(where1[0, 0, 0], expected_x, atol=1.0 / size)


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
    assert densesiam.pixsim_loss(z, z, z, z, valid, "cosine").item() == pytest.approx(-1.0, abs=1e-6)
    assert densesiam.pixsim_loss(z, -z, z, -z, valid, "cosine").item() == pytest.approx(1.0, abs=1e-6)
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


# ----------------------------------------------------------------------------------------------------------------------
# Seg-mode evaluation
# ----------------------------------------------------------------------------------------------------------------------
def test_hungarian_fallback_matches_brute_force_and_scipy():
    torch.manual_seed(0)
    for n in (1, 2, 5, 6):
        cost = torch.randint(0, 20, (n, n)).double()
        fallback = densesiam._hungarian_python(cost.tolist())
        best = min(sum(cost[i, perm[i]] for i in range(n)) for perm in itertools.permutations(range(n)))
        assert sorted(fallback) == list(range(n))
        assert sum(cost[i, fallback[i]] for i in range(n)) == best
    cost = torch.rand(27, 27).double()
    fallback = torch.tensor(densesiam._hungarian_python(cost.tolist()))
    chosen = densesiam.linear_assignment(cost)                          # scipy when installed
    assert cost[torch.arange(27), fallback].sum().item() == pytest.approx(cost[torch.arange(27), chosen].sum().item())


def test_segmentation_scores_perfect_permuted_prediction():
    torch.manual_seed(0)
    num_classes = 6
    target = torch.randint(0, num_classes, (4, 16, 16))
    target[0, 0, :4] = 255                                               # ignored pixels
    permutation = torch.randperm(num_classes)
    pred = permutation[target.clamp(max=num_classes - 1)]
    scores = densesiam.segmentation_scores(densesiam.confusion_matrix(pred, target, num_classes), thing_classes=(0, 1))
    assert scores["miou"] == pytest.approx(1.0) and scores["pixel_acc"] == pytest.approx(1.0)
    assert scores["miou_things"] == pytest.approx(1.0) and scores["miou_stuff"] == pytest.approx(1.0)
    assert torch.equal(scores["cluster_to_class"][permutation], torch.arange(num_classes))
    random_pred = torch.randint(0, num_classes, target.shape)
    scores = densesiam.segmentation_scores(densesiam.confusion_matrix(random_pred, target, num_classes))
    assert 0.0 <= scores["miou"] < 0.5 and 0.0 <= scores["pixel_acc"] <= 1.0


def test_synthetic_segmentation_set():
    images, labels = densesiam.make_synthetic_segmentation(6, image_size=32, seed=1)
    again, _ = densesiam.make_synthetic_segmentation(6, image_size=32, seed=1)
    assert images.shape == (6, 3, 32, 32) and images.dtype == torch.uint8 and torch.equal(images, again)
    assert labels.shape == (6, 32, 32) and labels.min() >= 0 and labels.max() < 6
    assert (labels < 3).any() and (labels >= 3).any()                   # things and stuff both present


def test_fpn_decoder_shape():
    decoder = densesiam.FPNDecoder({"res2": 64, "res3": 128, "res4": 256, "res5": 512}, dim=16)
    feats = {name: torch.randn(2, c, 32 // s, 32 // s)
             for name, c, s in (("res2", 64, 4), ("res3", 128, 8), ("res4", 256, 16), ("res5", 512, 32))}
    assert decoder(feats).shape == (2, 16, 8, 8)
