"""Shared parts: BYOL loss, schedules, LARS, EMA, kNN, augmentation, config, checkpoints.

B1-B5 and K1 below name the cross-checks against the official functions (DeepMind byol/, InstDisc
kNN)."""

import colorsys
import dataclasses
import os
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

import common


# --- B1, B4: regression loss ----------------------------------------------------------------------

def test_b1_byol_loss_value():
    torch.manual_seed(0)
    p1, z2, p2, z1 = (torch.randn(8, 256) for _ in range(4))
    total = common.regression_loss(p1, z2) + common.regression_loss(p2, z1)
    assert total.item() == pytest.approx(3.986863, abs=1e-5)


def test_b4_loss_invariants():
    x = torch.randn(5, 16)
    assert common.regression_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert common.regression_loss(x, -x).item() == pytest.approx(4.0, abs=1e-6)
    e1, e2 = torch.eye(16)[:1], torch.eye(16)[1:2]
    assert common.regression_loss(e1, e2).item() == pytest.approx(2.0, abs=1e-6)
    # dense form: cosine over channels, mean over batch and positions
    dense = torch.randn(2, 8, 3, 3)
    assert common.regression_loss(dense, dense).item() == pytest.approx(0.0, abs=1e-6)


def test_regression_loss_stops_gradient_on_target():
    p = torch.randn(4, 8, requires_grad=True)
    z = torch.randn(4, 8, requires_grad=True)
    common.regression_loss(p, z).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert z.grad is None


# --- B2, C4: schedules ----------------------------------------------------------------------------

def test_b2_schedules_at_boundaries():
    images, batch, epochs = 1_281_167, 4096, 1000
    total = epochs * images // batch
    warmup = 10 * images // batch
    assert (total, warmup) == (312_784, 3127)
    peak = 0.2 * batch / 256
    assert common.lr_at(0, total, warmup, peak) == 0.0
    assert common.lr_at(1563, total, warmup, peak) == pytest.approx(1.599488, abs=1e-5)
    assert common.lr_at(3127, total, warmup, peak) == pytest.approx(3.2, abs=1e-9)
    assert common.lr_at(156_392, total, warmup, peak) == pytest.approx(1.625379, abs=1e-5)
    assert common.lr_at(total, total, warmup, peak) == pytest.approx(0.0, abs=1e-12)
    assert common.cosine_tau(0, total, 0.996) == pytest.approx(0.996)
    assert common.cosine_tau(156_392, total, 0.996) == pytest.approx(0.998, abs=1e-9)
    assert common.cosine_tau(total, total, 0.996) == pytest.approx(1.0)
    # LEWEL EMAN numbers (C4)
    assert ([common.cosine_tau(k, 1000, 0.98) for k in (0, 500, 1000)]
            == pytest.approx([0.98, 0.99, 1.0]))


# --- B3: LARS -------------------------------------------------------------------------------------

def reference_lars_step(params, lr, momentum, weight_decay, trust, buffers, adapted):
    """Plain per-parameter LARS (optax order), the formula in common.LARS's docstring."""
    for index, p in enumerate(params):
        g = p.grad.clone()
        if adapted[index]:
            g = g + weight_decay * p.data
            w_norm, u_norm = p.data.norm(), g.norm()
            if w_norm > 0 and u_norm > 0:
                g = g * (trust * w_norm / u_norm)
        buffers[index] = momentum * buffers[index] + g
        p.data -= lr * buffers[index]


