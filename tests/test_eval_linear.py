"""eval_linear.py: kNN + linear probe per stage, random-init baseline, the Table 7 layout, two-view distances
(Fig. 3), export (torchvision, MCL FPN/head, detectron2 names)."""

import pytest
import torch
import torchvision

import byol
import common
import eval_linear
import mcl

TINY = ["--synthetic-size", "64", "--image-size", "32", "--batch-size", "16", "--hidden-dim", "64", "--proj-dim", "32",
        "--epochs", "1", "--knn-every", "0", "--log-every", "1", "--device", "cpu"]


def test_probe_table_random_init_and_export(tmp_path, capsys):
    byol.main(TINY + ["--out", str(tmp_path / "a"), "--stop-after", "2"])
    ckpt = str(tmp_path / "a" / "last.pt")
    rows = eval_linear.main(["--ckpt", f"{ckpt},{ckpt}", "--stage", "res2,res5", "--probe-epochs", "3",
                             "--device", "cpu", "--batch-size", "32"])
    assert len(rows) == 1 and set(rows[ckpt]) == {"res2", "res5"}  # same path twice: one row
    for cell in rows[ckpt].values():
        assert 0 <= cell["knn"] <= 100 and 0 <= cell["linear"] <= 100
    out = capsys.readouterr().out
    assert "knn top-1 (%)" in out and "linear top-1 (%)" in out and "res2" in out

    random_rows = eval_linear.main(["--ckpt", ckpt, "--random-init", "--probe", "none", "--device", "cpu"])
    assert list(random_rows) == [f"{ckpt} (random init)", ckpt]  # a baseline row, then the checkpoint

    export = tmp_path / "resnet18.pth"
    eval_linear.main(["--ckpt", ckpt, "--export", str(export), "--probe", "none", "--device", "cpu"])
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
    accuracy = eval_linear.train_fast_probe(features[:240], labels[:240], features[240:], labels[240:], 20, 1.0, 64, 0)
    assert accuracy > 90


# ---------------------------------------------------------------------------------------------------------------------
# Two-view distances per stage (Ladder paper Fig. 3)

