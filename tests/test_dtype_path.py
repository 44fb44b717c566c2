"""The GPU dtype path on a CPU: every method's training step under bf16 autocast, channels_last.

On CUDA (and with --precision bf16 anywhere) common.device_setup returns (torch.bfloat16,
torch.channels_last): each train loop moves its model to channels_last and runs the forward passes
under torch.autocast(dtype=torch.bfloat16). Parameters, gradients, optimiser state, checkpoints and
losses must stay float32, and so must the geometry computed inside the autocast block: sampling
grids, crop grids and matrices, RoI boxes and indices, dense matches. Here every method trains one
step on the CPU with --precision bf16, so dtype bugs show without a GPU.

CPU autocast is not CUDA autocast op for op (it casts grid_sample to float32, CUDA does not), so
the geometry is also tested function by function, with inputs where a bf16 coordinate or index
changes the result: DenseSiam's grid points and the seg crop in tests/test_densesiam.py, MCL's
RoIAlign windows in tests/test_mcl.py, and here crop_resize's CUDA branch and dense_match.
"""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

import byol
import common
import dense_byol
import densesiam
import ladder_byol
import lewel
import mcl

BF16 = torch.bfloat16



# --------------------------------------------------------------------------------------------------
# One real train() call per method, on CUDA's dtype path


RUN = dict(synthetic_size=16, batch_size=8, epochs=1, knn_every=0, log_every=1, stop_after=1,
           warmup_epochs=0.0)


def tiny(config_cls, **fields):
    """One step of 8 images, no kNN, no warmup (so the one step has a non-zero lr)."""
    names = {field.name for field in dataclasses.fields(config_cls)}
    return config_cls(**{**{key: value for key, value in RUN.items() if key in names}, **fields})


HEADS = dict(hidden_dim=32, proj_dim=16)
# name: (module, train function, loss function its loop calls, tiny config). 16 px: res5 is 1 x 1.
CASES = {
    "byol": (byol, "train", "byol_loss", lambda: tiny(byol.Config, image_size=16, **HEADS)),
    "ladder_byol": (ladder_byol, "train", "ladder_loss",
                    lambda: tiny(ladder_byol.Config, image_size=16, **HEADS)),
    "ladder_byol-dense": (ladder_byol, "train", "ladder_loss",  # D D G G: matches 4x4, 2x2 maps
                          lambda: tiny(ladder_byol.Config, image_size=16, dense_hidden_dim=16,
                                       dense_stages=("res2", "res3"), **HEADS)),
    "dense_byol": (dense_byol, "train", "dense_byol_loss",
                   lambda: tiny(dense_byol.Config, image_size=16, dense_hidden_dim=16, **HEADS)),
    "densesiam": (densesiam, "train", "densesiam_loss",  # RegionSim on; 32 px: see the tolerance
                  lambda: tiny(densesiam.Config, image_size=32, proj_dim=32, pred_hidden=16,
                               dense_dim=8, dense_pred_hidden=8, region_dim=16, region_start=0.0)),
    "densesiam-seg": (densesiam, "train", "seg_loss",  # evaluates under autocast at step 0
                      lambda: tiny(densesiam.Config, **{**densesiam.SEG, **RUN, "fpn_dim": 16,
                                                        "num_aux_classes": 8,
                                                        "region_start": 0.0})),
    "lewel_b": (lewel, "train", "lewel_b_loss",
                lambda: tiny(lewel.Config, image_size=16, **HEADS)),
    "lewel_m": (lewel, "train", "lewel_m_loss",
                lambda: tiny(lewel.Config, **{**lewel.MOCO, **HEADS}, image_size=16,
                             queue_size=16)),
    "mcl": (mcl, "train", "mcl_loss",  # 32 px: every tile on the feature lattice (sliced windows)
            lambda: tiny(mcl.Config, image_size=32, fpn_dim=16, **HEADS)),
    "mcl-roialign": (mcl, "train", "mcl_loss",  # 16 px: tiles off the stride-32 lattice -> RoIAlign
                     lambda: tiny(mcl.Config, image_size=16, fpn_dim=16, **HEADS)),
}


def tensors_in(value):
    """Every tensor in a nest of lists, tuples and dicts."""
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in tensors_in(item)]
    return []


