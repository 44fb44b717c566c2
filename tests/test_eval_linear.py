"""eval_linear.py: kNN + linear probe per stage, random-init baseline, the Table 7 layout, export."""

import torch
import torchvision

import byol
import eval_linear

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
    assert list(random_rows) == [f"{ckpt} (random init)"]

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
