"""The reproduction kit: unlabelled image folders, every paper preset, the README's reproduction
table, and the COCO-Stuff-27 builder (cocostuff.py)."""

import importlib
import os
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import byol
import cocostuff
import common
from ddp_runner import ROOT

METHODS = ["byol", "ladder_byol", "dense_byol", "densesiam", "lewel", "mcl"]
SMALL = ["--image-size", "16", "--hidden-dim", "64", "--proj-dim", "32", "--epochs", "1",
         "--log-every", "1", "--workers", "0", "--device", "cpu"]


# ---- unlabelled image folders --------------------------------------------------------------------

def _photo_folder(root):
    """8 images at several depths in mixed suffix case, plus files the loader must skip.
    Returns the images' paths (relative to root) in the order the loader lists them."""
    images = ["IMG_1.JPG", "g.png", "2021/a.png", "2021/summer/b.PNG", "2021/summer/c.jpeg",
              "z/d.jpg", "z/e.png", "z/deep/er/f.png"]
    skipped = [".cache/h.png", "notes.txt", "2021/thumbs.db", "z/.hidden.png"]
    for index, name in enumerate(images + skipped):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() in (".jpg", ".jpeg", ".png"):
            image = Image.new("RGB", (40 + 3 * index, 36), (30 * index % 256, 90, 200 - 10 * index))
            image.save(path, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
        else:
            path.write_text("not an image")
    return images


def test_unlabelled_folder_is_searched_at_any_depth(tmp_path):
    expected = _photo_folder(tmp_path / "photos")
    kind, dataset, labels = common.load_dataset(str(tmp_path / "photos"), 36, "train")
    assert kind == "folder" and labels is None
    assert [str(Path(path).relative_to(tmp_path / "photos"))
            for path, _ in dataset.samples] == expected
    image, label = dataset[2]
    assert image.shape == (3, 36, 36) and image.dtype == torch.uint8 and label == -1
    with pytest.raises(common.InputError, match="no val split"):
        common.load_dataset(str(tmp_path / "photos"), 36, "val")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(common.InputError, match="no .jpg, .jpeg or .png files"):
        common.load_dataset(str(tmp_path / "empty"), 36, "train")


def test_byol_trains_on_an_unlabelled_folder(tmp_path, capsys):
    _photo_folder(tmp_path / "photos")
    args = SMALL + ["--data", str(tmp_path / "photos"), "--batch-size", "4", "--knn-every", "1"]
    result = byol.main(args + ["--out", str(tmp_path / "off"), "--stop-after", "1"])
    out = capsys.readouterr().out
    assert result["step"] == 1 and result["knn"] is None  # knn(0) ran and returned None
    assert "8 unlabelled images" in out and "kNN monitor off" in out
    result = byol.main(args + ["--out", str(tmp_path / "on"), "--val-data", "synthetic",
                               "--synthetic-size", "64"])
    out = capsys.readouterr().out
    # 8 images / batch 4, kNN on the synthetic set
    assert result["step"] == 2 and 0 <= result["knn"] <= 100
    assert "kNN monitor on --val-data synthetic" in out


def test_knn_monitor_off_is_said_in_one_line(tmp_path, capsys):
    _photo_folder(tmp_path / "photos")
    cfg = byol.Config(data=str(tmp_path / "photos"), workers=0, batch_size=4)
    dist = common.Dist(0, 0, 1, torch.device("cpu"))
    train, bank, val = common.make_loaders(cfg, dist)
    assert len(train) == 2 and bank is None and val is None
    lines = [line for line in capsys.readouterr().out.splitlines() if "kNN" in line]
    assert len(lines) == 1 and "8 unlabelled images" in lines[0] and "kNN monitor off" in lines[0]
    with pytest.raises(common.InputError, match="has no labels"):
        common.make_loaders(byol.Config(data="synthetic", val_data=str(tmp_path / "photos")), dist)


def test_imagenet_layout_keeps_its_labels(tmp_path):
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20, 20), (i * 80, 0, 0)).save(tmp_path / split / cls / f"{i}.png")
    cfg = byol.Config(data=str(tmp_path), workers=0, batch_size=2)
    train, bank, val = common.make_loaders(cfg, common.Dist(0, 0, 1, torch.device("cpu")))
    assert len(train) == 3 and len(bank.dataset) == 6
    assert [label for _, label in bank.dataset.samples] == [0, 0, 0, 1, 1, 1]
    assert [Path(path).parent.name for path, _ in val.dataset.samples] == ["cat"] * 3 + ["dog"] * 3
    images, labels = next(iter(val))
    # 36 px: 256/224 of 32 px
    assert images.shape == (6, 3, 36, 36) and labels.tolist() == [0, 0, 0, 1, 1, 1]


