"""MCL: montage assembly (Alg. 1), region windows and level mapping (Sec. 3.2), matching modes
(Sec. 3.3) and the multi-level InfoNCE (Eq. 2), checked against the official code
(github.com/GuoQiushan/MCL) where it has one."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import common
import eval_linear
import mcl
from ddp_runner import assert_same_parameters, run_two_processes



# --------------------------------------------------------------------------------------------------
# Montage assembly (Alg. 1; official random_combine_img in openselfsup/models/mcl.py)


def index_images(batch, size):
    """Images whose pixels all equal their index: batch x 3 x size x size."""
    return (torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1)
            .expand(batch, 3, size, size).contiguous())


def test_montage_layout_with_known_permutation():
    images = index_images(4, 8)
    order = torch.tensor([0, 4, 3, 7, 2, 5, 1, 6])       # modulo 4: [0, 0, 3, 3, 2, 1, 1, 2]
    montages, ids = mcl.assemble_montages(images, ratio=2, num_montages=2, order=order)
    assert ids.tolist() == [0, 0, 3, 3, 2, 1, 1, 2]
    assert montages.shape == (2, 3, 8, 8)
    tile_values = montages[:, 0, ::4, ::4]                 # one pixel of every 4x4 tile: 2 x 2 x 2
    assert tile_values.tolist() == [[[0, 0], [3, 3]], [[2, 1], [1, 2]]]
    for b in range(2):
        for row in range(2):
            for col in range(2):
                tile = montages[b, :, row * 4:(row + 1) * 4, col * 4:(col + 1) * 4]
                assert torch.all(tile == ids[b * 4 + row * 2 + col])


def test_montage_random_permutation_structure_and_counts():
    batch, size = 8, 16
    images = index_images(batch, size)
    generator = torch.Generator().manual_seed(0)
    counts = mcl.montage_counts(batch, (1, 1, 1, 2))
    assert counts == [8, 2, 1, 1]
    for level in (1, 2, 3):
        ratio = 2 ** level
        montages, ids = mcl.assemble_montages(images, ratio, counts[level], generator=generator)
        tile = size // ratio
        slots = counts[level] * ratio * ratio
        for m in range(counts[level]):
            for row in range(ratio):
                for col in range(ratio):
                    window = montages[m, :, row * tile:(row + 1) * tile,
                                      col * tile:(col + 1) * tile]
                    assert torch.all(window == ids[m * ratio * ratio + row * ratio + col])
        appearances = torch.bincount(ids, minlength=batch)
        expected = [math.ceil((slots - i) / batch) for i in range(batch)]
        assert appearances.tolist() == expected
        assert min(expected) >= (1, 1, 1, 2)[level]


def test_official_montage_counts():
    counts = mcl.montage_counts(128, (1, 1, 1, 2))
    assert counts == [128, 32, 8, 4]                     # official batch_sizes
    assert sum(counts) == 172                            # inputs per branch per GPU
    tiles = [c * 4 ** s for s, c in enumerate(counts)]
    assert tiles == [128, 128, 128, 256]


def test_downsampling_is_nearest():
    image = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    montage, _ = mcl.assemble_montages(image, ratio=2, num_montages=1,
                                       order=torch.zeros(4, dtype=torch.long))
    assert montage[0, 0, :2, :2].flatten().tolist() == [0, 2, 8, 10]


# --------------------------------------------------------------------------------------------------
# Region windows (Sec. 3.2; official DetConvGpNonLinearHead in openselfsup/models/necks.py)


def quadrant_map():
    feature = torch.zeros(1, 2, 14, 14)
    feature[:, :, :7, 7:] = 1
    feature[:, :, 7:, :7] = 2
    feature[:, :, 7:, 7:] = 3
    return feature


def test_window_order():
    windows = mcl.tile_windows(quadrant_map(), ratio=2)
    assert windows.shape == (4, 2, 7, 7)
    assert windows.mean(dim=(1, 2, 3)).tolist() == [0, 1, 2, 3]
    # region_windows picks exact slicing for lattice-aligned tiles (28 px tiles on a stride-4 map =
    # 7 cells)
    assert torch.equal(mcl.region_windows(quadrant_map(), ratio=2, tile_pixels=28, stride=4),
                       windows)


def test_roi_windows_follow_tile_order():
    # 14 px tiles on a stride-2 map; RoIAlign mixes neighbours at window borders, the interior must
    # be exact.
    windows = mcl.tile_windows_roi(quadrant_map(), ratio=2, tile_pixels=14, stride=2, cells=7)
    assert windows.shape == (4, 2, 7, 7)
    interior = windows[:, :, 1:6, 1:6]
    for tile in range(4):
        assert torch.allclose(interior[tile], torch.full_like(interior[tile], float(tile)))


def test_roi_windows_read_their_own_montage_beyond_256_under_bf16_autocast():
    """bf16 holds integers exactly only up to 256 (257 -> 256): RoI batch indices stay float32.

    262 montages of 2 x 2 tiles (10 px, stride 2: 5-px tiles sit off the lattice, so RoIAlign runs);
    montage m is the constant m % 64 (exact in bf16; 256 -> 0 and 257 -> 1 differ). Every tile must
    read its own montage.
    """
    montages = 262
    values = torch.arange(montages) % 64
    feature = values.view(-1, 1, 1, 1).expand(montages, 1, 5, 5).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        windows = mcl.region_windows(feature, ratio=2, tile_pixels=5, stride=2)
    assert windows.shape == (montages * 4, 1, 2, 2)
    expected = values.repeat_interleave(4).float()          # tile m * 4 + i lies in montage m
    assert torch.equal(windows.float().mean(dim=(1, 2, 3)), expected)


def test_montage_tiles_land_in_their_windows():
    # End to end on the lattice: a montage of index images used as its own (stride-1) feature map.
    images = index_images(8, 16)
    montages, ids = mcl.assemble_montages(images, 4, 2, generator=torch.Generator().manual_seed(3))
    windows = mcl.region_windows(montages, ratio=4, tile_pixels=4, stride=1)
    assert torch.equal(windows.mean(dim=(1, 2, 3)), ids.float())


# --------------------------------------------------------------------------------------------------
# Loss (Eq. 2, x 2T w_s as openselfsup/models/heads/latent_pred_head.py; modes of Sec. 3.3)


def test_loss_scaling_2T_w():
    torch.manual_seed(0)
    predictions, keys = torch.randn(6, 16), F.normalize(torch.randn(10, 16), dim=1)
    labels = torch.randint(0, 10, (6,))
    plain_ce = F.cross_entropy(F.normalize(predictions, dim=1) @ keys.T, labels)
    level = mcl.info_nce(predictions, keys, labels, temperature=1.0)
    assert torch.allclose(0.5 * level, plain_ce, atol=1e-6)     # x 2T x w = 1 at T = 1, w = 1/2
    assert torch.allclose(0.25 * level, plain_ce / 2, atol=1e-6)
    assert torch.allclose(0.125 * level, plain_ce / 4, atol=1e-6)
    tau = 0.2
    scaled = F.cross_entropy(F.normalize(predictions, dim=1) @ keys.T / tau, labels) * 2 * tau
    assert torch.allclose(mcl.info_nce(predictions, keys, labels, tau), scaled, atol=1e-6)


def test_matching_pairs():
    assert mcl.matching_pairs("a", 4) == [(0, 0), (1, 0), (2, 0), (3, 0)]
    assert mcl.matching_pairs("b", 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert mcl.matching_pairs("c", 4) == [(0, 1), (1, 0), (1, 2), (2, 1), (2, 3), (3, 2)]
    assert len(mcl.matching_pairs("d", 4)) == 16
    with pytest.raises(ValueError):
        mcl.matching_pairs("e", 4)


def test_per_image_keys():
    torch.manual_seed(0)
    embeddings = torch.randn(5, 8)
    keys = mcl.per_image_keys(embeddings, torch.tensor([0, 1, 2, 1, 0]), 3)
    unit = F.normalize(embeddings, dim=1)
    assert torch.allclose(keys[2], unit[2])
    assert torch.allclose(keys[0], F.normalize(unit[0] + unit[4], dim=0))
    assert torch.allclose(keys.norm(dim=1), torch.ones(3))


def make_tile_ids(batch, num_levels, level_copies, seed):
    generator = torch.Generator().manual_seed(seed)
    counts = mcl.montage_counts(batch, level_copies)
    images = index_images(batch, 16)
    ids = [torch.arange(batch)]
    for level in range(1, num_levels):
        ids.append(mcl.assemble_montages(images, 2 ** level, counts[level], generator=generator)[1])
    return ids


@pytest.mark.parametrize("mode", ["a", "b", "c", "d"])
def test_modes_pair_every_tile_with_its_own_image(mode):
    """Oracle embeddings = one-hot of the global image id: if every positive is the right image,
    each pair's loss is exactly the 'perfect' InfoNCE value 2T * -log(e^(1/T) / (e^(1/T) + M - 1)),
    so the total is known in closed form."""
    batch, world, rank, levels, tau = 8, 2, 1, 4, 0.5
    weights = (0.5, 0.25, 0.125, 0.125)
    offset = rank * batch
    num_keys = batch * world
    tile_ids = [make_tile_ids(batch, levels, (1, 1, 1, 2), seed) for seed in (1, 2)]
    predictions = [[F.one_hot(ids + offset, num_keys).float() * 3.0 for ids in branch]
                   for branch in tile_ids]
    keys = []
    for branch in tile_ids:
        per_level = []
        for ids in branch:
            # this rank's keys, N x M
            local = mcl.per_image_keys(F.one_hot(ids + offset, num_keys).float(), ids, batch)
            other_rank = F.one_hot(torch.arange(batch), num_keys).float()  # rank 0's keys
            per_level.append(torch.cat([other_rank, local]))               # gathered, rank order
        keys.append(per_level)
    pairs = mcl.matching_pairs(mode, levels)
    total, terms = mcl.mcl_loss(predictions, keys, tile_ids, pairs, weights, tau, offset)
    perfect = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + num_keys - 1)) * 2 * tau
    assert torch.isfinite(total)
    assert total.item() == pytest.approx(2 * sum(weights) * perfect, rel=1e-5)
    assert set(terms) == {f"{s}->{t}" for s, t in pairs}
    # a wrong pairing (labels shifted by one image) costs more
    shifted = [[(ids + 1) % batch for ids in branch] for branch in tile_ids]
    wrong, _ = mcl.mcl_loss(predictions, keys, shifted, pairs, weights, tau, offset)
    assert wrong.item() > total.item() + 1.0


def test_mode_a_is_the_official_formula():
    """Mode (a): sum over branches and levels of
    w_s * 2T * CE(cos(pred, other branch's level-0 targets) / T)."""
    torch.manual_seed(0)
    batch, levels, tau = 6, 3, 1.0
    weights = (0.5, 0.25, 0.25)
    tile_ids = [make_tile_ids(batch, levels, (1, 1, 2), seed) for seed in (4, 5)]
    predictions = [[torch.randn(len(ids), 8, requires_grad=True) for ids in branch]
                   for branch in tile_ids]
    targets = [F.normalize(torch.randn(batch, 8), dim=1) for _ in range(2)]
    keys = [[targets[b]] + [None] * (levels - 1) for b in range(2)]
    total, _ = mcl.mcl_loss(predictions, keys, tile_ids, mcl.matching_pairs("a", levels), weights,
                            tau, 0)
    expected = 0.0
    for b in range(2):
        for s in range(levels):
            logits = F.normalize(predictions[b][s], dim=1) @ targets[1 - b].T / tau
            log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
            nll = -log_prob[torch.arange(len(tile_ids[b][s])), tile_ids[b][s]].mean()
            expected = expected + weights[s] * 2 * tau * nll
    assert torch.allclose(total, expected, atol=1e-6)
    total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for branch in predictions for p in branch)


def test_modes_c_and_d_weigh_each_pair_w_s_over_n_s_as_documented():
    """L = sum over (s, t) of (w_s / n_s) * 2T * CE, n_s = the number of target levels of s; the
    module docstring and the README's formula must state that same formula."""
    torch.manual_seed(0)
    batch, levels, tau = 6, 3, 0.5
    weights = (0.5, 0.3, 0.2)
    tile_ids = [make_tile_ids(batch, levels, (1, 1, 2), seed) for seed in (6, 7)]
    predictions = [[torch.randn(len(ids), 8) for ids in branch] for branch in tile_ids]
    keys = [[F.normalize(torch.randn(batch, 8), dim=1) for _ in range(levels)] for _ in range(2)]
    targets_of = {"c": {0: [1], 1: [0, 2], 2: [1]}, "d": {s: [0, 1, 2] for s in range(levels)}}
    for mode, targets in targets_of.items():
        pairs = mcl.matching_pairs(mode, levels)
        total, _ = mcl.mcl_loss(predictions, keys, tile_ids, pairs, weights, tau, 0)
        expected = 0.0
        for b in range(2):
            for s in range(levels):
                rows = torch.arange(len(tile_ids[b][s]))
                for t in targets[s]:
                    logits = F.normalize(predictions[b][s], dim=1) @ keys[1 - b][t].T / tau
                    nll = -logits.log_softmax(dim=1)[rows, tile_ids[b][s]].mean()
                    expected = expected + weights[s] / len(targets[s]) * 2 * tau * nll
        assert torch.allclose(total, expected, atol=1e-6), mode
    assert "(w_s / n_s) * 2T" in mcl.__doc__
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as readme:
        row = next(line for line in readme if line.startswith("| `mcl.py`"))
    assert "(w_s/n_s)·2T" in row and "n_s =" in row.split("(w_s/n_s)·2T")[1]     # and defines n_s


# --------------------------------------------------------------------------------------------------
# Modules and export


def test_fpn_and_head_shapes():
    torch.manual_seed(0)
    maps = {"res2": torch.randn(2, 8, 16, 16), "res3": torch.randn(2, 16, 8, 8),
            "res4": torch.randn(2, 32, 4, 4), "res5": torch.randn(2, 64, 2, 2)}
    fpn = mcl.FPN({"res2": 8, "res3": 16, "res4": 32, "res5": 64}, dim=24)
    pyramid = fpn(maps)
    assert {k: tuple(v.shape) for k, v in pyramid.items()} == {
        "p2": (2, 24, 16, 16), "p3": (2, 24, 8, 8), "p4": (2, 24, 4, 4), "p5": (2, 24, 2, 2)}
    head = mcl.RegionHead(dim=24, hidden_dim=32, out_dim=12)
    # 4x4 tiles of 2x2 cells
    windows = mcl.region_windows(pyramid["p3"], ratio=4, tile_pixels=8, stride=4)
    assert windows.shape == (32, 24, 2, 2)
    assert head(windows).shape == (32, 12)


# --------------------------------------------------------------------------------------------------
# Schedules (Sec. 4.1), training steps, DDP, resume, CLI

TINY = ["--synthetic-size", "32", "--image-size", "32", "--batch-size", "16", "--fpn-dim", "16",
        "--hidden-dim", "64", "--proj-dim", "32", "--epochs", "1", "--knn-every", "0",
        "--log-every", "1"]


def test_schedules_of_the_imagenet_preset():
    cfg = common.parse_config(mcl.Config, mcl.PRESETS, ["--preset", "imagenet"])
    peak = cfg.base_lr * cfg.batch_size / 256
    # 100 epochs and 10 warmup epochs of 1 281 167 images at B = 4096
    total, warmup = 31270, 3127
    assert peak == 16.0
    assert common.lr_at(warmup, total, warmup, peak, cfg.final_lr) == pytest.approx(16.0)
    assert common.lr_at(total, total, warmup, peak, cfg.final_lr) == pytest.approx(1e-4)
    # NOTE: the official warmup starts at 16 * 1e-4; ours starts at 0 and is within that after one
    # step
    assert common.lr_at(0, total, warmup, peak, cfg.final_lr) == 0.0
    assert common.lr_at(1, total, warmup, peak, cfg.final_lr) < 16e-4 + 16 / warmup
    assert common.cosine_tau(0, total, cfg.tau_base) == pytest.approx(0.99)
    assert common.cosine_tau(total, total, cfg.tau_base) == pytest.approx(1.0)
    assert ((cfg.weight_decay, cfg.epochs, cfg.temperature, cfg.level_weights)
            == (1e-5, 100, 1.0, (0.5, 0.25, 0.125, 0.125)))



def test_the_gradient_norm_is_clipped_before_each_step(tmp_path, monkeypatch):
    """Official configs/selfsup/MCL/MCL.py: grad_clip max_norm 500, over every online parameter."""
    assert common.parse_config(mcl.Config, mcl.PRESETS, ["--preset", "imagenet"]).grad_clip == 500
    clip = torch.nn.utils.clip_grad_norm_
    calls = []

    def recording_clip(parameters, max_norm, **kwargs):
        parameters = list(parameters)
        clip(parameters, max_norm, **kwargs)
        norm = torch.stack([p.grad.norm() for p in parameters if p.grad is not None]).norm()
        calls.append((max_norm, len(parameters), norm.item()))

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    mcl.main(TINY + ["--out", str(tmp_path), "--device", "cpu", "--stop-after", "2",
                     "--grad-clip", "0.01"])
    online = len(list(mcl.MCL(common.parse_config(mcl.Config, mcl.PRESETS, TINY)).parameters()))
    assert [(max_norm, count) for max_norm, count, _ in calls] == [(0.01, online)] * 2
    assert all(norm <= 0.01 * (1 + 1e-4) for _, _, norm in calls), calls

def tiny_model(mode):
    cfg = common.parse_config(mcl.Config, mcl.PRESETS, TINY + ["--mode", mode])
    torch.manual_seed(0)
    model = mcl.MCL(cfg)
    target = common.make_target({"backbone": model.backbone, "fpn": model.fpn, "head": model.head})
    return cfg, model, target


@pytest.mark.parametrize("mode", ["a", "b", "c", "d"])
def test_one_training_step_per_mode(mode):
    """Finite loss, gradient on every online parameter, none on the target (which has no
    predictors)."""
    cfg, model, target = tiny_model(mode)
    batch = 8
    images = common.make_synthetic(batch, cfg.image_size)[0]
    counts = mcl.montage_counts(batch, cfg.level_copies)
    geometry = (cfg.image_size, mcl.P5_STRIDE[cfg.stem])
    pairs = mcl.matching_pairs(mode, 4)
    stacks, tile_ids = mcl.make_inputs(images, common.BYOL_VIEWS, cfg, counts,
                                       torch.Generator().manual_seed(0), torch.contiguous_format)
    assert [s.shape[0] for s in stacks] == [sum(counts)] * 2
    assert stacks[0].shape[-1] == cfg.image_size
    predictions = model(stacks, counts, geometry)
    assert [p.shape[0] for p in predictions[0]] == [c * 4 ** s for s, c in enumerate(counts)]
    target_levels = sorted({t for _, t in pairs})
    with torch.no_grad():
        targets = [mcl.embed(target, stack, counts, geometry, target_levels) for stack in stacks]
    assert (targets[0][1] is None) == (mode == "a")
    keys = mcl.target_keys(targets, tile_ids, batch)
    loss, terms = mcl.mcl_loss(predictions, keys, tile_ids, pairs, cfg.level_weights,
                               cfg.temperature, 0)
    assert torch.isfinite(loss) and len(terms) == len(pairs)
    loss.backward()
    assert not any(name.startswith("predictors") for name, _ in target.named_parameters())
    assert all(p.grad is None for p in target.parameters())
    missing = [name for name, p in model.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


class StampedPyramid(torch.nn.Module):
    """Stands in for the FPN: P_k (shaped like res_k) is the constant 1000 k + n on stack row n."""

    def forward(self, maps):
        pyramid = {}
        for stage, feature in maps.items():
            k = int(stage[len("res"):])
            rows = torch.arange(feature.shape[0], dtype=torch.float32).view(-1, 1, 1, 1)
            pyramid[f"p{k}"] = (1000 * k + rows).expand(-1, 1, *feature.shape[-2:])
        return pyramid


class WindowMean(torch.nn.Module):
    """Stands in for the region head: a window's mean (K x 1), i.e. which map and row it read."""

    def forward(self, windows):
        return windows.mean(dim=(2, 3))


@pytest.mark.parametrize("stem, image_size", [("imagenet", 32), ("cifar", 16)])
def test_forward_reads_level_s_from_p5_minus_s(stem, image_size):
    """Sec. 3.2: tiles downsampled by 2^s are read from P(5-s). Through MCL.forward (both branches)
    and the target's embed, every level-s tile embedding must come from P(5-s), row = its own
    montage."""
    args = TINY + ["--stem", stem, "--image-size", str(image_size)]
    cfg = common.parse_config(mcl.Config, mcl.PRESETS, args)
    torch.manual_seed(0)
    model = mcl.MCL(cfg)
    model.fpn, model.head = StampedPyramid(), WindowMean()
    model.predictors = torch.nn.ModuleList([torch.nn.Identity() for _ in model.predictors])
    batch = 8
    counts = mcl.montage_counts(batch, cfg.level_copies)                      # [8, 2, 1, 1]
    geometry = (image_size, mcl.P5_STRIDE[stem])
    stacks = [torch.zeros(sum(counts), 3, image_size, image_size) for _ in range(2)]
    with torch.no_grad():
        predictions = model(stacks, counts, geometry)
        target_embeddings = mcl.embed(model, stacks[0], counts, geometry, range(4))
    for embeddings in predictions + [target_embeddings]:
        first_row = 0
        for s, count in enumerate(counts):
            tiles_per_montage = 4 ** s
            expected = [1000 * (5 - s) + first_row + tile // tiles_per_montage
                        for tile in range(count * tiles_per_montage)]
            assert embeddings[s][:, 0].tolist() == expected, f"level {s}"
            first_row += count


def test_two_process_ddp_keeps_ranks_identical(tmp_path):
    states = run_two_processes("mcl", TINY + ["--mode", "c"], str(tmp_path))
    assert_same_parameters(states)


def test_resume_is_exact_and_export_selects_detector_modules(tmp_path):
    # 3 steps in the epoch
    args = TINY + ["--device", "cpu", "--batch-size", "8", "--synthetic-size", "24"]
    mcl.main(args + ["--out", str(tmp_path / "straight")])
    assert mcl.main(args + ["--out", str(tmp_path / "resumed"), "--stop-after", "1"])["step"] == 1
    mcl.main(args + ["--out", str(tmp_path / "resumed"), "--resume"])
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    for part in ("model", "target"):
        for name, value in straight[part].items():
            assert torch.equal(value, resumed[part][name]), f"{part}.{name}"
    # eval_linear.py's export selects backbone, FPN and head: what the target holds
    model_state = straight["model"]
    backbone = eval_linear.backbone_weights(model_state)
    exported = {f"backbone.{key}": value for key, value in backbone.items()}
    exported.update(eval_linear.fpn_head_weights(model_state))
    assert {key.split(".")[0] for key in exported} == {"backbone", "fpn", "head"}
    assert set(exported) == set(straight["target"])
    assert all(torch.equal(exported[key], model_state[key]) for key in exported)


@pytest.mark.parametrize("args, message", [
    (["--mode", "e"], "--mode must be a, b, c or d"),
    (["--level-weights", "0.5,0.5"], "--level-copies has 4 entries"),
    (["--level-copies", "2,1,1,2"], "--level-copies must be positive integers starting with 1"),
    (["--image-size", "36"], "must be divisible by 8"),
    (["--temperature", "0"], "--temperature must be positive"),
    (["--lars-form", "sgd"], "--lars-form must be one of optax, openselfsup"),
])
def test_bad_flags(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        mcl.main(["--out", str(tmp_path)] + TINY + args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("extra", [
    # 3 levels: FPN P3..P5 only
    ["--level-weights", "0.5,0.25,0.25", "--level-copies", "1,1,1", "--mode", "b"],
    # 48 px: tiles off the stride-32 lattice -> RoIAlign path
    ["--image-size", "48", "--mode", "d"],
])
def test_other_geometries_train(extra):
    cfg = common.parse_config(mcl.Config, mcl.PRESETS, TINY + extra)
    torch.manual_seed(0)
    model = mcl.MCL(cfg)
    levels = len(cfg.level_weights)
    assert sorted(model.fpn.output) == [f"p{k}" for k in range(6 - levels, 6)]
    batch = 8
    images = common.make_synthetic(batch, cfg.image_size)[0]
    counts = mcl.montage_counts(batch, cfg.level_copies)
    geometry = (cfg.image_size, mcl.P5_STRIDE[cfg.stem])
    stacks, tile_ids = mcl.make_inputs(images, common.BYOL_VIEWS, cfg, counts,
                                       torch.Generator().manual_seed(0), torch.contiguous_format)
    predictions = model(stacks, counts, geometry)
    target = common.make_target({"backbone": model.backbone, "fpn": model.fpn, "head": model.head})
    with torch.no_grad():
        targets = [mcl.embed(target, stack, counts, geometry, range(levels)) for stack in stacks]
    pairs = mcl.matching_pairs(cfg.mode, levels)
    loss, _ = mcl.mcl_loss(predictions, mcl.target_keys(targets, tile_ids, batch), tile_ids, pairs,
                           cfg.level_weights, cfg.temperature, 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