def test_b3_trust_ratio_and_lars_matches_reference():
    torch.manual_seed(2)
    w, g = torch.randn(4, 4), torch.randn(4, 4)
    ratio = 1e-3 * w.norm() / (g + 1.5e-6 * w).norm()
    assert ratio.item() == pytest.approx(0.000816783, abs=1e-9)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    reference = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    groups = common.lars_param_groups(model, weight_decay=0.01)
    optimizer = common.LARS(groups, lr=0.5, momentum=0.9)
    adapted = [p.ndim > 1 for p in model.parameters()]
    buffers = [torch.zeros_like(p) for p in reference]
    for step in range(3):
        grads = [torch.randn_like(p) for p in reference]
        for p, r, grad in zip(model.parameters(), reference, grads):
            p.grad, r.grad = grad.clone(), grad.clone()
        optimizer.step()
        reference_lars_step(reference, 0.5, 0.9, 0.01, 1e-3, buffers, adapted)
    for p, r in zip(model.parameters(), reference):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7)


def test_lars_excludes_biases_and_norm_parameters():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    adapted, excluded = common.lars_param_groups(model, 1e-6)
    assert {id(p) for p in adapted["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert adapted["weight_decay"] == 1e-6 and adapted["lars"]
    assert excluded["weight_decay"] == 0.0 and not excluded["lars"] and len(excluded["params"]) == 4


def test_lars_groups_with_a_learning_rate_factor_per_module():
    model = nn.ModuleDict(dict(  # "predictor2" is another module
        backbone=nn.Linear(4, 4),
        head=nn.ModuleDict(dict(predictor=nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))),
        predictor2=nn.Linear(4, 4)))
    groups = common.lars_param_groups(model, 1e-6, {"predictor": 10.0})
    summary = [(g["lr_mult"], g["lars"], g["weight_decay"], len(g["params"])) for g in groups]
    assert summary == [(1.0, True, 1e-6, 2), (1.0, False, 0.0, 2), (10.0, True, 1e-6, 1),
                       (10.0, False, 0.0, 3)]
    predictor = {id(p) for p in model["head"]["predictor"].parameters()}
    assert all((id(p) in predictor) == (g["lr_mult"] == 10.0) for g in groups for p in g["params"])
    assert all(g["lr_mult"] == 1.0 for g in common.lars_param_groups(model, 1e-6))


# --- B5: target network and EMA -------------------------------------------------------------------

def test_b5_target_copy_and_ema_formula():
    torch.manual_seed(0)
    online = nn.ModuleDict(dict(backbone=nn.Linear(4, 4), projector=nn.Linear(4, 2),
                                predictor=nn.Linear(2, 2)))
    target = common.make_target({"backbone": online.backbone, "projector": online.projector})
    for name, param in target.named_parameters():
        assert torch.equal(param, dict(online.named_parameters())[name]) and not param.requires_grad
    assert not any(name.startswith("predictor") for name, _ in target.named_parameters())
    pairs = common.ema_pairs(target, online)
    old = [t.clone() for t in pairs[0]]
    optimizer = torch.optim.SGD(online.parameters(), lr=0.1)
    online.predictor(online.projector(online.backbone(torch.randn(3, 4)))).pow(2).sum().backward()
    optimizer.step()
    common.ema_update(pairs, 0.99)
    for t, o, before in zip(*pairs[:2], old):
        torch.testing.assert_close(t - before, (1 - 0.99) * (o - before), rtol=1e-5, atol=1e-7)


def test_ema_with_buffers_copies_integer_buffers():
    online = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    target = common.make_target({"0": online[0], "1": online[1]})
    online.train()
    online(torch.randn(8, 3))
    pairs = common.ema_pairs(target, nn.ModuleDict({"0": online[0], "1": online[1]}), buffers=True)
    common.ema_update(pairs, 0.5)
    torch.testing.assert_close(target["1"].running_mean, 0.5 * online[1].running_mean)
    assert target["1"].num_batches_tracked.item() == online[1].num_batches_tracked.item() == 1


# --- K1: weighted kNN -----------------------------------------------------------------------------

def test_k1_weighted_knn():
    torch.manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(1000, 64), dim=1)
    labels = torch.randint(0, 10, (1000,))
    queries = torch.nn.functional.normalize(torch.randn(5, 64), dim=1)
    predictions, scores = common.knn_predict(bank, labels, queries, k=200, temperature=0.1,
                                             num_classes=10)
    assert predictions.tolist() == [2, 3, 7, 4, 5]
    assert scores[0].max().item() == pytest.approx(174.1258, abs=1e-3)
    # k is capped by the bank size
    predictions, _ = common.knn_predict(bank[:7], labels[:7], queries, k=200, num_classes=10)
    assert predictions.shape == (5,)