# ---- presets: each parses and passes its method's checks; new ones carry the papers' numbers -----

def parse_and_check(method, argv, world_size=8):
    """A method's config from argv, put through the checks its main() runs (8 processes, the
    README's)."""
    module = importlib.import_module(method)
    if method == "densesiam":
        cfg = module.parse_config(argv)  # --task seg puts the SEG values under the flags
    else:
        cfg = common.parse_config(module.Config, module.PRESETS, argv)
    module.check_config(cfg, world_size)
    return cfg


def _all_presets():
    for method in METHODS:
        module = importlib.import_module(method)
        for name, values in module.PRESETS.items():  # densesiam's seg presets: --task seg
            task = ["--task", "seg"] if values.get("task") == "seg" else []
            yield pytest.param(method, task, name, id=f"{method}-{name}")


@pytest.mark.parametrize("method, task, preset", list(_all_presets()))
def test_every_preset_parses_and_passes_the_checks(method, task, preset, tmp_path):
    # the seg presets start from supervised weights (Sec. 5.1)
    init = tmp_path / "resnet18_imagenet.pth"
    init.write_bytes(b"")
    cfg = parse_and_check(method,
                          task + ["--preset", preset] + (["--init", str(init)] if task else []))
    assert cfg.epochs > 0


def test_every_preset_sets_its_own_target_momentum():
    # A preset that left the target momentum out would train a paper recipe with the CPU default
    # (a 120-step value: README "What the CPU defaults show" has runs at 0.9 and 0.99).
    for method in METHODS:
        module = importlib.import_module(method)
        if not hasattr(module.Config, "tau_base"):
            continue
        for name, values in module.PRESETS.items():
            assert values.get("tau_base", 0) >= 0.98, (method, name)


def _lr(cfg, batch=None):
    """Peak lr at the preset's batch (or at `batch` images, same lr per image):
    base_lr * batch / 256."""
    return cfg.base_lr * (batch or cfg.batch_size) / 256


def test_ladder_paper_presets():
    # Sec. 4.1: LARS, batch 4096, lr 7.2, wd 1e-6, ResNet-50 at 224 px; Table 1: 100 / 200 / 400
    # epochs
    for method, preset, epochs in [("byol", "imagenet-100ep", 100),
                                   ("byol", "imagenet-200ep", 200),
                                   ("byol", "imagenet-400ep", 400),
                                   ("ladder_byol", "imagenet-400ep", 400),
                                   ("ladder_byol", "imagenet-dense-all-100ep", 100)]:
        cfg = parse_and_check(method, ["--preset", preset])
        assert ((cfg.epochs, cfg.batch_size, cfg.weight_decay)
                == (epochs, 4096, 1e-6)), (method, preset)
        assert _lr(cfg) == pytest.approx(7.2) and (cfg.arch, cfg.image_size) == ("resnet50", 224)
        assert cfg.predictor_lr_mult == 1.0
    ladder = importlib.import_module("ladder_byol")
    cfg = parse_and_check("ladder_byol", ["--preset", "imagenet-400ep"])
    # Sec. 4.1
    assert ladder.stage_weights(cfg) == {"res2": 1 / 16, "res3": 1 / 8, "res4": 1 / 4, "res5": 1.0}
    assert cfg.dense_stages == ()
    # Table 5: D D D D
    cfg = parse_and_check("ladder_byol", ["--preset", "imagenet-dense-all-100ep"])
    assert cfg.dense_stages == ("res2", "res3", "res4", "res5")


