"""eval_linear.py: kNN + linear probe per stage, random-init baseline, the Table 7 layout, two-view
distances (Fig. 3), export (torchvision, MCL FPN/head, detectron2 names)."""

import dataclasses
import os

import pytest
import torch
import torchvision

import byol
import common
import eval_linear
import mcl
import transfer

TINY = ["--synthetic-size", "64", "--image-size", "32", "--batch-size", "16", "--hidden-dim", "64",
        "--proj-dim", "32", "--epochs", "1", "--knn-every", "0", "--log-every", "1",
        "--device", "cpu"]


def test_probe_table_random_init_and_export(tmp_path, capsys):
    byol.main(TINY + ["--out", str(tmp_path / "a"), "--stop-after", "2"])
    ckpt = str(tmp_path / "a" / "last.pt")
    rows = eval_linear.main(["--ckpt", f"{ckpt},{ckpt}", "--stage", "res2,res5",
                             "--probe-epochs", "3", "--device", "cpu", "--batch-size", "32"])
    assert len(rows) == 1 and set(rows[ckpt]) == {"res2", "res5"}  # same path twice: one row
    for cell in rows[ckpt].values():
        assert 0 <= cell["knn"] <= 100 and 0 <= cell["linear"] <= 100
    out = capsys.readouterr().out
    assert "knn top-1 (%)" in out and "linear top-1 (%)" in out and "res2" in out

    random_rows = eval_linear.main(["--ckpt", ckpt, "--random-init", "--protocol", "none",
                                    "--device", "cpu"])
    # a baseline row, then the checkpoint
    assert list(random_rows) == [f"{ckpt} (random init)", ckpt]

    export = tmp_path / "resnet18.pth"
    eval_linear.main(["--ckpt", ckpt, "--export", str(export), "--protocol", "none",
                      "--device", "cpu"])
    state = torch.load(export, weights_only=True)
    missing = torchvision.models.resnet18().load_state_dict(state, strict=False).missing_keys
    assert sorted(missing) == ["fc.bias", "fc.weight"]
    saved = torch.load(ckpt, weights_only=True)["model"]
    assert torch.equal(state["layer4.1.conv2.weight"], saved["backbone.layer4.1.conv2.weight"])


def test_fast_probe_learns_separable_features():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=generator) * 3
    labels = torch.arange(300) % 3
    features = centres[labels] + torch.randn(300, 8, generator=generator)
    accuracy = eval_linear.train_fast_probe(features[:240], labels[:240], features[240:],
                                            labels[240:], 20, 1.0, 64, 0)
    assert accuracy > 90


# --------------------------------------------------------------------------------------------------
# Two-view distances per stage (Ladder paper Fig. 3)

def tiny_checkpoint(path, seed, method="byol", model_state=None, arch="resnet18", **config):
    """A checkpoint as the method files write it, without training: a seeded ResNet trunk under
    `backbone.`."""
    torch.manual_seed(seed)
    if model_state is None:
        model_state = {f"backbone.{key}": value
                       for key, value in common.ResNetTrunk(arch).state_dict().items()}
    saved = dict(arch=arch, stem="imagenet", image_size=32, data="synthetic", synthetic_size=64,
                 crop_min_scale=0.25, **config)
    common.save_checkpoint(dict(method=method, config=saved, step=0, model=model_state), path)
    return str(path)


