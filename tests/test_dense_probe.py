"""Dense evaluation: the built-in part masks, the VOC and image/mask folder readers, confusion
matrix and mIoU, eval_linear.py --dense end to end (a row per checkpoint, the random-init row) and
--report."""

import contextlib
import importlib.util
import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import eval_linear


# --------------------------------------------------------------------------------------------------
# mIoU

def test_miou_by_hand():
    # 10 pixels, classes 0-3; the last two are ignored (255) and predicted as class 3.
    target = torch.tensor([[0, 0, 0, 0, 1], [1, 1, 1, 255, 255]])
    pred = torch.tensor([[0, 0, 0, 1, 0], [1, 1, 2, 3, 3]])
    # Rows ground truth, columns prediction (ignored pixels left out):
    #   class 0: 4 pixels, 3 predicted 0, 1 predicted 1
    #   class 1: 4 pixels, 1 predicted 0, 2 predicted 1, 1 predicted 2
    #   classes 2 and 3: no pixel
    expected = torch.tensor([[3, 1, 0, 0],
                             [1, 2, 1, 0],
                             [0, 0, 0, 0],
                             [0, 0, 0, 0]])
    confusion = common.confusion_matrix(pred, target, 4)
    assert torch.equal(confusion, expected)
    # IoU = TP / (row + column - TP):
    #   class 0: 3 / (4 + 4 - 3) = 3/5      class 1: 2 / (4 + 3 - 2) = 2/5
    #   class 2: 0 / (0 + 1 - 0) = 0 (predicted once, in no label: counts)
    #   class 3: union 0 (the ignored pixels' predictions do not count): left out
    # mIoU = (3/5 + 2/5 + 0) / 3 = 1/3; pixel accuracy = (3 + 2) / 8
    scores = common.segmentation_iou(confusion)
    assert scores["miou"] == pytest.approx(1 / 3, abs=1e-12)
    assert scores["iou"][:3] == pytest.approx([0.6, 0.4, 0.0], abs=1e-12)
    assert math.isnan(scores["iou"][3])
    assert scores["pixel_acc"] == pytest.approx(5 / 8, abs=1e-12)


# --------------------------------------------------------------------------------------------------
# Built-in part masks

def test_synthetic_masks_leave_the_images_unchanged_and_label_the_strokes_with_the_digit():
    images, labels = common.make_synthetic(40, 32, seed=7)
    same, same_labels, masks = common.make_synthetic(40, 32, seed=7, with_masks=True)
    assert torch.equal(images, same) and torch.equal(labels, same_labels)
    assert masks.shape == (40, 32, 32) and masks.dtype == torch.int64
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    for image, label, mask in zip(images, labels, masks):
        assert set(mask.unique().tolist()) == {0, 1 + label.item()}    # background, the digit
        # the mask is where the image is at least 30 % white (255 * 0.3 = 76.5, up to rounding)
        assert ((mask > 0) == (image[0] >= 77)).float().mean() > 0.99
        assert (mask.flip(-1) > 0).logical_xor(mask > 0).any()          # not mirror-symmetric
    assert len(common.SYNTHETIC_CLASSES) == 11 and common.dense_num_classes("synthetic") == 11


def test_synthetic_digits_differ_by_shape_not_by_ink():
    """Each class is a shape: the mean image of a digit over many poses differs from every other
    digit's, while the amount of ink (mean brightness) does not tell them apart."""
    images, labels = common.make_synthetic(2000, 32, seed=1)
    grey = images[:, 0].float() / 255
    means = torch.stack([grey[labels == digit].mean(0) for digit in range(10)])  # 10 x 32 x 32
    distances = torch.cdist(means.flatten(1), means.flatten(1))
    assert distances[~torch.eye(10, dtype=torch.bool)].min() > 0.5
    ink = torch.stack([grey[labels == digit].mean() for digit in range(10)])
    assert ink.max() - ink.min() < 0.1


# --------------------------------------------------------------------------------------------------
# Folder readers

def save_label(path, label, palette=False):
    """A label PNG: mode P with a colour palette (as Pascal VOC's), or mode L."""
    from PIL import Image

    image = Image.fromarray(label.to(torch.uint8).numpy(), mode="L")
    if palette:
        image = image.convert("P")
        # index k displayed as an unrelated colour: a reader must return k, not the colour
        image.putpalette([value for k in range(256) for value in ((37 * k) % 256, 90, 200)])
    image.save(path)