def test_lewel_presets():
    # Sec. 3.3: LEWEL_B lr 1.8 per 512 images, 100/200/400 epochs; IN-100: lr doubled, 240 epochs
    cfg = parse_and_check("lewel", ["--preset", "imagenet-100ep"])
    assert (cfg.variant, cfg.epochs, cfg.tau_base, cfg.eman) == ("byol", 100, 0.98, True)
    assert _lr(cfg, 512) == pytest.approx(1.8)
    cfg = parse_and_check("lewel", ["--preset", "imagenet100"])
    assert (cfg.variant, cfg.epochs, cfg.tau_base) == ("byol", 240, 0.98)
    assert _lr(cfg, 512) == pytest.approx(3.6)
    # every LEWEL_B preset trains the predictors at the lr of the rest (the CPU default: 10x)
    for preset in ("imagenet", "imagenet-100ep", "imagenet100", "imagenet-400ep", "cifar10"):
        assert parse_and_check("lewel", ["--preset", preset]).predictor_lr_mult == 1.0, preset
    # the EMAN target: every 100/200/240-epoch recipe (and cifar10); the 400-epoch one and the
    # CPU default (a 60-step run, NOTE in lewel.py) use a train-mode EMA target
    for preset in ("imagenet", "imagenet-100ep", "imagenet100", "cifar10"):
        assert parse_and_check("lewel", ["--preset", preset]).eman, preset
    assert not parse_and_check("lewel", ["--preset", "imagenet-400ep"]).eman
    assert not parse_and_check("lewel", []).eman
    # LEWEL_M: batch 256, lr 0.06, wd 1e-4, tau 0.2, key momentum 0.999, heads 2048/128
    for preset, epochs, lr in [("imagenet-moco-100ep", 100, 0.06), ("imagenet100-moco", 240, 0.12)]:
        cfg = parse_and_check("lewel", ["--preset", preset])
        assert ((cfg.variant, cfg.epochs, cfg.batch_size, cfg.weight_decay)
                == ("moco", epochs, 256, 1e-4))
        assert _lr(cfg) == pytest.approx(lr) and (cfg.temperature, cfg.tau_base) == (0.2, 0.999)
        assert (cfg.hidden_dim, cfg.proj_dim, cfg.warmup_epochs) == (2048, 128, 0.0)


def test_mcl_presets():
    # Sec. 4.1: LARS, batch 4096, lr 1.0 * 4096 / 256, wd 1e-5, 10 warmup epochs, EMA 0.99; 530
    # epochs on COCO
    for preset, epochs in [("coco", 530), ("imagenet-200ep", 200), ("imagenet-400ep", 400)]:
        cfg = parse_and_check("mcl", ["--preset", preset])
        assert ((cfg.epochs, cfg.batch_size, cfg.weight_decay, cfg.warmup_epochs)
                == (epochs, 4096, 1e-5, 10.0))
        assert _lr(cfg) == pytest.approx(16.0) and cfg.tau_base == 0.99 and cfg.arch == "resnet50"


def test_densesiam_coco_presets():
    # Sec. 5.1: SGD lr 0.05 * B / 256, batch 512, wd 1e-4, momentum 0.9, 800 epochs on COCO,
    # ResNet-50;
    # Sec. 3.4: heads 512 wide; Table 4: K = 7, lambda1 = 1, lambda2 = 0.1 from half of training
    expected = {"coco": (1.0, 0.1), "coco-pixsim": (1.0, 0.0), "coco-simsiam": (0.0, 0.0)}
    for preset, (dense_weight, region_weight) in expected.items():
        cfg = parse_and_check("densesiam", ["--preset", preset])
        assert (cfg.epochs, cfg.batch_size, cfg.weight_decay, cfg.momentum) == (800, 512, 1e-4, 0.9)
        assert _lr(cfg) == pytest.approx(0.1) and (cfg.arch, cfg.image_size) == ("resnet50", 224)
        assert ((cfg.dense_dim, cfg.dense_pred_hidden, cfg.region_dim, cfg.grid_size)
                == (512, 512, 512, 7))
        assert ((cfg.dense_weight, cfg.region_weight, cfg.region_start)
                == (dense_weight, region_weight, 0.5))


