"""The benchmark mode prints every field (numbers are never asserted); compiled == eager on CUDA."""

import pytest
import torch

import byol
import common

TINY = ["--synthetic-size", "64", "--image-size", "32", "--batch-size", "8", "--hidden-dim", "64", "--proj-dim", "32",
        "--device", "cpu"]


def test_benchmark_prints_all_fields(tmp_path, capsys):
    results = byol.main(TINY + ["--out", str(tmp_path), "--benchmark"])
    out = capsys.readouterr().out
    for field in ("loader alone", "augmentation, batched (ours)", "augmentation, torchvision per sample",
                  "device step (synthetic data on device)", "data-wait fraction", "peak memory",
                  "GFLOP per image", "augmentation speed-up"):
        assert field in out, field
    assert all(value >= 0 for value in results.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16 autocast + torch.compile)")
def test_compiled_and_eager_losses_match():
    cfg = byol.Config(hidden_dim=256, proj_dim=64)
    torch.manual_seed(0)
    model = byol.BYOL(cfg).cuda().to(memory_format=torch.channels_last)
    target = common.make_target({"backbone": model.backbone, "projector": model.projector})
    views = [torch.randn(16, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last) for _ in range(2)]
    compiled = torch.compile(model)
    losses = []
    for forward in (model, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            predictions = forward(views)
            with torch.no_grad():
                targets = [byol.embed(target, view) for view in views]
        losses.append(byol.byol_loss(predictions, targets).item())
    assert losses[0] == pytest.approx(losses[1], rel=2e-2, abs=2e-2)