def two_class_label(height=40, width=48):
    """Left half class 1, right half class 2, the first row 255 (ignore)."""
    label = torch.ones(height, width, dtype=torch.long)
    label[:, width // 2:] = 2
    label[0] = 255
    return label


def save_image(path, height=40, width=48, shade=0):
    from PIL import Image

    Image.new("RGB", (width, height), (shade, 120, 60)).save(path)


def test_voc_layout_reads_palette_indices(tmp_path):
    from PIL import Image

    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (tmp_path / folder).mkdir(parents=True)
    for split, names in (("train", ["2007_000001", "2007_000002"]), ("val", ["2007_000003"])):
        names_file = tmp_path / "ImageSets" / "Segmentation" / f"{split}.txt"
        names_file.write_text("\n".join(names) + "\n")
        for index, name in enumerate(names):
            save_image(tmp_path / "JPEGImages" / f"{name}.jpg", shade=50 * index)
            save_label(tmp_path / "SegmentationClass" / f"{name}.png", two_class_label(),
                       palette=True)
    assert Image.open(tmp_path / "SegmentationClass" / "2007_000001.png").mode == "P"
    assert common.dense_layout(str(tmp_path)) == "voc"
    assert common.dense_num_classes(str(tmp_path)) == 21
    pairs = common.segmentation_pairs(str(tmp_path), "train")
    assert [(image.name, label.name) for image, label in pairs] == [
        ("2007_000001.jpg", "2007_000001.png"), ("2007_000002.jpg", "2007_000002.png")]
    image, label = common.SegmentationPairs(pairs, 16)[0]
    # 40 x 48 -> shorter side 16: 16 x 19 (nearest for the label), centre 16 x 16
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
    assert label.shape == (16, 16) and label.dtype == torch.int64
    assert set(label.unique().tolist()) <= {1, 2, 255}
    assert label[8, 0] == 1 and label[8, 15] == 2                # the palette indices, not colours
    (tmp_path / "JPEGImages" / "2007_000003.jpg").unlink()
    with pytest.raises(common.InputError, match="1 files missing"):
        common.segmentation_pairs(str(tmp_path), "val")


def test_image_mask_folders_and_their_class_count(tmp_path):
    for split, count in (("train", 2), ("val", 1)):
        for folder in ("images", "masks"):
            (tmp_path / split / folder).mkdir(parents=True)
        for index in range(count):
            save_image(tmp_path / split / "images" / f"x{index}.png", shade=80 * index)
            label = two_class_label()
            label[5:10, 5:10] = 4 if split == "val" else 3                # largest label: 4, in val
            save_label(tmp_path / split / "masks" / f"x{index}.png", label)
    root = str(tmp_path)
    assert common.dense_layout(root) == "folders"
    assert common.dense_num_classes(root) == 5                   # 1 + the largest label, 255 aside
    dataset = common.SegmentationPairs(common.segmentation_pairs(root, "val"), 16)
    image, label = dataset[0]
    assert image.shape == (3, 16, 16) and label.shape == (16, 16)
    assert set(label.unique().tolist()) <= {1, 2, 4, 255} and 4 in label.unique().tolist()
    # an RGB "mask" would be read as class ids: refused
    from PIL import Image

    Image.new("RGB", (48, 40), (1, 2, 3)).save(tmp_path / "val" / "masks" / "x0.png")
    with pytest.raises(common.InputError, match="RGB label image"):
        dataset[0]
    (tmp_path / "train" / "masks" / "x1.png").unlink()
    with pytest.raises(common.InputError, match="no label PNG"):
        common.segmentation_pairs(root, "train")


# --------------------------------------------------------------------------------------------------
# The probe

class StripeOracle(nn.Module):
    """A "backbone" whose res3 map is the one-hot class of every 2 x 2 cell (stride 2), read back
    from the red level that stripe_batch paints each class with: a perfectly informative map."""

    def forward(self, x, last_stage="res5"):
        red = x[:, 0] * common.IMAGENET_STD[0] + common.IMAGENET_MEAN[0]     # B x H x W in [0, 1]
        classes = (red * 255 / 80).round().long()                           # 0, 80, 160 -> 0, 1, 2
        one_hot = F.one_hot(classes, 3).permute(0, 3, 1, 2).float()
        return {"res3": F.avg_pool2d(one_hot, 2)}                           # B x 3 x H/2 x W/2


def stripe_batch(count, generator):
    """count 8 x 8 images of four 2-pixel-wide vertical stripes, each of a random class 0-2."""
    stripes = torch.randint(0, 3, (count, 4), generator=generator)
    labels = stripes.repeat_interleave(2, dim=1)[:, None, :].expand(count, 8, 8).contiguous()
    images = torch.stack([labels * 80, torch.full_like(labels, 100), torch.full_like(labels, 30)],
                         dim=1)
    return images.to(torch.uint8), labels


def test_perfectly_informative_map_scores_miou_one():
    generator = torch.Generator().manual_seed(0)
    (train_images, train_labels), (val_images, val_labels) = (stripe_batch(64, generator),
                                                              stripe_batch(16, generator))
    dist = common.Dist(0, 0, 1, torch.device("cpu"))
    train = common.TensorLoader(train_images, train_labels, 16, 0, 1, 0)
    val = common.TensorLoader(val_images, val_labels, 16, 0, 1, 0, shuffle=False, drop_last=False)
    # the logits of each 2 x 2 cell are upsampled bilinearly to the 8 x 8 labels
    scores = eval_linear.train_dense_probe(StripeOracle(), None, ["res3"], train, val, 3, 8, dist,
                                           epochs=5, lr=0.5, seed=0)
    assert scores["res3"]["miou"] == 1.0 and scores["res3"]["pixel_acc"] == 1.0


def test_checkpoint_fpn_reads_mcls_pyramid(tmp_path):
    import mcl

    cfg = mcl.Config(fpn_dim=16, hidden_dim=32, proj_dim=8)
    torch.manual_seed(0)
    model = mcl.MCL(cfg).eval()
    for module in model.fpn.modules():          # BatchNorm statistics as after training, not 0 / 1
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_()
    path = tmp_path / "mcl.pt"
    common.save_checkpoint(dict(method="mcl", config=common.config_dict(cfg), step=0,
                                model=model.state_dict()), path)
    backbone, state = eval_linear.load_backbone(str(path))
    pyramid = eval_linear.load_pyramid(state)
    assert pyramid.levels == ("p2", "p3", "p4", "p5")
    x = torch.randn(2, 3, 32, 32)
    maps = eval_linear.dense_feature_maps(backbone.eval(), pyramid.eval(), x, ["res3", "p2", "p5"])
    with torch.no_grad():
        trunk = model.backbone(x)
        expected = model.fpn(trunk)                                         # mcl.py's own FPN
    assert torch.allclose(maps["res3"], trunk["res3"])
    assert maps["p2"].shape == (2, 16, 8, 8) and maps["p5"].shape == (2, 16, 1, 1)
    for level in ("p2", "p5"):
        assert torch.allclose(maps[level], expected[level], atol=1e-5)
    assert eval_linear.load_pyramid(dict(model={"backbone.conv1.weight": x})) is None


def tiny_checkpoint(path, seed):
    """A byol.py-style checkpoint without training: a seeded ResNet-18 under `backbone.`, trained
    (in its config) on 32 built-in images of 32 px."""
    torch.manual_seed(seed)
    model = {f"backbone.{key}": value for key, value in common.ResNetTrunk().state_dict().items()}
    config = dict(arch="resnet18", stem="imagenet", image_size=32, data="synthetic",
                  synthetic_size=32)
    common.save_checkpoint(dict(method="byol", config=config, step=0, model=model), path)
    return str(path)


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """eval_linear.py --dense on two checkpoints + the random-init row, 1 epoch, with --report;
    returns (rows, printed text, report path, checkpoint paths)."""
    folder = tmp_path_factory.mktemp("dense")
    first, second = tiny_checkpoint(folder / "a.pt", 1), tiny_checkpoint(folder / "b.pt", 2)
    report = folder / "results.md"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rows = eval_linear.main(["--ckpt", f"{first},{second}", "--random-init", "--dense",
                                 "--stage", "res2,res3,pixels,p5", "--dense-epochs", "1",
                                 "--dense-batch-size", "16", "--protocol", "none",
                                 "--batch-size", "16", "--device", "cpu", "--report", str(report)])
    return rows, printed.getvalue(), report, (first, second)


def test_dense_probe_end_to_end_one_row_per_checkpoint(dense_run):
    rows, printed, _, (first, second) = dense_run
    assert list(rows) == [f"{first} (random init)", first, second]
    for row in rows.values():
        assert set(row) == {"res2", "res3", "pixels"}
        for stage, cell in row.items():
            assert 0 <= cell["dense_miou"] <= 100 and 0 <= cell["dense_pixel_acc"] <= 100
            assert list(cell["dense_iou"]) == list(common.SYNTHETIC_CLASSES)  # background, 0..9
            assert ("knn" in cell) == (stage != "pixels")                   # kNN on res2..res5 only
    # the input is the same for every row, so is its probe
    assert len({row["pixels"]["dense_miou"] for row in rows.values()}) == 1
    assert "dense mIoU (%), per-pixel linear probe" in printed
    assert f"{second}: no FPN level p5 in the checkpoint" in printed       # no MCL FPN: skipped


def markdown_table(text, title):
    """The header and the rows (lists of cells) of the Markdown table under `## title`."""
    lines = text.splitlines()
    start = lines.index(f"## {title}") + 2
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split(" | ")])
    assert {cell.strip(":") for cell in table[1]} == {"---"}                # | --- | ---: |
    return table[0], table[2:]