def table_block(out, title):
    """The header and rows of the printed table whose title starts with `title`."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    block = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        block.append(line)
    return block


def test_view_distance_table_one_row_per_checkpoint_one_column_per_stage(tmp_path, capsys):
    first, second = tiny_checkpoint(tmp_path / "a.pt", 0), tiny_checkpoint(tmp_path / "b.pt", 1)
    stages = ["res2", "res3", "res4", "res5"]
    rows = eval_linear.main(["--ckpt", f"{first},{second}", "--stage", ",".join(stages),
                             "--view-distance", "--device", "cpu", "--batch-size", "16"])
    assert list(rows) == [first, second] and all(list(row) == stages for row in rows.values())
    out = capsys.readouterr().out
    assert "knn top-1" not in out  # a mode of its own: no kNN, no probe
    for title in ("two-view distance, raw", "two-view distance, l2-normalised",
                  "two-view distance / distance"):
        header, *lines = table_block(out, title)
        assert header.split() == ["checkpoint"] + stages
        assert [line.split()[0] for line in lines] == [first, second]
    for line in table_block(out, "two-view distance, l2-normalised")[1:]:
        assert line.count(" / ") == len(stages)
    for row in rows.values():
        for cell in row.values():
            normalised = cell["view_normalised"]
            assert 0 <= normalised["p25"] <= normalised["median"] <= normalised["p75"] <= 2
            assert 0 <= normalised["mean"] <= 2
            assert cell["view_raw"]["mean"] > 0 and cell["view_ratio"] > 0

    # seeded: the same views give the same numbers
    again = eval_linear.main(["--ckpt", first, "--stage", "res3", "--view-distance",
                              "--device", "cpu", "--batch-size", "16"])
    assert again[first]["res3"] == rows[first]["res3"]
    random_rows = eval_linear.main(["--ckpt", second, "--stage", "res3", "--view-distance",
                                    "--random-init", "--device", "cpu", "--batch-size", "16"])
    # the baseline row comes first and leaves the checkpoint's numbers alone
    assert list(random_rows) == [f"{second} (random init)", second]
    assert random_rows[second]["res3"] == rows[second]["res3"]
    # seed-0 init, not seed-1 weights
    assert random_rows[f"{second} (random init)"]["res3"] != rows[second]["res3"]


def test_identical_views_have_distance_zero():
    torch.manual_seed(0)
    backbone = common.ResNetTrunk("resnet18")
    images, labels = common.make_synthetic(6, 32, seed=0)
    loader = common.TensorLoader(images, labels, 3, 0, 1, 0, shuffle=False, drop_last=False)
    no_randomness = common.ViewRecipe(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0,
                                      jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
    features = eval_linear.two_view_features(backbone, loader, (no_randomness, no_randomness), 32,
                                             ("res2", "res5"), seed=0, rank=0)
    for view1, view2 in features.values():
        assert view1.shape[0] == 6
        stats = eval_linear.view_distance_stats(view1, view2)
        assert stats["view_raw"]["mean"] < 1e-5 and stats["view_normalised"]["p75"] < 1e-5


def test_normalised_view_distance_lies_in_zero_two():
    generator = torch.Generator().manual_seed(0)
    view1 = torch.randn(50, 8, generator=generator) * 100  # raw distances far above 2
    # 10 opposite: exactly 2
    view2 = torch.cat([-view1[:10] * 0.01, torch.randn(40, 8, generator=generator)])
    stats = eval_linear.view_distance_stats(view1, view2)
    normalised = stats["view_normalised"]
    assert stats["view_raw"]["mean"] > 2
    assert 0 <= normalised["p25"] <= normalised["p75"] <= 2 + 1e-6 and 0 <= normalised["mean"] <= 2
    opposite = eval_linear.view_distance_stats(view1[:10], view2[:10])["view_normalised"]
    assert abs(opposite["mean"] - 2) < 1e-5


# --------------------------------------------------------------------------------------------------
# MCL export: backbone (torchvision names), FPN + head (checkpoint names), detectron2 names

MCL_TINY = ["--image-size", "32", "--fpn-dim", "16", "--hidden-dim", "32", "--proj-dim", "16",
            "--synthetic-size", "32"]


def test_mcl_export_writes_backbone_fpn_head_and_detectron2_names(tmp_path, capsys):
    cfg = common.parse_config(mcl.Config, mcl.PRESETS, MCL_TINY)
    torch.manual_seed(0)
    model = mcl.MCL(cfg)
    ckpt = tmp_path / "mcl.pt"
    common.save_checkpoint(dict(method="mcl", config=common.config_dict(cfg), step=0,
                                model=model.state_dict()), ckpt)
    export, detectron2 = tmp_path / "resnet18.pth", tmp_path / "mcl_d2.pth"
    rows = eval_linear.main(["--ckpt", str(ckpt), "--export", str(export),
                             "--export-detectron2", str(detectron2), "--stage", "",
                             "--device", "cpu"])
    assert rows == {}  # --stage "": export only
    assert "resnet18_fpn_head.pth" in capsys.readouterr().out

    backbone = torch.load(export, weights_only=True)
    missing = torchvision.models.resnet18().load_state_dict(backbone, strict=False)
    assert sorted(missing.missing_keys) == ["fc.bias", "fc.weight"] and not missing.unexpected_keys

    fpn_head = torch.load(tmp_path / "resnet18_fpn_head.pth", weights_only=True)
    assert {key.split(".")[0] for key in fpn_head} == {"fpn", "head"}
    for prefix, module in (("fpn.", model.fpn), ("head.", model.head)):
        expected = module.state_dict()
        part = {key[len(prefix):]: value for key, value in fpn_head.items()
                if key.startswith(prefix)}
        assert part.keys() == expected.keys()
        assert all(part[key].shape == expected[key].shape and torch.equal(part[key], expected[key])
                   for key in part)

    renamed = torch.load(detectron2, weights_only=True)["model"]
    assert torch.equal(renamed["backbone.bottom_up.stem.conv1.weight"], model.backbone.conv1.weight)
    assert torch.equal(renamed["backbone.bottom_up.res3.0.shortcut.norm.running_var"],
                       model.backbone.layer2[0].downsample[1].running_var)
    assert torch.equal(renamed["backbone.bottom_up.res5.1.conv2.norm.weight"],
                       model.backbone.layer4[1].bn2.weight)
    assert torch.equal(renamed["backbone.fpn_lateral2.weight"], model.fpn.lateral["p2"].conv.weight)
    assert torch.equal(renamed["backbone.fpn_output5.norm.bias"], model.fpn.output["p5"].norm.bias)
    assert torch.equal(renamed["roi_heads.box_head.conv4.norm.running_mean"],
                       model.head.convs[3].norm.running_mean)
    assert not any("num_batches_tracked" in key or "mlp" in key for key in renamed)
    transferable = [key for key in model.state_dict()
                    if key.startswith(("backbone.", "fpn.", "head.convs."))
                    and not key.endswith("num_batches_tracked")]
    assert len(renamed) == len(transferable)  # one new name per transferable tensor


def test_detectron2_names_is_a_pure_renaming():
    weights = {"layer1.0.bn2.weight": torch.ones(2), "fpn.output.p3.conv.weight": torch.zeros(1),
               "head.mlp.0.weight": torch.zeros(1), "bn1.num_batches_tracked": torch.tensor(3)}
    renamed = eval_linear.detectron2_names(weights)
    assert renamed == {
        "backbone.bottom_up.res2.0.conv2.norm.weight": weights["layer1.0.bn2.weight"],
        "backbone.fpn_output3.weight": weights["fpn.output.p3.conv.weight"]}
    # the input untouched
    assert list(weights) == ["layer1.0.bn2.weight", "fpn.output.p3.conv.weight",
                             "head.mlp.0.weight", "bn1.num_batches_tracked"]
    with pytest.raises(common.InputError, match="no detectron2 name"):
        eval_linear.detectron2_names({"predictors.0.weight": torch.zeros(1)})


# --------------------------------------------------------------------------------------------------
# Linear-evaluation protocols (--protocol): each paper's values, schedules at boundary epochs, runs

def test_protocol_table_holds_each_papers_values():
    # optimizer, nesterov, momentum, batch, epochs, lrs, weight decay, schedule, milestones
    expected = {
        "byol": ("sgd", True, 0.9, 1024, 80, (0.2, 0.4, 0.8, 1.6, 3.2), 0.0, "cosine", ()),  # C
        "ladder": ("sgd", False, 0.9, 256, 100, (0.3,), 1e-6, "cosine", ()),            # Sec. 4.2
        "lewel_b": ("sgd", False, 0.9, 256, 50, (0.4,), 0.0, "step", (30, 40)),         # Sec. 4.1
        "lewel_m": ("lars", False, 0.9, 4096, 90, (3.2,), 0.0, "cosine", ()),           # Sec. 4.1
    }
    for name, values in expected.items():
        p = eval_linear.PROTOCOLS[name]
        assert (p.optimizer, p.nesterov, p.momentum, p.batch_size, p.epochs, p.lrs,
                p.weight_decay, p.schedule, p.milestones) == values, name
    assert eval_linear.PROTOCOLS["byol"].per_step and not eval_linear.PROTOCOLS["ladder"].per_step
    assert not eval_linear.PROTOCOLS["lewel_m"].per_step
    assert eval_linear.Config().protocol == "fast"             # the quick probe stays the default


def test_step_schedule_at_its_boundary_epochs():
    lewel_b = eval_linear.PROTOCOLS["lewel_b"]
    # / 10 at epochs 30 and 40 (0-based)
    by_hand = {0: 0.4, 29: 0.4, 30: 0.04, 39: 0.04, 40: 0.004, 49: 0.004}
    for epoch, lr in by_hand.items():
        assert eval_linear.protocol_lr(lewel_b, 0.4, epoch) == pytest.approx(lr, rel=1e-12), epoch
    assert eval_linear.protocol_lr(lewel_b, 0.4, 29.99) == 0.4     # inside epoch 29


def test_cosine_schedules_at_their_boundary_epochs():
    ladder, lewel_m, byol_ = (eval_linear.PROTOCOLS[name] for name in ("ladder", "lewel_m", "byol"))
    # ladder: 0.3 over 100 epochs; cos(pi/4) = 0.70710678..., cos(pi * 99/100) = -0.99950656...
    by_hand = {0: 0.3, 25: 0.15 * 1.7071067811865476, 50: 0.15,
               99: 0.15 * (1 - 0.9995065603657316), 100: 0.0}
    for epoch, lr in by_hand.items():
        assert eval_linear.protocol_lr(ladder, 0.3, epoch) == pytest.approx(lr, abs=1e-12), epoch
    # lewel_m: 3.2 over 90 epochs; cos(pi/3) = 0.5
    for epoch, lr in {0: 3.2, 30: 2.4, 45: 1.6, 90: 0.0}.items():
        assert eval_linear.protocol_lr(lewel_m, 3.2, epoch) == pytest.approx(lr, abs=1e-12), epoch
    # byol: 0.8 over 80 epochs, per step: the middle of epoch 39 lies between epochs 39 and 40
    assert eval_linear.protocol_lr(byol_, 0.8, 40) == pytest.approx(0.4)
    assert eval_linear.protocol_lr(byol_, 0.8, 20) == pytest.approx(0.4 * 1.7071067811865476)
    assert 0.4 < eval_linear.protocol_lr(byol_, 0.8, 39.5) < eval_linear.protocol_lr(byol_, 0.8, 39)


def test_overrides_scale_milestones_with_epochs_and_lrs_with_batch():
    def resolved(*argv):
        return eval_linear.resolve_protocol(common.parse_config(eval_linear.Config, {}, list(argv)))

    short = resolved("--protocol", "lewel_b", "--probe-epochs", "5")
    assert (short.epochs, short.milestones, short.lrs) == (5, (3, 4), (0.4,))
    small = resolved("--protocol", "byol", "--probe-batch-size", "256")
    assert small.batch_size == 256 and small.lrs == pytest.approx((0.05, 0.1, 0.2, 0.4, 0.8))
    assert resolved("--protocol", "byol", "--probe-lr", "0.3").lrs == (0.3,)  # given: no sweep
    assert resolved("--protocol", "lewel_m").lrs == (3.2,)


def test_center_crop_view_is_resize_256_centre_crop_224():
    # what a folder's loader gives for 224-px views: 256 x 256
    images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    view = eval_linear.center_crop_view(images, 224)
    mean = torch.tensor(common.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1)
    by_hand = (images[:, :, 16:240, 16:240].float() / 255 - mean) / std
    assert view.shape == (2, 3, 224, 224) and torch.allclose(view, by_hand, atol=1e-6)
    small = eval_linear.center_crop_view(images[:, :, :32, :32], 32)     # resized to 36, then 32
    assert small.shape == (2, 3, 32, 32)


def test_heldout_split_is_a_seeded_tenth_disjoint_from_training():
    kept, held = eval_linear.heldout_split(64, seed=0)
    assert len(held) == 6 and len(kept) == 58                          # min(10,000, 64 // 10)
    assert sorted(kept.tolist() + held.tolist()) == list(range(64))
    assert torch.equal(eval_linear.heldout_split(64, seed=0)[1], held)
    assert len(eval_linear.heldout_split(2_000_000, seed=0)[1]) == 10_000  # BYOL's on ImageNet


def tiny_loaders(batch=16, size=64, image_size=16):
    images, labels = common.make_synthetic(size + 8, image_size, seed=0, num_classes=4)
    train = common.TensorLoader(images[:size], labels[:size], batch, 0, 1, 0)
    val = common.TensorLoader(images[size:], labels[size:], batch, 0, 1, 0, shuffle=False,
                              drop_last=False)
    return train, val


def test_training_loop_follows_the_step_schedule():
    torch.manual_seed(0)
    backbone = common.ResNetTrunk("resnet18")
    train, val = tiny_loaders(size=16)                                 # one step per epoch
    protocol = dataclasses.replace(eval_linear.PROTOCOLS["lewel_b"], epochs=5, milestones=(3, 4),
                                   batch_size=16)
    dist = common.Dist(0, 0, 1, torch.device("cpu"))
    before = {key: value.clone() for key, value in backbone.state_dict().items()}
    result = eval_linear.train_linear_protocol(backbone, "res5", protocol, train, val, 16, dist,
                                               seed=0)
    assert result["epoch_lrs"] == pytest.approx([0.4, 0.4, 0.4, 0.04, 0.004])
    assert 0 <= result["top1"][0] <= result["top5"][0] <= 100
    after = backbone.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)  # frozen, BN statistics too


def test_byol_protocol_sweeps_on_heldout_split_end_to_end(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "a.pt", 0)
    rows = eval_linear.main(["--ckpt", ckpt, "--protocol", "byol", "--probe-epochs", "1",
                             "--probe-batch-size", "16", "--device", "cpu", "--batch-size", "32",
                             "--image-size", "16"])
    cell = rows[ckpt]["res5"]
    out = capsys.readouterr().out
    sweep_line = next(line for line in out.splitlines()
                      if "lr sweep on 6 held-out train images" in line)
    sweep = {float(part.split(":")[0].split()[-1]): float(part.split(":")[1])
             for part in sweep_line.split("(%): ")[1].split(", ")}
    grid = [lr * 16 / 1024 for lr in (0.2, 0.4, 0.8, 1.6, 3.2)]            # the grid at batch 16
    assert sorted(sweep) == pytest.approx(grid)
    assert cell["linear_lr"] == pytest.approx(max(sweep, key=sweep.get))  # the best held-out lr
    assert 0 <= cell["linear"] <= cell["linear_top5"] <= 100 and 0 <= cell["knn"] <= 100
    assert "nesterov momentum 0.9, batch 16, 1 epochs" in out


def test_lewel_m_protocol_runs_with_lars(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "a.pt", 0)
    rows = eval_linear.main(["--ckpt", ckpt, "--protocol", "lewel_m", "--probe-epochs", "1",
                             "--probe-batch-size", "32", "--device", "cpu", "--batch-size", "64",
                             "--image-size", "16"])
    assert rows[ckpt]["res5"]["linear_lr"] == pytest.approx(3.2 * 32 / 4096)
    with pytest.raises(SystemExit):                                    # DenseSiam states none
        eval_linear.main(["--ckpt", ckpt, "--protocol", "densesiam", "--device", "cpu"])


# --------------------------------------------------------------------------------------------------
# Semi-supervised fine-tuning (transfer.py --task semi, LEWEL Sec. 4.2)

def test_semi_lr_groups_decay_at_epochs_30_and_40():
    # (backbone, classifier)
    assert transfer.SEMI_LRS == {"1percent": (1e-4, 1.0), "10percent": (1e-2, 0.1)}
    model = transfer.FineTuneNet(common.ResNetTrunk("resnet18"), 10)
    optimizer = transfer.semi_optimizer(model, 1e-4, 1.0, 1e-4)
    backbone_group, classifier_group = optimizer.param_groups
    assert {id(p) for p in backbone_group["params"]} == {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in classifier_group["params"]} == {id(p) for p in model.fc.parameters()}
    by_hand = {0: (1e-4, 1.0), 29: (1e-4, 1.0), 30: (1e-5, 0.1), 39: (1e-5, 0.1),
               40: (1e-6, 0.01), 49: (1e-6, 0.01)}                    # / 10 at epochs 30 and 40
    for epoch, lrs in by_hand.items():
        assert transfer.set_semi_lrs(optimizer, epoch) == pytest.approx(lrs, rel=1e-12), epoch
        assert (backbone_group["lr"], classifier_group["lr"]) == pytest.approx(lrs, rel=1e-12)
    five = [transfer.semi_lr(1.0, epoch, epochs=5) for epoch in range(5)]
    assert five == pytest.approx([1, 1, 1, 0.1, 0.01])


def test_subset_file_names_and_indices(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for label, name in enumerate(("cat", "dog")):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for index in range(3):
                image = Image.new("RGB", (10, 12), (40 * index, 80 * label, 9))
                image.save(folder / f"{name}_{index}.png")
    subset = tmp_path / "1percent.txt"
    subset.write_text("dog_2.png\n\ncat_0.png\ndog_2.png\n")          # a blank line and a repeat
    names = transfer.read_subset(subset)
    assert names == ["dog_2.png", "cat_0.png"]
    dist = common.Dist(0, 0, 1, torch.device("cpu"))
    loader = common.make_loader(str(tmp_path / "data"), "train", 8, 2, dist, 0, workers=0)
    keep = transfer.subset_indices(loader, names)
    chosen = eval_linear.subset_loader(loader, keep, shuffle=False, drop_last=False)
    assert [os.path.basename(path) for path, _ in chosen.dataset.samples] == names
    assert torch.cat([labels for _, labels in chosen]).tolist() == [1, 0]
    assert eval_linear.num_classes_of(chosen) == 2
    with pytest.raises(common.InputError, match="1 of 2 names"):
        transfer.subset_indices(loader, ["dog_2.png", "cow_1.png"])
    tensors, _ = tiny_loaders()
    assert transfer.subset_indices(tensors, ["5", "0"]) == [5, 0]
    with pytest.raises(common.InputError, match="no image index"):
        transfer.subset_indices(tensors, ["64"])


def test_semi_finetune_trains_the_backbone(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "a.pt", 0)
    subset = tmp_path / "subset.txt"
    subset.write_text("\n".join(str(index) for index in range(0, 64, 2)))  # 32 of 64 images
    out = tmp_path / "finetuned.pth"
    result = transfer.main(["--task", "semi", "--ckpt", ckpt, "--subset", str(subset),
                            "--epochs", "2", "--label-fraction", "10percent", "--batch-size", "32",
                            "--image-size", "16", "--device", "cpu", "--out", str(out)])
    assert result["images"] == 32
    # 10 %: (backbone, classifier) = (0.01, 0.1); 2 epochs: milestones round(1.2), round(1.6) = 1, 2
    lrs = [lr for epoch in result["lrs"] for lr in epoch]
    assert lrs == pytest.approx([0.01, 0.1, 0.001, 0.01])
    assert 0 <= result["top1"] <= result["top5"] <= 100
    tuned = torch.load(out, weights_only=True)
    torchvision.models.resnet18(num_classes=10).load_state_dict(tuned)  # strict: names + fc
    saved = torch.load(ckpt, weights_only=True)["model"]
    key = "layer4.1.conv2.weight"
    assert not torch.equal(tuned[key], saved["backbone." + key])         # the backbone trained


# --------------------------------------------------------------------------------------------------
# Detection export (transfer.py --task detection): strict load into torchvision, fine-tuning steps

def box_scenes(count, size, seed):
    """Images with a bar (label 1) in the top half and a disc (label 2) in the bottom half on a
    plain background; boxes and masks from the drawn pixels."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, targets = [], []
    for _ in range(count):
        image = torch.rand(3, 1, 1, generator=generator).expand(3, size, size)
        cx = size * (0.3 + 0.4 * torch.rand(2, generator=generator))
        bar = ((xx - cx[0]).abs() < size / 4) & ((yy - size / 4).abs() < size / 10)
        disc = (xx - cx[1]) ** 2 + (yy - 3 * size / 4) ** 2 < (size / 6) ** 2
        masks = torch.stack([bar, disc])
        for mask in masks:
            image = torch.where(mask, torch.rand(3, 1, 1, generator=generator), image)
        boxes = [[xx[mask].min(), yy[mask].min(), xx[mask].max() + 1, yy[mask].max() + 1]
                 for mask in masks]
        images.append(image)
        targets.append(dict(boxes=torch.tensor(boxes, dtype=torch.float32),
                            labels=torch.tensor([1, 2]), masks=masks.to(torch.uint8)))
    return images, targets