# ---- the README's reproduction table -------------------------------------------------------------

def _readme_commands():
    text = (Path(ROOT) / "README.md").read_text()
    section = text.split("## Reproducing the papers", 1)[1].split("\n## ", 1)[0]
    pattern = r"`((?:%s)\.py(?: [^`]*)?)`" % "|".join(METHODS)  # `method.py --flag value ...`
    commands = []
    for span in re.findall(pattern, section):
        words = shlex.split(span)
        commands.append((words[0].removesuffix(".py"), words[1:]))
    return commands


def test_readme_table_commands_parse(tmp_path):
    commands = _readme_commands()
    assert len(commands) > 30
    init = tmp_path / "resnet18_imagenet.pth"
    init.write_bytes(b"")  # --init is checked for existence only
    for method, argv in commands:
        argv = [str(init) if previous == "--init" else word
                for previous, word in zip([""] + argv, argv)]
        parse_and_check(method, argv)
    used = {(method, argv[argv.index("--preset") + 1]) for method, argv in commands
            if "--preset" in argv}
    new_presets = {("byol", "imagenet-200ep"), ("byol", "imagenet-400ep"),
                   ("ladder_byol", "imagenet-400ep"), ("ladder_byol", "imagenet-dense-all-100ep"),
                   ("lewel", "imagenet-100ep"), ("lewel", "imagenet100"),
                   ("lewel", "imagenet-moco-100ep"), ("lewel", "imagenet100-moco"),
                   ("mcl", "coco"), ("mcl", "imagenet-200ep"), ("mcl", "imagenet-400ep"),
                   ("densesiam", "coco"), ("densesiam", "coco-pixsim"),
                   ("densesiam", "coco-simsiam"), ("densesiam", "cocostuff27")}
    assert new_presets <= used, new_presets - used


# ---- cocostuff.py: the COCO-Stuff-27 builder -----------------------------------------------------

# Fine labels of COCO-Stuff used below (value in the stuffthingmaps PNGs): 0 person, 2 car,
# 90 hair brush, 105 clouds, 123 grass, 156 sky-other, 168 tree, 170 wall-brick, 181 wood;
# 255 unlabelled.
# Their coarse classes in IIC's order: person 9, vehicle 11, indoor 4, sky 23, plant 22, wall 18,
# solid 24.

def _label_maps():
    """Hand-made fine label maps -> (kept or not, expected 27-class map or None)."""
    a = np.zeros((360, 360), np.uint8)
    a[:288] = 156                               # 80 % sky-other, 20 % person: kept
    expected_a = np.full((360, 360), 9, np.uint8)
    expected_a[:288] = 23
    b = np.full((360, 360), 2, np.uint8)
    b[:252] = 123                               # 70 % grass, 30 % car: fewer than 75 % stuff pixels
    c = np.full((400, 359), 168, np.uint8)      # all tree, but 359 px wide: smaller than 360
    d = np.full((360, 360), 255, np.uint8)
    d[:270] = 170                               # exactly 75 % wall-brick, the rest unlabelled: kept
    expected_d = np.full((360, 360), 255, np.uint8)
    expected_d[:270] = 18
    e = np.full((360, 480), 105, np.uint8)      # clouds, with a strip of hair brush over wood
    e[:180, 400:] = 90
    e[180:, 400:] = 181                         # stuff: (400 * 360 + 80 * 180) / (360 * 480) = 92 %
    expected_e = np.full((360, 480), 23, np.uint8)
    expected_e[:180, 400:] = 4
    expected_e[180:, 400:] = 24
    f = np.full((360, 360), 255, np.uint8)      # all unlabelled: 0 % stuff
    return {"train2017": {"a": (a, expected_a), "b": (b, None), "c": (c, None),
                          "d": (d, expected_d)},
            "val2017": {"e": (e, expected_e), "f": (f, None)}}


