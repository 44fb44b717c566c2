"""byol.py: DDP on CPU, exact resume, a short run that learns, bad input."""

import json
import subprocess
import sys

import pytest
import torch

import byol
import common
import eval_linear
from ddp_runner import ROOT, assert_same_parameters, run_two_processes

TINY = ["--synthetic-size", "64", "--image-size", "32", "--batch-size", "16", "--hidden-dim", "64",
        "--proj-dim", "32", "--epochs", "1", "--knn-every", "0", "--log-every", "1"]


def test_loss_is_zero_when_prediction_equals_target():
    z = torch.randn(4, 8)
    assert byol.byol_loss([z, z], [z, z]).item() == pytest.approx(0.0, abs=1e-6)


def test_target_has_no_predictor_and_gets_no_gradient():
    cfg = byol.Config(hidden_dim=32, proj_dim=16)
    model = byol.BYOL(cfg)
    target = common.make_target({"backbone": model.backbone, "projector": model.projector})
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    predictions = model(views)
    targets = [byol.embed(target, view) for view in views]
    byol.byol_loss(predictions, targets).backward()
    assert all(p.grad is None for p in target.parameters())
    assert all(p.grad is not None for p in model.parameters())


def test_two_process_ddp_keeps_ranks_identical(tmp_path):
    states = run_two_processes("byol", TINY, str(tmp_path))
    assert_same_parameters(states)


def _weights(path):
    state = torch.load(path, weights_only=True)
    return {**{"model." + k: v for k, v in state["model"].items()},
            **{"target." + k: v for k, v in state["target"].items()}}