def test_detector_export_loads_strict_and_finetunes(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "r50.pt", 0, arch="resnet50")
    out = tmp_path / "maskrcnn.pth"
    transfer.main(["--task", "detection", "--ckpt", ckpt, "--num-classes", "3", "--out", str(out),
                   "--device", "cpu"])
    assert "freshly initialised" in capsys.readouterr().out
    model = transfer.build_detector("maskrcnn_resnet50_fpn", 3, min_size=64, max_size=64,
                                    rpn_pre_nms_top_n_train=64, rpn_post_nms_top_n_train=16,
                                    box_batch_size_per_image=16)             # a cheap step
    state = torch.load(out, weights_only=True)
    model.load_state_dict(state, strict=True)
    saved = torch.load(ckpt, weights_only=True)["model"]
    body = [key for key in state if key.startswith("backbone.body.")]
    assert len(body) == len(saved)                                   # every backbone tensor
    assert all(torch.equal(state[key], saved["backbone." + key[len("backbone.body."):]])
               for key in body)
    _, taken, fresh = transfer.export_detector(ckpt, "maskrcnn_resnet50_fpn", 3)
    assert taken == sorted(body)
    assert {".".join(key.split(".")[:2]) for key in fresh} == {       # all new without MCL's FPN
        "backbone.fpn", "rpn.head", "roi_heads.box_head", "roi_heads.box_predictor",
        "roi_heads.mask_head", "roi_heads.mask_predictor"}

    images, targets = box_scenes(2, 64, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    before = model.backbone.body.layer4[0].conv1.weight.detach().clone()
    model.train()
    for step in range(2):                                            # one image per step
        losses = model(images[step:step + 1], targets[step:step + 1])
        loss = sum(losses.values())
        assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness"} <= set(losses)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not torch.equal(before, model.backbone.body.layer4[0].conv1.weight)


def test_mcl_detector_export_fpn_folded_v1_and_copied_v2(tmp_path):
    argv = MCL_TINY + ["--arch", "resnet50", "--fpn-dim", "256"]
    cfg = common.parse_config(mcl.Config, mcl.PRESETS, argv)
    torch.manual_seed(0)
    model = mcl.MCL(cfg).eval()
    with torch.no_grad():                                            # BN statistics not 0 / 1
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 1.5)
    ckpt = tmp_path / "mcl.pt"
    common.save_checkpoint(dict(method="mcl", config=common.config_dict(cfg), step=0,
                                model=model.state_dict()), ckpt)

    v1, taken, fresh = transfer.export_detector(ckpt, "fasterrcnn_resnet50_fpn", 3)
    fpn = torch.nn.Conv2d(512, 256, 1)                               # torchvision's block on res3
    fpn.load_state_dict({"weight": v1["backbone.fpn.inner_blocks.1.0.weight"],
                         "bias": v1["backbone.fpn.inner_blocks.1.0.bias"]})
    x = torch.randn(2, 512, 4, 4)
    with torch.no_grad():                                            # conv + BN (eval) as one conv
        assert torch.allclose(fpn(x), model.fpn.lateral["p3"](x), atol=1e-4)
    assert not any(key.startswith("roi_heads.box_head") for key in taken)  # v1: two fc, no convs
    assert all(key.startswith(("rpn.", "roi_heads.")) for key in fresh)

    v2, taken, fresh = transfer.export_detector(ckpt, "fasterrcnn_resnet50_fpn_v2", 3)
    transfer.build_detector("fasterrcnn_resnet50_fpn_v2", 3).load_state_dict(v2, strict=True)
    assert torch.equal(v2["backbone.fpn.layer_blocks.3.0.weight"],
                       model.fpn.output["p5"].conv.weight)
    assert torch.equal(v2["backbone.fpn.inner_blocks.0.1.running_var"],
                       model.fpn.lateral["p2"].norm.running_var)
    assert torch.equal(v2["roi_heads.box_head.2.1.running_mean"],
                       model.head.convs[2].norm.running_mean)
    assert torch.equal(v2["roi_heads.box_head.3.0.weight"], model.head.convs[3].conv.weight)
    assert {key.rsplit(".", 1)[0] for key in fresh} == {
        "rpn.head.conv.0.0", "rpn.head.conv.1.0", "rpn.head.cls_logits", "rpn.head.bbox_pred",
        "roi_heads.box_head.5", "roi_heads.box_predictor.cls_score",
        "roi_heads.box_predictor.bbox_pred"}