def record_run(name, out, dtype_path):
    """One train() call of CASES[name], watched. Records the losses the loop computed and the loss
    function's inputs, the parameters (copied) and gradients just before the first optimiser step,
    the number of optimiser steps, the checkpoint states (kept instead of written) and train()'s
    result. dtype_path=True: --precision bf16, CUDA's dtype path; False: --precision fp32."""
    module, train_name, loss_name, make_config = CASES[name]
    precision = "bf16" if dtype_path else "fp32"
    cfg = dataclasses.replace(make_config(), out=str(out), precision=precision)
    record = SimpleNamespace(losses=[], loss_inputs=[], before=None, steps=0, checkpoints=[])
    loss_function = getattr(module, loss_name)

    def watched_loss(*args, **kwargs):
        result = loss_function(*args, **kwargs)
        record.losses.append(result[0] if isinstance(result, tuple) else result)
        record.loss_inputs.append(args)
        return result

    def before_step(optimizer, args, kwargs):
        if record.before is None:
            record.before = [(param, param.detach().clone(), param.grad)
                             for group in optimizer.param_groups for param in group["params"]]
        record.steps += 1

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, loss_name, watched_loss)
        patch.setattr(common, "save_checkpoint",
                      lambda state, path: record.checkpoints.append(state))
        handle = register_optimizer_step_pre_hook(before_step)
        # bf16 on PyTorch's own CPU kernels, not oneDNN's: on CPUs with native bf16 (AVX512-BF16,
        # torch 2.14.1) oneDNN's weight gradient of a stride-2 3x3 conv from 256 channels on a
        # 1 x 1 map (res5's first conv at 16 px) comes out inf/nan. These tests check this repo's
        # dtype path, which is then the same on every CPU.
        patch.setattr(torch.backends.mkldnn, "enabled", not dtype_path)
        try:
            record.result = getattr(module, train_name)(cfg, common.setup_distributed("cpu"))
        finally:
            handle.remove()
    return record


@pytest.mark.parametrize("name", list(CASES))
def test_training_step_on_the_gpu_dtype_path(name, tmp_path):
    """bf16 forward, float32 all that is kept: the loss is a finite float32 scalar close to the
    float32 run's, one optimiser step ran and moved every parameter that had a gradient, and
    parameters, gradients, buffers, optimiser state and checkpoint are float32 (4-D weights
    channels_last)."""
    run = record_run(name, tmp_path / "bf16", dtype_path=True)
    assert run.steps == run.result["step"] == 1 and len(run.losses) == 1
    loss = run.losses[0]
    assert loss.dtype == torch.float32 and loss.dim() == 0 and torch.isfinite(loss)
    assert any(tensor.dtype == BF16 for tensor in tensors_in(run.loss_inputs[0])), "no bf16 forward"

    model = run.result["model"]
    moved = []
    for param, before, grad in run.before:
        assert param.dtype == torch.float32 and (grad is None or grad.dtype == torch.float32)
        if grad is not None and grad.abs().sum() > 0:
            moved.append(not torch.equal(param.detach(), before))
    assert moved and all(moved), f"{moved.count(False)} of {len(moved)} parameters did not move"
    assert any(param is model.backbone.conv1.weight and grad is not None
               for param, _, grad in run.before)
    networks = [model] + ([run.result["target"]] if "target" in run.result else [])
    for network in networks:
        for key, tensor in list(network.named_parameters()) + list(network.named_buffers()):
            assert not tensor.is_floating_point() or tensor.dtype == torch.float32, key
    for key, param in model.named_parameters():
        assert param.dim() != 4 or param.is_contiguous(memory_format=torch.channels_last), key
    state = run.checkpoints[-1]
    kept = tensors_in([state["model"], state.get("target"), state["optimizer"]["state"],
                       state.get("queue")])
    assert all(tensor.dtype == torch.float32 for tensor in kept if tensor.is_floating_point())

    # The same step in float32 (same seed: same weights, same views). bf16 keeps 8 significant
    # bits, and BatchNorm over the 8 values per channel of a 1 x 1 map amplifies that: measured gaps
    # up to 0.06 (1.5 %; DenseSiam at 16 px, whose -cos terms sit near 0, was 0.09 off, hence 32 px
    # there). A loss of other values (a view scrambled by channels_last, windows or crops of the
    # wrong place) is further off.
    reference = record_run(name, tmp_path / "fp32", dtype_path=False)
    assert not any(tensor.dtype == BF16 for tensor in tensors_in(reference.loss_inputs[0]))
    torch.testing.assert_close(loss, reference.losses[0], rtol=0.05, atol=0.1)


# --------------------------------------------------------------------------------------------------
# Geometry under autocast


class PretendCuda(torch.Tensor):
    """A CPU tensor that reports is_cuda: runs the CUDA branch of common.crop_resize on a CPU."""

    @property
    def is_cuda(self):
        return True