def tiny_checkpoint(path, seed, method="byol", model_state=None, **config):
    """A checkpoint as the method files write it, without training: a seeded ResNet-18 trunk under `backbone.`."""
    torch.manual_seed(seed)
    if model_state is None:
        model_state = {f"backbone.{key}": value for key, value in common.ResNetTrunk("resnet18").state_dict().items()}
    saved = dict(arch="resnet18", stem="imagenet", image_size=32, data="synthetic", synthetic_size=64,
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
    rows = eval_linear.main(["--ckpt", f"{first},{second}", "--stage", ",".join(stages), "--view-distance",
                             "--device", "cpu", "--batch-size", "16"])
    assert list(rows) == [first, second] and all(list(row) == stages for row in rows.values())
    out = capsys.readouterr().out
    assert "knn top-1" not in out                                   # a mode of its own: no kNN, no probe
    for title in ("two-view distance, raw", "two-view distance, l2-normalised", "two-view distance / distance"):
        header, *lines = table_block(out, title)
        assert header.split() == ["checkpoint"] + stages
        assert [line.split()[0] for line in lines] == [first, second]
    for line in table_block(out, "two-view distance, l2-normalised")[1:]:
        assert line.count(" / ") == len(stages)
    for row in rows.values():
        for cell in row.values():
            normalised = cell["view_normalised"]
            assert 0 <= normalised["p25"] <= normalised["median"] <= normalised["p75"] <= 2
            assert 0 <= normalised["mean"] <= 2 and cell["view_raw"]["mean"] > 0 and cell["view_ratio"] > 0

    again = eval_linear.main(["--ckpt", first, "--stage", "res3", "--view-distance", "--device", "cpu",
                              "--batch-size", "16"])                 # seeded: the same views give the same numbers
    assert again[first]["res3"] == rows[first]["res3"]
    random_rows = eval_linear.main(["--ckpt", second, "--stage", "res3", "--view-distance", "--random-init",
                                    "--device", "cpu", "--batch-size", "16"])
    assert list(random_rows) == [f"{second} (random init)", second]  # the baseline row comes first
    assert random_rows[second]["res3"] == rows[second]["res3"]        # and leaves the checkpoint's numbers alone
    assert random_rows[f"{second} (random init)"]["res3"] != rows[second]["res3"]  # seed-0 init, not seed-1 weights


def test_identical_views_have_distance_zero():
    torch.manual_seed(0)
    backbone = common.ResNetTrunk("resnet18")
    images, labels = common.make_synthetic(6, 32, seed=0)
    loader = common.TensorLoader(images, labels, 3, 0, 1, 0, shuffle=False, drop_last=False)
    no_randomness = common.ViewRecipe(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0,
                                      gray_p=0.0, blur_p=0.0, solarize_p=0.0)
    features = eval_linear.two_view_features(backbone, loader, (no_randomness, no_randomness), 32, ("res2", "res5"),
                                             seed=0, rank=0)
    for view1, view2 in features.values():
        assert view1.shape[0] == 6
        stats = eval_linear.view_distance_stats(view1, view2)
        assert stats["view_raw"]["mean"] < 1e-5 and stats["view_normalised"]["p75"] < 1e-5


def test_normalised_view_distance_lies_in_zero_two():
    generator = torch.Generator().manual_seed(0)
    view1 = torch.randn(50, 8, generator=generator) * 100              # raw distances far above 2
    view2 = torch.cat([-view1[:10] * 0.01, torch.randn(40, 8, generator=generator)])   # 10 opposite: exactly 2
    stats = eval_linear.view_distance_stats(view1, view2)
    normalised = stats["view_normalised"]
    assert stats["view_raw"]["mean"] > 2
    assert 0 <= normalised["p25"] <= normalised["p75"] <= 2 + 1e-6 and 0 <= normalised["mean"] <= 2
    assert abs(eval_linear.view_distance_stats(view1[:10], view2[:10])["view_normalised"]["mean"] - 2) < 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# MCL export: backbone (torchvision names), FPN + head (checkpoint names), detectron2 names

MCL_TINY = ["--image-size", "32", "--fpn-dim", "16", "--hidden-dim", "32", "--proj-dim", "16", "--synthetic-size", "32"]


def test_mcl_export_writes_backbone_fpn_head_and_detectron2_names(tmp_path, capsys):
    cfg = common.parse_config(mcl.Config, mcl.PRESETS, MCL_TINY)
    torch.manual_seed(0)
    model = mcl.MCL(cfg)
    ckpt = tmp_path / "mcl.pt"
    common.save_checkpoint(dict(method="mcl", config=common.config_dict(cfg), step=0, model=model.state_dict()), ckpt)
    export, detectron2 = tmp_path / "resnet18.pth", tmp_path / "mcl_d2.pth"
    rows = eval_linear.main(["--ckpt", str(ckpt), "--export", str(export), "--export-detectron2", str(detectron2),
                             "--stage", "", "--device", "cpu"])
    assert rows == {}                                                # --stage "": export only
    assert "resnet18_fpn_head.pth" in capsys.readouterr().out

    backbone = torch.load(export, weights_only=True)
    missing = torchvision.models.resnet18().load_state_dict(backbone, strict=False)
    assert sorted(missing.missing_keys) == ["fc.bias", "fc.weight"] and not missing.unexpected_keys

    fpn_head = torch.load(tmp_path / "resnet18_fpn_head.pth", weights_only=True)
    assert {key.split(".")[0] for key in fpn_head} == {"fpn", "head"}
    for prefix, module in (("fpn.", model.fpn), ("head.", model.head)):
        expected = module.state_dict()
        part = {key[len(prefix):]: value for key, value in fpn_head.items() if key.startswith(prefix)}
        assert part.keys() == expected.keys()
        assert all(part[key].shape == expected[key].shape and torch.equal(part[key], expected[key]) for key in part)

    renamed = torch.load(detectron2, weights_only=True)["model"]
    assert torch.equal(renamed["backbone.bottom_up.stem.conv1.weight"], model.backbone.conv1.weight)
    assert torch.equal(renamed["backbone.bottom_up.res3.0.shortcut.norm.running_var"],
                       model.backbone.layer2[0].downsample[1].running_var)
    assert torch.equal(renamed["backbone.bottom_up.res5.1.conv2.norm.weight"], model.backbone.layer4[1].bn2.weight)
    assert torch.equal(renamed["backbone.fpn_lateral2.weight"], model.fpn.lateral["p2"].conv.weight)
    assert torch.equal(renamed["backbone.fpn_output5.norm.bias"], model.fpn.output["p5"].norm.bias)
    assert torch.equal(renamed["roi_heads.box_head.conv4.norm.running_mean"], model.head.convs[3].norm.running_mean)
    assert not any("num_batches_tracked" in key or "mlp" in key for key in renamed)
    transferable = [key for key in model.state_dict() if key.startswith(("backbone.", "fpn.", "head.convs."))
                    and not key.endswith("num_batches_tracked")]
    assert len(renamed) == len(transferable)                         # one new name per transferable tensor


def test_detectron2_names_is_a_pure_renaming():
    weights = {"layer1.0.bn2.weight": torch.ones(2), "fpn.output.p3.conv.weight": torch.zeros(1),
               "head.mlp.0.weight": torch.zeros(1), "bn1.num_batches_tracked": torch.tensor(3)}
    renamed = eval_linear.detectron2_names(weights)
    assert renamed == {"backbone.bottom_up.res2.0.conv2.norm.weight": weights["layer1.0.bn2.weight"],
                       "backbone.fpn_output3.weight": weights["fpn.output.p3.conv.weight"]}
    assert list(weights) == ["layer1.0.bn2.weight", "fpn.output.p3.conv.weight", "head.mlp.0.weight",
                             "bn1.num_batches_tracked"]                # input untouched
    with pytest.raises(common.InputError, match="no detectron2 name"):
        eval_linear.detectron2_names({"predictors.0.weight": torch.zeros(1)})