def printed_table(text, title, labels):
    """{row label: [cells]} and the column names of the printed block titled `title`."""
    lines = text.splitlines()
    start = lines.index(title)
    header = lines[start + 1].split()[1:]
    body = {}
    for line in lines[start + 2:start + 2 + len(labels)]:
        label = next(label for label in labels if line.startswith(label + " "))
        body[label] = line[len(label):].split()
    return header, body


def test_report_holds_the_printed_tables(dense_run):
    rows, printed, report, _ = dense_run
    text = report.read_text()
    assert "python eval_linear.py --ckpt" in text and "--dense" in text
    every_stage = ["res2", "res3", "pixels"]
    for key, title, columns in (
            ("dense_miou", "dense mIoU (%), per-pixel linear probe", every_stage),
            ("dense_pixel_acc", "dense pixel accuracy (%), per-pixel linear probe", every_stage),
            ("knn", "knn top-1 (%)", ["res2", "res3"])):                    # no kNN of the pixels
        header, body = markdown_table(text, title)
        assert header == ["checkpoint", *columns]
        cells = {line[0]: line[1:] for line in body}
        printed_header, printed_cells = printed_table(printed, title, list(rows))
        assert printed_header == columns
        assert cells == printed_cells                                      # same rows, same numbers
        for label, line in cells.items():
            assert line == [f"{rows[label][stage][key]:.2f}" for stage in columns]
    header, body = markdown_table(text, "dense IoU per class (%; -: in neither labels nor "
                                        "predictions)")
    assert header == ["checkpoint", "stage", *common.SYNTHETIC_CLASSES]
    assert [line[:2] for line in body] == [[label, stage] for label in rows
                                           for stage in every_stage]
    for label, stage, *ious in body:
        assert ious == [f"{iou:.2f}" for iou in rows[label][stage]["dense_iou"].values()]
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed: the report has no charts" in printed
    else:
        assert (report.parent / "results_dense_miou.png").is_file()
        assert "![dense mIoU (%), per-pixel linear probe](results_dense_miou.png)" in text