def test_crop_resize_cuda_branch_samples_exact_positions_under_autocast():
    """DenseSiam's seg forward crops a bf16 feature map under autocast. On CUDA crop_resize builds
    theta and runs affine_grid (a batched matmul inside, which autocast runs in bf16) and
    grid_sample: bf16 there moves the sampling points. A narrow crop near the right edge of a
    64-wide map, where bf16 coordinates are coarsest (steps of 2^-8 of the half-width, 0.125
    cells). Output column j of box (x0, x1) samples x = x0 + (j + 0.5) / S * (x1 - x0), the cell
    coordinate x * W - 0.5 (columns reversed when flipped). The map's value at column c is c - 56
    (integers: exact in bf16), so a sample reads its position minus 56, a small number: the bf16
    result rounds it by at most 2^-8 of itself, far less than a moved point would change it."""
    size, out_size, centre = 64, 8, 56
    ramp = (torch.arange(size, dtype=torch.float32) - centre).expand(2, 1, size, size).to(BF16)
    boxes = torch.tensor([[0.83, 0.1, 0.93, 0.9], [0.851, 0.2, 0.947, 0.7]])
    flips = torch.tensor([False, True])
    with torch.autocast("cpu", dtype=BF16):
        out = common.crop_resize(ramp.as_subclass(PretendCuda), boxes, flips, out_size)
    sampled = out.as_subclass(torch.Tensor).double()[:, 0]                  # B x S x S
    column = (torch.arange(out_size, dtype=torch.float64) + 0.5) / out_size
    x0, x1 = boxes[:, 0:1].double(), boxes[:, 2:3].double()
    cells = (x0 + column * (x1 - x0)) * size - 0.5                         # B x S
    cells[1] = cells[1].flip(0)
    expected = (cells - centre)[:, None, :].expand(-1, out_size, -1)
    error = (sampled - expected).abs()
    assert (error <= expected.abs() * 2.0 ** -8 + 1e-4).all(), f"off by {error.max():.3f} cells"


@pytest.mark.parametrize("enclosing_autocast", [False, True])
def test_dense_match_picks_the_float64_argmax_of_bf16_maps(enclosing_autocast):
    """DenseBYOL / Ladder-DenseBYOL match bf16 projections. Near-ties (the best keys ~4e-4 cosine
    apart, where bf16 resolves 2^-8 near 1) must still go to the key float64 finds best."""
    generator = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(2, 8, 1, generator=generator), dim=1)
    query = base.expand(2, 8, 9).reshape(2, 8, 3, 3).to(BF16)
    key = (base + 0.03 * torch.randn(2, 8, 9, generator=generator)).reshape(2, 8, 3, 3).to(BF16)
    cosine = torch.einsum("bcq,bck->bqk", F.normalize(query.flatten(2).double(), dim=1),
                          F.normalize(key.flatten(2).double(), dim=1))
    with torch.autocast("cpu", dtype=BF16, enabled=enclosing_autocast):
        matches = common.dense_match(query, key)
    assert torch.equal(matches, cosine.argmax(dim=2))


# --------------------------------------------------------------------------------------------------
# On CUDA: no step between two log points waits for the GPU


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs CUDA (torch.cuda.set_sync_debug_mode)")
@pytest.mark.parametrize("name", list(CASES))
def test_steps_between_log_points_never_wait_for_the_gpu(name, tmp_path, monkeypatch):
    """The loops read values back to the host only every log_every steps (loss check, stop signal,
    images/s). Here a run logs every 4 steps, and its second to fourth steps (up to the loss check
    after the fourth) run under torch.cuda.set_sync_debug_mode("error"): .item(), a device-to-host
    copy, nonzero or a copy from pageable host memory there raises. The first step is left out
    (lazy initialisation, cuDNN autotuning)."""
    module, train_name, _, make_config = CASES[name]
    cfg = dataclasses.replace(make_config(), out=str(tmp_path), device="cuda", synthetic_size=48,
                              log_every=4, stop_after=4)
    step_generator, check_finite = common.step_generator, common.check_finite

    def strict_from_step_1(device, seed, rank, step):  # called at the top of every step
        torch.cuda.set_sync_debug_mode("error" if step >= 1 else "default")
        return step_generator(device, seed, rank, step)

    def lenient_from_the_loss_check(*args, **kwargs):  # the first read-back of a log point
        torch.cuda.set_sync_debug_mode("default")
        return check_finite(*args, **kwargs)

    monkeypatch.setattr(common, "step_generator", strict_from_step_1)
    monkeypatch.setattr(common, "check_finite", lenient_from_the_loss_check)
    try:
        result = getattr(module, train_name)(cfg, common.setup_distributed("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert result["step"] == 4