def test_resume_reaches_the_same_weights_bitwise(tmp_path):
    """Also from a checkpoint whose saved config is an older one: a field since removed
    ("benchmark"), none for a field since added ("precision"); eval_linear reads it too."""
    args = TINY + ["--device", "cpu", "--batch-size", "8"]  # 8 steps in the epoch
    byol.main(args + ["--out", str(tmp_path / "straight")])
    byol.main(args + ["--out", str(tmp_path / "resumed"), "--stop-after", "3"])
    state = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert state["step"] == 3
    del state["config"]["precision"]
    state["config"]["benchmark"] = False
    common.save_checkpoint(state, tmp_path / "resumed" / "last.pt")
    backbone, _ = eval_linear.load_backbone(tmp_path / "resumed" / "last.pt")
    assert torch.equal(backbone.conv1.weight, state["model"]["backbone.conv1.weight"])
    byol.main(args + ["--out", str(tmp_path / "resumed"), "--resume"])
    straight = _weights(tmp_path / "straight" / "last.pt")
    resumed = _weights(tmp_path / "resumed" / "last.pt")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def view_alignment_gap(backbone, images, seed=0):
    """mean cos(two views of the same image) - mean cos(views of different images), on pooled res5
    features."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        backbone.eval()
        features = [torch.nn.functional.normalize(common.global_pool(backbone(
            common.augment(images, recipe, 32, generator)[0])["res5"]), dim=1)
            for recipe in common.BYOL_VIEWS]
    similarity = features[0] @ features[1].T
    off_diagonal = ((similarity.sum() - similarity.diagonal().sum())
                    / (len(images) ** 2 - len(images)))
    return (similarity.diagonal().mean() - off_diagonal).item()


@pytest.mark.default_run
def test_default_run_aligns_the_views_and_lifts_the_knn(default_run):
    """The README's quick start, as a user runs it: `python byol.py` on the built-in digits (in the
    background on one thread, see conftest.py). The loss goes down; two views of one image end
    closer, relative to views of different images, than under the random-init backbone (required
    factor 1.5); the kNN top-1 of the frozen backbone ends at least 5 points above its random-init
    value. Seed 0 on one thread gained +11.3 points on an AVX2-only CPU (float32), +9.1 in float32
    and +11.6 in bf16 on an AVX512-BF16 one; the smallest of six float32 runs of seeds 0, 1, 2 on
    those two CPUs gained +5.1 (README "What the CPU defaults show")."""
    rows = [json.loads(line) for line in open(default_run / "metrics.jsonl")]
    knn = [row["knn_top1"] for row in rows if "knn_top1" in row]
    assert len(knn) == 2
    assert knn[1] > knn[0] + 5.0, knn
    losses = [row["loss"] for row in rows if "loss" in row]
    assert losses[-1] < losses[0]
    state = torch.load(default_run / "last.pt", weights_only=True)
    assert state["step"] == 120 and state["config"] == common.config_dict(byol.Config(
        out=str(default_run), device="cpu", knn_every=6))
    trained = byol.BYOL(byol.Config())
    trained.load_state_dict(state["model"])
    torch.manual_seed(0)
    random_init = byol.BYOL(byol.Config()).backbone
    images, _ = common.make_synthetic(128, 32, seed=99)
    trained_gap = view_alignment_gap(trained.backbone, images)
    random_gap = view_alignment_gap(random_init, images)
    assert trained_gap > 1.5 * random_gap > 0, (trained_gap, random_gap)


def run_cli(*args, cwd=ROOT):
    result = subprocess.run([sys.executable, "byol.py", *args], cwd=cwd, capture_output=True,
                            text=True, timeout=120)
    return result.returncode, result.stderr.strip().splitlines()


def test_bad_input_exits_with_one_clear_line(tmp_path):
    code, lines = run_cli("--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"))
    assert code == 2 and lines[-1].startswith("error: --data") and "no such file" in lines[-1]


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "-4"], "--batch-size must be positive"),
    (["--preset", "imagenet-2000ep"], "unknown preset"),
    (["--arch", "resnet34"], "--arch must be"),
    (["--epochs", "many"], "cannot read 'many'"),
    (["--resume"], "does not exist"),
])
def test_bad_flags(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        byol.main(["--out", str(tmp_path)] + TINY + args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_empty_and_corrupt_image_folders(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "data"
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
    with pytest.raises(SystemExit):
        byol.main(["--data", str(root), "--out", str(tmp_path / "o")] + TINY)
    assert "contains no images" in capsys.readouterr().err
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(8):
                picture = Image.new("RGB", (40 + i, 30), (i * 30, 100, 200 - i * 20))
                picture.save(root / split / cls / f"{i}.png")
    folder_args = ["--data", str(root), "--workers", "0", "--batch-size", "8"]
    # a real ImageFolder works
    result = byol.main(TINY + folder_args + ["--out", str(tmp_path / "ok")])
    assert result["step"] == 2
    (root / "train" / "a" / "0.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit):
        byol.main(TINY + folder_args + ["--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot decode image") and "0.png" in err[-1]


def test_unwritable_output_directory(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit):
        byol.main(TINY + ["--out", str(blocker / "sub")])
    assert "not writable" in capsys.readouterr().err


def test_predictor_learning_rate_factor(tmp_path):
    """--preset lars (LARS at the CPU size) trains the predictor at 10x the lr; the CPU default and
    the paper presets keep 1x, and every preset names its optimizer (a preset that left it out
    would train the paper's recipe with the CPU default's SGD)."""
    assert (byol.Config().predictor_lr_mult, byol.Config().optimizer) == (1.0, "sgd")
    for name, values in byol.PRESETS.items():
        assert values["optimizer"] == "lars", name
        cfg = common.parse_config(byol.Config, byol.PRESETS, ["--preset", name])
        assert cfg.predictor_lr_mult == (10.0 if name == "lars" else 1.0), name
    byol.main(["--out", str(tmp_path), "--preset", "lars"] + TINY)
    groups = torch.load(tmp_path / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert all(g["trust_coefficient"] == 1e-3 and g["momentum"] == 0.9 for g in groups)
    base = [g["lr"] for g in groups if g["lr_mult"] == 1.0]
    assert len(groups) == 4 and len(set(base)) == 1 and base[0] > 0
    assert all(g["lr"] == 10.0 * base[0] for g in groups if g["lr_mult"] == 10.0)


def test_cpu_default_is_plain_sgd_with_one_lr(tmp_path, capsys):
    """The CPU default: torch's SGD without momentum, the same lr for every parameter (peak 0.48 x
    batch / 256, no warmup), weight decay on weights only; a bad --optimizer is one line."""
    byol.main(["--out", str(tmp_path), "--stop-after", "1"] + TINY)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert all(g["momentum"] == 0 and not g["nesterov"] and "trust_coefficient" not in g
               for g in groups)
    assert sorted(g["weight_decay"] for g in groups) == [0.0, byol.Config().weight_decay]
    assert all(g["lr"] == pytest.approx(0.48 * 16 / 256) for g in groups)  # step 0: no warmup
    with pytest.raises(SystemExit) as exit_info:
        byol.main(["--out", str(tmp_path / "b"), "--optimizer", "adam"] + TINY)
    assert exit_info.value.code == 2
    assert "error: --optimizer must be lars or sgd, not 'adam'" in capsys.readouterr().err