def test_report_adds_mean_and_spread_over_seeds(dense_run):
    # a.pt and b.pt hold the same config (tiny_checkpoint stores no seed): two seeds of one run
    rows, _, report, (first, second) = dense_run
    group = first[:-len("a.pt")] + "{a,b}.pt"
    header, body = markdown_table(report.read_text(),
                                  "dense mIoU (%), per-pixel linear probe, over seeds: mean +- std "
                                  "(seeds)")
    assert header == ["run", "res2", "res3", "pixels"]
    cells = {line[0]: line[1:] for line in body}
    assert list(cells) == [f"{first} (random init)", group]
    for index, stage in enumerate(header[1:]):
        a, b = rows[first][stage]["dense_miou"], rows[second][stage]["dense_miou"]
        assert cells[group][index] == f"{(a + b) / 2:.2f} +- {abs(a - b) / 2 ** 0.5:.2f} (2)"
        assert cells[f"{first} (random init)"][index] == \
            f"{rows[f'{first} (random init)'][stage]['dense_miou']:.2f}"


def test_seed_groups_join_only_checkpoints_that_differ_in_seed_and_folder():
    def key(seed, out, random_init=False, **changes):
        config = {**dict(arch="resnet18", epochs=6, seed=seed, out=out), **changes}
        return eval_linear.run_key(dict(method="byol", config=config), random_init)

    runs = {"runs/byol_s0/last.pt": key(0, "runs/byol_s0"),
            "runs/byol_s1/last.pt": key(1, "runs/byol_s1"),
            "runs/byol_s1/last.pt (random init)": key(1, "runs/byol_s1", random_init=True),
            "runs/sgd_s0/last.pt": key(0, "runs/sgd_s0", optimizer="sgd"),
            "runs/sgd_s1/last.pt": key(1, "runs/sgd_s1", optimizer="sgd"),
            "runs/long/last.pt": key(0, "runs/long", epochs=12)}
    assert eval_linear.seed_groups(list(runs), runs) == {
        "runs/byol_s{0,1}/last.pt": ["runs/byol_s0/last.pt", "runs/byol_s1/last.pt"],
        "runs/byol_s1/last.pt (random init)": ["runs/byol_s1/last.pt (random init)"],
        "runs/sgd_s{0,1}/last.pt": ["runs/sgd_s0/last.pt", "runs/sgd_s1/last.pt"],
        "runs/long/last.pt": ["runs/long/last.pt"]}