# --- augmentation ---------------------------------------------------------------------------------

def smooth_images(batch=6, size=48, seed=0):
    """Low-frequency uint8 images, so sub-pixel resampling differences stay small."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, 6, 6, generator=generator)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic",
                                        align_corners=False).clamp(0, 1)
    return (x * 255).round().to(torch.uint8)


def unnormalize(views):
    mean = torch.tensor(common.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1)
    return views * std + mean


def test_per_sample_parameters_differ():
    images = smooth_images(1).expand(16, -1, -1, -1).contiguous()  # the same image 16 times
    views, boxes, flips = common.augment(images, common.BYOL_VIEWS[1], 32,
                                         torch.Generator().manual_seed(0))
    assert views.shape == (16, 3, 32, 32) and views.dtype == torch.float32
    assert boxes.unique(dim=0).shape[0] == 16
    assert 0 < flips.sum() < 16
    flat = views.flatten(1)
    # every view differs from every other
    assert (torch.cdist(flat, flat) + torch.eye(16) * 1e9).min() > 1e-3


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_box_and_flip_reproduce_the_view(interpolation):
    images = smooth_images(8, 48)
    recipe = dataclasses.replace(common.GEOMETRY_ONLY, interpolation=interpolation,
                                 crop_scale=(0.2, 1.0))
    views, boxes, flips = common.augment(images, recipe, 24, torch.Generator().manual_seed(3))
    views = unnormalize(views)
    assert ((boxes[:, :2] >= 0) & (boxes[:, 2:] <= 1) & (boxes[:, 2:] > boxes[:, :2])).all()
    for b in range(8):
        x0, y0, x1, y1 = (boxes[b] * 48).tolist()
        left, top = round(x0), round(y0)
        width, height = round(x1) - left, round(y1) - top
        crop = TF.resized_crop(images[b].float() / 255, top, left, height, width, [24, 24],
                               antialias=False)
        if flips[b]:
            crop = crop.flip(-1)
        assert (crop - views[b]).abs().mean() < 0.02, f"sample {b}"


def test_crop_boxes_respect_scale_and_ratio():
    boxes = common.sample_crop_boxes(2000, 40, 60, (0.08, 1.0), (3 / 4, 4 / 3),
                                     torch.Generator().manual_seed(0), "cpu")
    width, height = (boxes[:, 2] - boxes[:, 0]) * 60, (boxes[:, 3] - boxes[:, 1]) * 40
    area = width * height / (40 * 60)
    whole = (area > 0.999)
    assert ((area[~whole] >= 0.08 - 1e-4) & (area[~whole] <= 1 + 1e-4)).all()
    ratio = width[~whole] / height[~whole]
    assert ((ratio >= 3 / 4 - 1e-4) & (ratio <= 4 / 3 + 1e-4)).all()


def test_blur_kernel_size_and_always_blurred_view():
    assert common.blur_kernel_size(224) == 23
    assert common.blur_kernel_size(64) == 7
    seeded = torch.Generator().manual_seed(0)
    images = (torch.rand(8, 3, 224, 224, generator=seeded) * 255).to(torch.uint8)
    sharp = dataclasses.replace(common.GEOMETRY_ONLY, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                                flip_p=0.0)
    blurred = dataclasses.replace(sharp, blur_p=1.0)
    a = unnormalize(common.augment(images, sharp, 224, torch.Generator().manual_seed(0))[0])
    b = unnormalize(common.augment(images, blurred, 224, torch.Generator().manual_seed(0))[0])
    # every view-1 image (blur p = 1) is smoother than its unblurred twin (sigma >= 0.1 px barely
    # blurs: <= there)
    roughness = lambda x: (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2, 3))
    assert (roughness(b) <= roughness(a) + 1e-6).all()
    assert (roughness(b) < 0.9 * roughness(a)).sum() >= 6


def test_colour_ops_match_torchvision():
    seeded = torch.Generator().manual_seed(1)
    images = (torch.rand(4, 3, 16, 16, generator=seeded) * 255).to(torch.uint8)
    x = images.float() / 255
    factors = torch.tensor([0.6, 0.9, 1.2, 1.4])
    shifts = torch.tensor([-0.1, -0.03, 0.05, 0.1])
    for ours, theirs, values in [(common.adjust_brightness, TF.adjust_brightness, factors),
                                 (common.adjust_contrast, TF.adjust_contrast, factors),
                                 (common.adjust_saturation, TF.adjust_saturation, factors),
                                 (common.adjust_hue, TF.adjust_hue, shifts)]:
        out = ours(x.clone(), values)
        for b in range(4):
            torch.testing.assert_close(out[b], theirs(x[b], values[b].item()), atol=1e-5, rtol=0)


def test_grayscale_and_solarize_semantics():
    x = torch.rand(2, 3, 4, 4)
    gray = common._gray(x)
    torch.testing.assert_close(gray.expand(-1, 3, -1, -1),
                               TF.rgb_to_grayscale(x, num_output_channels=3), atol=1e-6, rtol=0)
    solar = common.solarize(x)
    assert torch.equal(solar[x >= 0.5], 1 - x[x >= 0.5]) and torch.equal(solar[x < 0.5], x[x < 0.5])
    recipe = dataclasses.replace(common.GEOMETRY_ONLY, gray_p=1.0)
    images = (torch.rand(3, 3, 16, 16) * 255).to(torch.uint8)
    views = unnormalize(common.augment(images, recipe, 16, torch.Generator().manual_seed(0))[0])
    torch.testing.assert_close(views[:, 0], views[:, 1], atol=1e-5, rtol=0)


def reference_crop_resize(images, boxes, flips, out_size, interpolation):
    """crop_resize's definition: one affine grid per sample through grid_sample (border padding,
    bicubic clamped)."""
    x0, y0, x1, y1 = boxes.unbind(dim=1)
    theta = torch.zeros(boxes.shape[0], 2, 3)
    theta[:, 0, 0] = (x1 - x0) * (1 - 2 * flips.float())
    theta[:, 0, 2] = x0 + x1 - 1
    theta[:, 1, 1] = y1 - y0
    theta[:, 1, 2] = y0 + y1 - 1
    grid = F.affine_grid(theta, (boxes.shape[0], images.shape[1], out_size, out_size),
                         align_corners=False)
    out = F.grid_sample(images, grid, mode=interpolation, padding_mode="border",
                        align_corners=False)
    return out.clamp(0, 1) if interpolation == "bicubic" else out


def reference_color_augment(x, recipe, generator):
    """color_augment's definition, one sample at a time with torchvision's functional ops and the
    same draws.

    Returns (images, ambiguous): ambiguous marks pixels within 1e-4 of the solarize threshold, where
    rounding may put the two implementations on different sides.
    """
    batch, size = x.shape[0], x.shape[-1]
    u = torch.rand(batch, 12, generator=generator)
    order = torch.argsort(torch.rand(batch, 4, generator=generator), dim=1)
    b, c, s, h = recipe.jitter
    kernel = common.blur_kernel_size(size)
    images, ambiguous = [], []
    for i, image in enumerate(x):
        draw = u[i].tolist()
        if draw[4] < recipe.jitter_p:
            for op in order[i].tolist():
                if op == 0:
                    image = TF.adjust_brightness(image, 1 - b + 2 * b * draw[0])
                elif op == 1:
                    image = TF.adjust_contrast(image, 1 - c + 2 * c * draw[1])
                elif op == 2:
                    image = TF.adjust_saturation(image, 1 - s + 2 * s * draw[2])
                else:
                    image = TF.adjust_hue(image, -h + 2 * h * draw[3])
        if draw[5] < recipe.gray_p:
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        sigma = ((recipe.blur_sigma[0] + (recipe.blur_sigma[1] - recipe.blur_sigma[0]) * draw[6])
                 * size / 224)
        if kernel > 1 and draw[7] < recipe.blur_p:
            image = TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
        solarized = draw[8] < recipe.solarize_p
        ambiguous.append(((image - 0.5).abs() < 1e-4) & solarized)
        images.append(TF.solarize(image, 0.5) if solarized else image)
    return torch.stack(images), torch.stack(ambiguous)


ALL_ON = dataclasses.replace(common.BYOL_VIEWS[1], jitter_p=1.0, gray_p=1.0, blur_p=1.0,
                             solarize_p=1.0)
JITTER_ON = dataclasses.replace(ALL_ON, gray_p=0.0)
# later ops on subsets
GRAY_ON = dataclasses.replace(common.BYOL_VIEWS[1], gray_p=1.0, blur_p=0.5, solarize_p=0.5)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("channels,height,width,out_size",
                         [(3, 64, 64, 64), (3, 48, 48, 24), (5, 13, 29, 17)])
def test_crop_resize_matches_grid_sample(interpolation, channels, height, width, out_size):
    """The separable matmuls (CPU) against grid_sample, with values outside [0, 1] as in feature
    maps (DenseSiam)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(8, channels, height, width, generator=generator) * 3 - 1
    boxes = common.sample_crop_boxes(8, height, width, (0.08, 1.0), (3 / 4, 4 / 3), generator,
                                     "cpu")
    boxes[0] = torch.tensor([0.0, 0.0, 1.0, 1.0])        # whole image
    boxes[1] = torch.tensor([-0.2, -0.1, 1.3, 1.1])      # beyond the borders: taps clamped
    boxes[2] = torch.tensor([0.9, 0.95, 0.93, 1.0])      # a few pixels, strongly enlarged
    for flips in (torch.zeros(8, dtype=torch.bool), torch.ones(8, dtype=torch.bool),
                  torch.arange(8) % 3 == 0):
        expected = reference_crop_resize(images, boxes, flips, out_size, interpolation)
        out = common.crop_resize(images, boxes, flips, out_size, interpolation)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("height,width,kernel_size", [(64, 64, 7), (13, 18, 7), (9, 9, 3)])