def _fake_cocostuff(root):
    for split, maps in _label_maps().items():
        for kind in ("images", "labels"):
            (root / kind / split).mkdir(parents=True)
        for name, (fine, _) in maps.items():
            Image.fromarray(fine).save(root / "labels" / split / f"{name}.png")
            height, width = fine.shape
            picture = Image.new("RGB", (width, height), (20, 120, 220))
            picture.save(root / "images" / split / f"{name}.jpg")


def test_fine_to_coarse_table():
    table = cocostuff.FINE_TO_COARSE
    # IIC's table
    sizes = [6, 6, 10, 10, 8, 8, 8, 10, 6, 1, 10, 8, 2, 6, 4, 11, 4, 11, 7, 2, 6, 11, 9, 2, 6, 5, 5]
    assert [int((table[:182] == coarse).sum()) for coarse in range(27)] == sizes
    assert (table[:91] < 12).all() and (table[91:182] >= 12).all() and (table[182:] == 255).all()
    spot = {0: 9, 2: 11, 90: 4, 100: 13, 105: 23, 123: 22, 129: 15, 156: 23, 168: 22, 170: 18,
            181: 24}
    # carpet 100 -> floor, light 129 -> furniture
    assert {fine: int(table[fine]) for fine in spot} == spot


def test_cocostuff_builds_the_seg_folder(tmp_path, capsys):
    import densesiam

    _fake_cocostuff(tmp_path / "coco")
    out = tmp_path / "cocostuff27"
    kept = cocostuff.main(["--images", str(tmp_path / "coco" / "images"), "--labels",
                           str(tmp_path / "coco" / "labels"), "--out", str(out), "--workers", "2"])
    assert kept == {"train": ["a", "d"], "val": ["e"]}
    assert "train: 2 of 4 images kept by the rule (the paper: 49,629)" in capsys.readouterr().out
    for split, maps in _label_maps().items():
        short = {"train2017": "train", "val2017": "val"}[split]
        for name, (_, expected) in maps.items():
            label = out / "labels" / short / f"{name}.png"
            image = out / "images" / short / f"{name}.jpg"
            assert label.exists() == image.exists() == (expected is not None), name
            if expected is not None:
                with Image.open(label) as saved:
                    assert saved.mode == "L" and np.array_equal(np.array(saved), expected), name
                source = tmp_path / "coco" / "images" / split / f"{name}.jpg"
                assert image.is_symlink() and image.resolve() == source.resolve()
    # what densesiam.py --task seg reads
    pairs = common.segmentation_pairs(out, "train", "cocostuff")
    dataset = common.SegmentationPairs(pairs, 32)
    assert len(dataset) == 2
    image, label = dataset[0]
    assert image.shape == (3, 32, 32) and set(label.unique().tolist()) == {9, 23}
    cfg = densesiam.Config(**{**densesiam.SEG, "data": str(out), "workers": 0})
    dist = common.Dist(0, 0, 1, torch.device("cpu"))
    _, loader = common.make_seg_loaders(cfg, dist, 2, 32, 32)  # through common.FolderLoader
    images, labels = next(iter(loader))
    assert images.shape == (1, 3, 32, 32) and labels.shape == (1, 32, 32)
    assert set(labels.unique().tolist()) == {4, 23, 24}


