"""benchmark.py prints every row (numbers are never asserted); compiled == eager on CUDA."""

import pytest
import torch

import benchmark
import byol
import common

TINY = ["--synthetic-size", "64", "--image-size", "16", "--batch-size", "8", "--hidden-dim", "64",
        "--proj-dim", "32", "--device", "cpu"]


def test_benchmark_prints_every_row(tmp_path, capsys, monkeypatch):
    """`python benchmark.py byol ...`, cut to 2 steps per timed run: every row, and on a CPU the
    device step in fp32 and in bf16 with their ratio. The device step builds no dataset: only the
    loader row makes the built-in set of the flags (64 training + 64 val images)."""
    make_synthetic, built = common.make_synthetic, []
    monkeypatch.setattr(common, "make_synthetic", lambda n, *args, **kwargs: (
        built.append(n), make_synthetic(n, *args, **kwargs))[1])
    results = benchmark.main(["byol", *TINY, "--out", str(tmp_path)], steps=1, warmup=1, window=1)
    assert set(built) == {128}, built
    out = capsys.readouterr().out
    rows = ("loader alone", "augmentation, batched (ours)", "augmentation, torchvision per sample",
            "device step, fp32 (synthetic data on device)",
            "device step, bf16 (synthetic data on device)", "data-wait fraction, device step, bf16",
            "peak memory", "GFLOP per image", "augmentation speed-up",
            "device step speed-up (bf16 / fp32)",
            "precision fp32 (auto: no native bf16 on this CPU)")
    for row in rows:
        assert row in out, row
    assert all(value >= 0 for value in results.values())
    ratio = results["device step, bf16 (synthetic data on device)"] / results[
        "device step, fp32 (synthetic data on device)"]
    assert f"{ratio:12.2f}x" in out


def test_benchmark_names_the_method_files(capsys):
    with pytest.raises(SystemExit) as stop:
        benchmark.main(["simclr", "--batch-size", "8"])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "'simclr' is not a method file" in error
    for method in ("byol", "ladder_byol", "dense_byol", "densesiam", "lewel", "mcl"):
        assert method in error
    with pytest.raises(SystemExit):  # the method's own checks, before anything is timed
        benchmark.main(["byol", "--batch-size", "1", "--device", "cpu"])
    assert "BatchNorm needs at least 2" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs CUDA (bf16 autocast + torch.compile)")
def test_compiled_and_eager_losses_match():
    cfg = byol.Config(hidden_dim=256, proj_dim=64)
    torch.manual_seed(0)
    model = byol.BYOL(cfg).cuda().to(memory_format=torch.channels_last)
    target = common.make_target({"backbone": model.backbone, "projector": model.projector})
    views = [torch.randn(16, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
             for _ in range(2)]
    compiled = torch.compile(model)
    losses = []
    for forward in (model, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            predictions = forward(views)
            with torch.no_grad():
                targets = [byol.embed(target, view) for view in views]
        losses.append(byol.byol_loss(predictions, targets).item())
    assert losses[0] == pytest.approx(losses[1], rel=2e-2, abs=2e-2)