def test_gaussian_blur_matches_torchvision(height, width, kernel_size):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, height, width, generator=generator)
    sigma = torch.tensor([0.03, 0.3, 0.7, 1.2, 2.5])
    expected = torch.stack([TF.gaussian_blur(image, [kernel_size] * 2, [value] * 2)
                            for image, value in zip(x, sigma.tolist())])
    torch.testing.assert_close(common.gaussian_blur(x, sigma, kernel_size), expected,
                               atol=1e-5, rtol=0)


def test_adjust_hue_matches_colorsys():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 6, 7, generator=generator)
    # gray, black, ties for the max, saturated
    for column, rgb in enumerate([(0.5, 0.5, 0.5), (0.0, 0.0, 0.0), (1.0, 1.0, 0.2),
                                  (0.3, 0.9, 0.9), (0.9, 0.3, 0.9), (1.0, 0.0, 0.0)]):
        x[0, :, :, column] = torch.tensor(rgb).view(3, 1)
    shift = torch.tensor([-0.5, -0.13, 0.07, 0.5])
    expected = torch.empty_like(x)
    for b in range(4):
        for i in range(6):
            for j in range(7):
                hue, saturation, value = colorsys.rgb_to_hsv(*x[b, :, i, j].tolist())
                rgb = colorsys.hsv_to_rgb((hue + shift[b].item()) % 1.0, saturation, value)
                expected[b, :, i, j] = torch.tensor(rgb)
    torch.testing.assert_close(common.adjust_hue(x, shift), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [24, 33])