def test_cocostuff_with_picie_lists(tmp_path):
    _fake_cocostuff(tmp_path / "coco")
    # the lists win over the rule
    for split, names in (("train2017", ["b", "d"]), ("val2017", ["f"])):
        (tmp_path / "curated" / split).mkdir(parents=True)
        (tmp_path / "curated" / split / cocostuff.LIST_NAME).write_text(
            "".join(f"{n}\n" for n in names))
    kept = cocostuff.convert(tmp_path / "coco" / "images", tmp_path / "coco" / "labels",
                             tmp_path / "out", curated=tmp_path / "curated", copy=True, workers=1,
                             log=lambda line: None)
    assert kept == {"train": ["b", "d"], "val": ["f"]}
    expected_b = np.full((360, 360), 11, np.uint8)
    expected_b[:252] = 22
    with Image.open(tmp_path / "out" / "labels" / "train" / "b.png") as saved:
        assert np.array_equal(np.array(saved), expected_b)
    assert not (tmp_path / "out" / "images" / "train" / "b.jpg").is_symlink()  # --copy
    with pytest.raises(SystemExit):
        cocostuff.main(["--images", "x", "--labels", str(tmp_path / "nowhere"),
                        "--out", str(tmp_path / "o")])


# ---- results.sh: the README's side-by-side table from scratch ------------------------------------

FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for python: records its arguments; a training run leaves a last.pt in its --out.
echo "$*" >> "$CALLS"
if [[ $1 != eval_linear.py ]]; then
    while [[ $# -gt 0 ]]; do [[ $1 == --out ]] && mkdir -p "$2" && touch "$2/last.pt"; shift; done
fi
"""


def fake_results_env(tmp_path, **settings):
    """(calls file, output folder, environment) for results.sh with FAKE_PYTHON as its python."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    return calls, tmp_path / "out", dict(os.environ, PYTHON=str(fake), CALLS=str(calls), **settings)


def test_results_script_trains_every_method_and_seed_then_reports_per_image_size(tmp_path):
    calls, out, env = fake_results_env(tmp_path, SEEDS="0 1", JOBS="2", PRECISION="fp32")
    run = subprocess.run(["bash", "results.sh", str(out), "--epochs", "1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = calls.read_text().splitlines()
    trained = sorted(line for line in lines if not line.startswith("eval_linear.py"))
    assert trained == sorted(f"{method}.py --seed {seed} --out {out}/{method}_s{seed} "
                             "--precision fp32 --epochs 1" for method in METHODS for seed in (0, 1))
    reports = {}
    for line in lines:
        if line.startswith("eval_linear.py"):
            words = line.split()
            assert {"--random-init", "--dense"} <= set(words)
            value = dict(zip(words, words[1:]))
            assert value["--precision"] == "fp32"
            reports[Path(value["--report"]).stem] = (value["--ckpt"].split(","), value["--stage"])
    stages = "res2,res3,res4,res5"

    def ckpts(*methods):
        return [f"{out}/{method}_s{seed}/last.pt" for method in methods for seed in (0, 1)]

    assert reports == {"results_32px": (ckpts("byol", "ladder_byol"), stages),
                       "results_mcl": (ckpts("mcl"), stages + ",p2,p3,p4,p5"),
                       "results_40px": (ckpts("dense_byol", "lewel"), stages),
                       "results_64px": (ckpts("densesiam"), stages)}
    # a second call trains nothing again (every run is done) and only reports
    calls.unlink()
    assert subprocess.run(["bash", "results.sh", str(out)], cwd=ROOT, env=env,
                          timeout=60).returncode == 0
    assert all(line.startswith("eval_linear.py") for line in calls.read_text().splitlines())


def test_results_script_trains_and_reports_only_the_methods_asked_for(tmp_path):
    calls, out, env = fake_results_env(tmp_path, SEEDS="0", JOBS="1", METHODS="byol ladder_byol")
    assert subprocess.run(["bash", "results.sh", str(out)], cwd=ROOT, env=env,
                          timeout=60).returncode == 0
    lines = calls.read_text().splitlines()
    assert sorted(line.split()[0] for line in lines) == ["byol.py", "eval_linear.py",
                                                         "ladder_byol.py"]
    report = next(line for line in lines if line.startswith("eval_linear.py")).split()
    assert report[report.index("--report") + 1] == f"{out}/results_32px.md"
    assert report[report.index("--ckpt") + 1] == (f"{out}/byol_s0/last.pt,"
                                                  f"{out}/ladder_byol_s0/last.pt")