@pytest.mark.parametrize("recipe",
                         [*common.BYOL_VIEWS, ALL_ON, JITTER_ON, GRAY_ON, common.GEOMETRY_ONLY],
                         ids=["byol1", "byol2", "all-on", "jitter-on", "gray-on", "all-off"])
def test_color_augment_matches_per_sample_torchvision(recipe, size):
    """Fused jitter passes and per-subset ops = torchvision's ops one sample at a time, same draws,
    same order."""
    x = torch.rand(12, 3, size, size, generator=torch.Generator().manual_seed(size))
    before = x.clone()
    out = common.color_augment(x, recipe, torch.Generator().manual_seed(1))
    expected, ambiguous = reference_color_augment(x, recipe, torch.Generator().manual_seed(1))
    assert torch.equal(x, before)  # DenseSiam colours the same pixels twice
    assert ambiguous.float().mean() < 1e-3
    torch.testing.assert_close(out[~ambiguous], expected[~ambiguous], atol=1e-5, rtol=0)


@pytest.mark.parametrize("recipe", common.BYOL_VIEWS, ids=["byol1", "byol2"])
def test_augment_matches_reference_pipeline(recipe):
    """Same draws in the same order: boxes, flips, crop, colour, normalise."""
    seeded = torch.Generator().manual_seed(0)
    images = (torch.rand(16, 3, 40, 40, generator=seeded) * 255).to(torch.uint8)
    views, boxes, flips = common.augment(images, recipe, 33, torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(2)
    expected_boxes = common.sample_crop_boxes(16, 40, 40, recipe.crop_scale, recipe.crop_ratio,
                                              generator, "cpu")
    expected_flips = torch.rand(16, generator=generator) < recipe.flip_p
    crops = reference_crop_resize(images.float() / 255, expected_boxes, expected_flips, 33,
                                  recipe.interpolation)
    expected, ambiguous = reference_color_augment(crops, recipe, generator)
    assert torch.equal(boxes, expected_boxes) and torch.equal(flips, expected_flips)
    torch.testing.assert_close(unnormalize(views)[~ambiguous], expected[~ambiguous],
                               atol=1e-5, rtol=0)


def test_augmentation_is_a_function_of_the_generator_seed():
    images = smooth_images(4)
    a = common.augment(images, common.BYOL_VIEWS[0], 32, common.step_generator("cpu", 0, 0, 5))
    b = common.augment(images, common.BYOL_VIEWS[0], 32, common.step_generator("cpu", 0, 0, 5))
    c = common.augment(images, common.BYOL_VIEWS[0], 32, common.step_generator("cpu", 0, 0, 6))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


# --- backbone, data, config, checkpoints ----------------------------------------------------------

def test_trunk_stages_and_torchvision_names():
    import torchvision

    trunk = common.ResNetTrunk("resnet18")
    maps = trunk(torch.randn(2, 3, 64, 64))
    assert ([tuple(m.shape[1:]) for m in maps.values()]
            == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)])
    assert common.ResNetTrunk("resnet50").channels == dict(res2=256, res3=512, res4=1024, res5=2048)
    cifar = common.ResNetTrunk("resnet18", stem="cifar")(torch.randn(1, 3, 32, 32))
    assert cifar["res5"].shape[-1] == 4
    missing = torchvision.models.resnet18().load_state_dict(trunk.state_dict(),
                                                            strict=False).missing_keys
    assert sorted(missing) == ["fc.bias", "fc.weight"]


def test_synthetic_dataset_is_deterministic_and_balanced():
    images, labels = common.make_synthetic(60, 32, seed=3)
    again, _ = common.make_synthetic(60, 32, seed=3)
    assert images.dtype == torch.uint8 and images.shape == (60, 3, 32, 32)
    assert torch.equal(images, again)
    assert torch.bincount(labels).tolist() == [6] * 10


def test_tensor_loader_shards_and_resumes_mid_epoch():
    images = torch.arange(40).view(40, 1, 1, 1).expand(40, 3, 2, 2).to(torch.uint8)
    labels = torch.arange(40)
    ranks = [common.TensorLoader(images, labels, 4, r, 2, seed=1) for r in range(2)]
    seen = [torch.cat([y for _, y in loader]) for loader in ranks]
    assert len(set(seen[0].tolist()) & set(seen[1].tolist())) == 0 and len(seen[0]) == 20
    ranks[0].set_epoch(0, start_batch=2)
    assert torch.equal(torch.cat([y for _, y in ranks[0]]), seen[0][8:])


@dataclasses.dataclass(frozen=True)
class _Cfg:
    batch_size: int = 8      # global
    lr: float = 0.1
    name: str = "a"
    flag: bool = False
    stages: tuple = ("res2",)


def test_parse_config_precedence(tmp_path):
    presets = {"big": dict(batch_size=64, lr=1.0)}
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("lr: 2\nstages: [res3, res4]\n")
    cfg = common.parse_config(_Cfg, presets, ["--preset", "big", "--config", str(yaml_file),
                                              "--name", "b", "--flag"])
    assert cfg == _Cfg(batch_size=64, lr=2.0, name="b", flag=True, stages=("res3", "res4"))
    flags = common.parse_config(_Cfg, presets, ["--stages", "res2,res5", "--no-flag"])
    assert flags.stages == ("res2", "res5")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 3.0
    with pytest.raises(common.InputError, match="unknown preset"):
        common.parse_config(_Cfg, presets, ["--preset", "huge"])
    with pytest.raises(common.InputError, match="--batch-size"):
        common.parse_config(_Cfg, presets, ["--batch-size", "many"])


@dataclasses.dataclass(frozen=True)
class _Documented:
    """A config whose comments are its --help."""
    # data
    size: int = 32              # px of a view; 90 % of the paper's
    mark: str = "#1"            # a default with a hash in it
    # model
    width: float = 0.5          # hidden width, as a fraction
                                # of the input width
    stages: tuple = ("res2", "res5")
    # run
    sync: bool = True           # SyncBN
    name: str = ""              # "" = none


def help_text(config_cls, presets, capsys):
    """--help of parse_config, whitespace collapsed (argparse wraps it to the terminal's width)."""
    with pytest.raises(SystemExit) as stop:
        common.parse_config(config_cls, presets, ["--help"])
    assert stop.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_help_shows_each_fields_comment_and_default(capsys):
    """The comment after a field (and its comment-only continuation lines, not a `# group` line
    at the fields' indentation) and the default, as typed on the command line."""
    assert common.field_comments(_Documented) == {
        "size": "px of a view; 90 % of the paper's", "mark": "a default with a hash in it",
        "width": "hidden width, as a fraction of the input width", "sync": "SyncBN",
        "name": '"" = none'}
    text = help_text(_Documented, {"small": {}, "big": {}}, capsys)
    for shown in ("--size INT px of a view; 90 % of the paper's (default: 32)",
                  "--mark STR a default with a hash in it (default: #1)",
                  "--width FLOAT hidden width, as a fraction of the input width (default: 0.5)",
                  "--stages LIST (default: res2,res5)",
                  "--sync [BOOL] SyncBN (default: true; --no-sync turns it off)",
                  '--name STR "" = none (default: "")',
                  "--preset NAME a recipe from PRESETS, applied before --config and the flags: "
                  "small, big"):
        assert shown in text, shown
    assert "--preset" not in help_text(_Documented, {}, capsys)  # nothing to choose from


def test_byol_help_reads_the_config_comments(capsys):
    """`python byol.py --help`: tau_base's comment as written in byol.py (read here line by line,
    not by tokens) and its default."""
    import byol

    lines = open(byol.__file__).read().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("    tau_base:"))
    parts = [lines[first].split("#", 1)[1].strip()]
    for line in lines[first + 1:]:  # comment-only lines indented past the field names continue it
        if not line.lstrip().startswith("#") or not line.startswith("      "):
            break
        parts.append(line.split("#", 1)[1].strip())
    comment = " ".join(parts)
    with pytest.raises(SystemExit):
        byol.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"--tau-base FLOAT {comment} (default: {byol.Config.tau_base})" in text
    assert "initial target momentum" in comment
    assert "--preset NAME" in text and all(name in text for name in byol.PRESETS)


@pytest.mark.parametrize("avx512_bf16, amx, chosen", [
    (False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16"), (None, None, "fp32")])
def test_precision_auto_follows_the_cpu(monkeypatch, capsys, avx512_bf16, amx, chosen):
    """auto: bf16 on a CPU with AVX512-BF16 or AMX, fp32 without (None: torch too old to tell);
    bf16 and fp32 are what they say on any CPU. bf16 = autocast dtype and channels_last."""
    probes = {"_is_avx512_bf16_supported": avx512_bf16, "_is_amx_tile_supported": amx}
    for probe, native in probes.items():
        if native is None:
            monkeypatch.delattr(torch.cpu, probe, raising=False)
        else:
            monkeypatch.setattr(torch.cpu, probe, lambda native=native: native)
    dist = common.Dist(0, 0, 1, torch.device("cpu"))
    pairs = {"bf16": (torch.bfloat16, torch.channels_last), "fp32": (None, torch.contiguous_format)}
    assert common.device_setup(dist, "auto") == pairs[chosen]
    assert common.device_setup(dist, "bf16") == pairs["bf16"]
    assert common.device_setup(dist, "fp32") == pairs["fp32"]
    assert common.resolve_precision(torch.device("cuda"), "auto") == "bf16"  # no GPU needed
    common.print_run_header("byol", _Precision(), dist)
    native = "native" if chosen == "bf16" else "no native"
    assert f"precision {chosen} (auto: {native} bf16 on this CPU)" in capsys.readouterr().out


@dataclasses.dataclass(frozen=True)
class _Precision:
    precision: str = "auto"


def test_bad_precision_is_one_clear_line(tmp_path, capsys):
    import byol

    with pytest.raises(SystemExit) as stop:
        byol.main(["--precision", "fp16", "--device", "cpu", "--out", str(tmp_path)])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error == "error: --precision must be one of auto, bf16, fp32, got 'fp16'\n"
    assert not any(tmp_path.iterdir())  # stopped before anything was written


def test_atomic_checkpoint_and_clear_errors(tmp_path):
    path = tmp_path / "last.pt"
    common.save_checkpoint(dict(model={"w": torch.ones(2)}, config={"arch": "resnet18"},
                                method="byol"), path)
    assert common.load_checkpoint(path, "byol")["model"]["w"].sum() == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind
    with pytest.raises(common.InputError, match="written by 'byol', not 'lewel'"):
        common.load_checkpoint(path, "lewel")
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(common.InputError, match="unreadable"):
        common.load_checkpoint(path)
    with pytest.raises(common.InputError, match="does not exist"):
        common.load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_colour_ops_match_eager():
    """--compile swaps in compiled jitter ops: same views as eager (the subsets change size: dynamic
    shapes)."""
    images = common.make_synthetic(24, 32, seed=5)[0]
    try:
        views = {}
        for compiled in (False, True):
            common.compile_colour_ops(compiled)
            views[compiled] = [common.augment(images[:n], common.BYOL_VIEWS[0], 32,
                                              torch.Generator().manual_seed(n))[0]
                               for n in (24, 17)]
        for eager, fused in zip(views[False], views[True]):
            torch.testing.assert_close(fused, eager, atol=1e-5, rtol=0)
    finally:
        common.compile_colour_ops(False)
