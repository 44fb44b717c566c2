"""Tests for lewel.py: cross-checks C1-C5 against the official code (LayneH/LEWEL) and invariants.

C1: aligned pooling (models/lewel.py ObjectNeck.forward); C2: the loss (LEWELB_EMAN.loss_func);
C3: the coupled head's shared BN statistics; C4: the EMA schedule (LEWELB_EMAN.momentum_update);
C5: LARS (utils/LARS.py). The C1, C2 and C5 numbers are the official functions' outputs on the
inputs given in each test. Then: maps, LEWEL_M losses and queue, model shapes, EMAN, 2-process
runs, and train() itself (the EMAN target's mode, the LEWEL_M queue order)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import common
import lewel
from ddp_runner import final_state


# --------------------------------------------------------------------------------------------------
# C1-C4: heads, maps, loss, EMA schedule


def test_c1_aligned_pooling_matches_official_numbers():
    """C1: seed 0, x = randn(2,16,3,3), projector output Zfix = randn(2,8,10) (slot 0 = pooled),
    G = 4, scale 1."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 3, 3)
    projector_output = torch.randn(2, 8, 10)                       # B x d x (1+HW)
    z_global, heatmaps = projector_output[:, :, 0], projector_output[:, :, 1:]
    maps = lewel.alignment_maps(heatmaps, scale=1.0)
    # B x d/G x C; the official layout is B x C x d/G
    aligned = lewel.aligned_pooling(x.flatten(2), maps, groups=4)
    official_layout = aligned.transpose(1, 2)
    assert z_global.unsqueeze(-1).shape == (2, 8, 1)
    assert z_global.sum().item() == pytest.approx(2.717245, abs=1e-5)
    assert official_layout.shape == (2, 16, 2)
    assert official_layout.sum().item() == pytest.approx(0.680302, abs=1e-5)
    assert official_layout[0, :, 0].sum().item() == pytest.approx(0.274494, abs=1e-5)
    assert official_layout[1, 5, 1].item() == pytest.approx(-0.138627, abs=1e-5)


def test_c1_coupled_projection_splits_global_slot_and_heatmaps():
    """With an identity projector the coupled head returns GAP(F) in slot 0 and the raw pixels as
    heat-maps."""
    torch.manual_seed(0)
    features = torch.randn(2, 16, 3, 3)
    z_global, heatmaps = lewel.coupled_projection(nn.Identity(), features)
    torch.testing.assert_close(z_global, features.mean(dim=(2, 3)))
    torch.testing.assert_close(heatmaps, features.flatten(2))


def test_c2_loss_with_identity_predictors():
    """C2: seed 1; zo, oo, zt, ot; one direction (beta = 0.5) = 2.222403, global part alone =
    2.415056."""
    torch.manual_seed(1)
    zo, oo, zt, ot = (torch.randn(4, 8, 1), torch.randn(4, 8, 6), torch.randn(4, 8, 1),
                      torch.randn(4, 8, 6))
    # official layout B x channels x K -> ours B x K x channels
    loss, global_only = (lewel.lewel_b_direction(zo[:, :, 0], zt[:, :, 0], oo.transpose(1, 2),
                                                 ot.transpose(1, 2), beta) for beta in (0.5, 0.0))
    assert loss.item() == pytest.approx(2.222403, abs=1e-5)
    assert global_only.item() == pytest.approx(2.415056, abs=1e-5)


def test_c3_coupled_bn_differs_from_projecting_pooled_vector_alone():
    """C3: BN statistics over batch x (1+HW) make the coupled global embedding differ from
    g(GAP(F))."""
    torch.manual_seed(0)
    projector = common.mlp(16, 32, 8).train()
    features = torch.randn(4, 16, 3, 3)
    z_coupled, heatmaps = lewel.coupled_projection(projector, features)
    z_alone = projector(features.mean(dim=(2, 3)))
    assert heatmaps.shape == (4, 8, 9)
    assert (z_coupled - z_alone).abs().max().item() > 1e-2
    # and it is exactly one projector call on the (1+HW) rows of every image
    # B x C x (1+HW)
    rows = torch.cat([features.mean(dim=(2, 3)).unsqueeze(2), features.flatten(2)], dim=2)
    joint = projector(rows.transpose(1, 2).reshape(-1, 16)).view(4, 10, 8)
    torch.testing.assert_close(z_coupled, joint[:, 0])
    torch.testing.assert_close(heatmaps, joint[:, 1:].transpose(1, 2))
    # in eval mode (running statistics) the two agree: the difference is purely the shared batch
    # statistics
    projector.eval()
    z_coupled_eval, _ = lewel.coupled_projection(projector, features)
    torch.testing.assert_close(z_coupled_eval, projector(features.mean(dim=(2, 3))))


def test_c4_ema_schedule():
    """C4: tau_base 0.98 over 1000 iterations: 0.98, 0.99, 1.0."""
    assert common.cosine_tau(0, 1000, 0.98) == pytest.approx(0.98, abs=1e-12)
    assert common.cosine_tau(500, 1000, 0.98) == pytest.approx(0.99, abs=1e-12)
    assert common.cosine_tau(1000, 1000, 0.98) == pytest.approx(1.0, abs=1e-12)


def test_alignment_maps_sum_to_one_over_space():
    torch.manual_seed(0)
    maps = lewel.alignment_maps(torch.randn(3, 8, 25), scale=0.5)
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.sum(dim=2), torch.ones(3, 8))


def test_alignment_maps_are_at_most_as_sharp_as_the_logit_bound_allows():
    """Logits are l2-normalised: the sharpest map (+1 at one position, -1 elsewhere) is
    e / (e + (HW - 1) / e)."""
    for positions, bound in ((4, 0.7112), (49, 0.1334)):
        heatmaps = -torch.ones(1, 1, positions)  # d = 1: each pixel's normalised vector is +-1
        heatmaps[0, 0, 0] = 1.0
        maps = lewel.alignment_maps(heatmaps, scale=1.0)
        assert maps.max().item() == pytest.approx(math.e / (math.e + (positions - 1) / math.e),
                                                  abs=1e-6)
        assert maps.max().item() == pytest.approx(bound, abs=1e-4)


def test_uniform_maps_give_global_average_pooling():
    """Remark after Eq. 1: W = 1/(HW) everywhere makes every aligned representation the GAP of F."""
    torch.manual_seed(0)
    pixels = torch.randn(2, 16, 12)
    maps = lewel.alignment_maps(torch.zeros(2, 8, 12), scale=1.0)  # constant logits: uniform
    aligned = lewel.aligned_pooling(pixels, maps, groups=4)        # B x 2 x 16
    for k in range(aligned.shape[1]):
        torch.testing.assert_close(aligned[:, k], pixels.mean(dim=2))


def test_one_hot_maps_select_pixels_per_group():
    """Each channel group is pooled with its own map: one-hot maps pick one pixel per group (Eq. 2
    grouping)."""
    torch.manual_seed(0)
    pixels = torch.randn(1, 8, 5)                                   # C = 8, G = 2: 4 per group
    maps = torch.zeros(1, 4, 5)                                     # d = 4 -> d/G = 2 embeddings
    # group 0: maps 0,1; group 1: maps 2,3
    maps[0, 0, 1] = maps[0, 1, 3] = maps[0, 2, 0] = maps[0, 3, 4] = 1
    aligned = lewel.aligned_pooling(pixels, maps, groups=2)
    torch.testing.assert_close(aligned[0, 0], torch.cat([pixels[0, :4, 1], pixels[0, 4:, 0]]))
    torch.testing.assert_close(aligned[0, 1], torch.cat([pixels[0, :4, 3], pixels[0, 4:, 4]]))


# --------------------------------------------------------------------------------------------------
# C5: LARS. common.LARS is the optax form; LEWEL ships the OpenSelfSup form (LayneH/LEWEL
# utils/LARS.py; excluded groups from main.py `collect_params`). Reference below, from that rule:
# local = eta ||w|| / (||g|| + wd ||w||); d = (g + wd w) local lr; buf = mu buf + d; w -= buf.


def openselfsup_lars_step(groups, lr, states, momentum=0.9, eta=1e-3):
    with torch.no_grad():
        for group in groups:
            for param in group["params"]:
                grad, wd = param.grad, group["weight_decay"]
                local = (1.0 if group["lars_exclude"]
                         else eta * param.norm() / (grad.norm() + wd * param.norm()))
                step = (grad + wd * param) * local * lr                  # lr sits inside the buffer
                if param in states:
                    states[param].mul_(momentum).add_(step)
                else:
                    states[param] = step.clone()
                param.sub_(states[param])


def c5_tensors():
    torch.manual_seed(2)
    p, p_grad, q, q_grad = torch.randn(4, 4), torch.randn(4, 4), torch.randn(4), torch.randn(4)
    return p, p_grad, q, q_grad


def test_c5_reference_lars_reproduces_official_numbers():
    p0, p_grad, q0, q_grad = c5_tensors()
    p, q = p0.clone(), q0.clone()
    p.grad, q.grad = p_grad, q_grad
    openselfsup_lars_step([dict(params=[q], weight_decay=0.0, lars_exclude=True),
                           dict(params=[p], weight_decay=1.5e-6, lars_exclude=False)],
                          lr=3.6, states={})
    assert (p - p0).sum().item() == pytest.approx(-0.0171396, abs=1e-7)
    assert (q - q0).sum().item() == pytest.approx(9.649386, abs=1e-5)
    assert (q - q0).sum().item() == pytest.approx(-3.6 * q_grad.sum().item(), abs=1e-5)


def run_common_lars(lrs, form="optax"):
    p0, p_grad, q0, q_grad = c5_tensors()
    p, q = p0.clone().requires_grad_(), q0.clone().requires_grad_()
    optimizer = common.LARS([dict(params=[q], weight_decay=0.0, lars=False),
                             dict(params=[p], weight_decay=1.5e-6, lars=True)],
                            lr=lrs[0], form=form)
    for lr in lrs:
        for group in optimizer.param_groups:
            group["lr"] = lr
        # the same gradient every step: isolates the update rule
        p.grad, q.grad = p_grad.clone(), q_grad.clone()
        optimizer.step()
    return p.detach() - p0, q.detach() - q0


def run_reference_lars(lrs):
    p0, p_grad, q0, q_grad = c5_tensors()
    p, q, states = p0.clone(), q0.clone(), {}
    for lr in lrs:
        p.grad, q.grad = p_grad.clone(), q_grad.clone()
        openselfsup_lars_step([dict(params=[q], weight_decay=0.0, lars_exclude=True),
                               dict(params=[p], weight_decay=1.5e-6, lars_exclude=False)],
                              lr=lr, states=states)
    return p - p0, q - q0


def test_c5_common_lars_matches_one_official_step():
    """One step: optax trust ratio eta||w||/||g + wd w|| vs eta||w||/(||g|| + wd||w||) agree to
    ~1e-6 relative."""
    dp, dq = run_common_lars([3.6])
    assert dp.sum().item() == pytest.approx(-0.0171396, abs=2e-7)
    assert dq.sum().item() == pytest.approx(9.649386, abs=1e-5)
    ref_dp, ref_dq = run_reference_lars([3.6])
    torch.testing.assert_close(dp, ref_dp, rtol=0, atol=1e-7)  # float32 rounding of p - p0 is ~1e-7
    torch.testing.assert_close(dq, ref_dq)


def test_c5_conventions_agree_at_constant_lr_and_differ_when_lr_changes():
    """optax keeps lr outside the momentum buffer, OpenSelfSup inside: equal at constant lr, not
    during warmup.

    With the same gradient u at steps of lr 1.8 then 3.6 (warmup doubling), the optax form applies
    the momentum of step 1 with the *new* lr. Two-step displacement: optax
    (lr1 + (1 + mu) lr2) u = 8.64 u, OpenSelfSup ((1 + mu) lr1 + lr2) u = 7.02 u, so optax moves
    +23.1 % further (+31 % on the second step alone).
    """
    dp, dq = run_common_lars([3.6, 3.6, 3.6])
    ref_dp, ref_dq = run_reference_lars([3.6, 3.6, 3.6])
    torch.testing.assert_close(dp, ref_dp, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(dq, ref_dq, rtol=1e-5, atol=1e-5)
    dp, dq = run_common_lars([1.8, 3.6])
    ref_dp, ref_dq = run_reference_lars([1.8, 3.6])
    # (lr1 + (1 + mu) lr2) / ((1 + mu) lr1 + lr2) - 1
    expected = (1.8 + 1.9 * 3.6) / (1.9 * 1.8 + 3.6) - 1
    assert expected == pytest.approx(0.2308, abs=1e-4)
    torch.testing.assert_close(dq.sum() / ref_dq.sum() - 1, torch.tensor(expected),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(dp.sum() / ref_dp.sum() - 1, torch.tensor(expected),
                               atol=1e-3, rtol=0)


# --------------------------------------------------------------------------------------------------
# LEWEL_M pieces: InfoNCE, in-batch aligned InfoNCE, the queue


def test_info_nce_matches_manual_formula():
    torch.manual_seed(0)
    query, key, negatives = (torch.randn(3, 8), torch.randn(3, 8),
                             F.normalize(torch.randn(5, 8), dim=1))
    loss = lewel.info_nce(query, key, negatives, tau=0.2)
    q, k = F.normalize(query, dim=1), F.normalize(key, dim=1)
    manual = []
    for i in range(3):
        positive = torch.exp(q[i] @ k[i] / 0.2)
        negative = torch.exp(q[i] @ negatives.t() / 0.2).sum()
        manual.append(-torch.log(positive / (positive + negative)))
    torch.testing.assert_close(loss, torch.stack(manual).mean())


def test_aligned_info_nce_uses_same_index_in_batch_negatives():
    torch.manual_seed(0)
    batch, count, dim, first = 3, 2, 8, 3                        # this rank: global rows 3..5 of 6
    query, keys = torch.randn(batch, count, dim), torch.randn(2 * batch, count, dim)
    loss = lewel.aligned_info_nce(query, keys, first_index=first, tau=0.2)
    q, k = F.normalize(query, dim=2), F.normalize(keys, dim=2)
    manual = []
    for i in range(batch):
        for j in range(count):
            logits = k[:, j] @ q[i, j] / 0.2                      # all 6 images, embedding j only
            manual.append(-F.log_softmax(logits, dim=0)[first + i])
    torch.testing.assert_close(loss, torch.stack(manual).mean())


def test_queue_is_fifo_with_wraparound():
    queue = lewel.KeyQueue(size=6, dim=4, seed=0)
    initial = queue.keys.clone()
    batches = [F.normalize(torch.randn(4, 4), dim=1) for _ in range(2)]
    queue.enqueue(batches[0])
    torch.testing.assert_close(queue.keys[:4], batches[0])
    torch.testing.assert_close(queue.keys[4:], initial[4:])     # not yet overwritten
    assert queue.pointer.item() == 4
    queue.enqueue(batches[1])                                   # rows 4, 5, then wraps to 0, 1
    torch.testing.assert_close(queue.keys[4:], batches[1][:2])
    torch.testing.assert_close(queue.keys[:2], batches[1][2:])
    torch.testing.assert_close(queue.keys[2:4], batches[0][2:])  # the oldest surviving rows
    assert queue.pointer.item() == 2 and queue.keys.shape == (6, 4)


def test_lewel_m_loss_never_uses_current_keys_as_negatives():
    """The loop passes the queue as it was *before* this step; this step's keys are enqueued after
    the update."""
    torch.manual_seed(0)
    batch, count, dim = 4, 2, 8
    queue = lewel.KeyQueue(size=16, dim=dim, seed=0)
    embeddings = [(torch.randn(batch, dim), torch.randn(batch, count, dim)) for _ in range(2)]
    keys = [(torch.randn(batch, dim), torch.randn(batch, count, dim)) for _ in range(2)]
    negatives = queue.keys.clone()
    loss = lewel.lewel_m_loss(embeddings, keys, negatives, first_index=0, beta=0.5, tau=0.2)
    # manual: queue negatives only, view 1 against view 2's keys and vice versa
    manual = 0.0
    for (query, query_aligned), (key, key_aligned) in zip(embeddings, reversed(keys)):
        manual += 0.5 * lewel.info_nce(query, key, negatives, 0.2) + 0.5 * lewel.aligned_info_nce(
            query_aligned, key_aligned, 0, 0.2)
    torch.testing.assert_close(loss, manual)
    current = F.normalize(torch.cat([key for key, _ in keys]), dim=1)
    assert (current @ negatives.t()).max() < 0.999        # no current key among the negatives
    queue.enqueue(torch.cat([key for key, _ in keys]))     # what the loop does after the step
    torch.testing.assert_close(queue.keys[:2 * batch], current)
    # enqueueing first would have made every key its own negative and changed the loss
    wrong = lewel.lewel_m_loss(embeddings, keys, queue.keys.clone(), first_index=0, beta=0.5,
                               tau=0.2)
    assert (wrong - loss).abs() > 1e-3


def tiny_config(**changes):
    base = dict(arch="resnet18", image_size=40, hidden_dim=64, proj_dim=32, groups=4)
    base.update(changes)
    return lewel.Config(**base)


def test_model_shapes_and_initial_loss_near_four():
    """C5 training-level check: at initialisation the symmetric LEWEL_B loss is ~4 (released log:
    3.9743)."""
    torch.manual_seed(0)
    cfg = tiny_config(hidden_dim=256, proj_dim=64)  # random cosines shrink like 1/sqrt(width)
    model = lewel.LEWEL(cfg)
    target = common.make_target({"backbone": model.backbone, "projector": model.projector,
                                 "aligned_projector": model.aligned_projector})
    views = [torch.randn(8, 3, 40, 40) for _ in range(2)]
    predictions = model(views)
    with torch.no_grad():
        targets = [lewel.embed(target, view, cfg.groups, cfg.scale) for view in views]
    # d/h = 16 embeddings
    assert predictions[0][0].shape == (8, 64) and predictions[0][1].shape == (8, 16, 64)
    assert targets[0][0].shape == (8, 64) and targets[0][1].shape == (8, 16, 64)
    loss = lewel.lewel_b_loss(predictions, targets, cfg.beta)
    assert abs(loss.item() - 4) < 0.25  # measured 3.965
    loss.backward()
    assert model.backbone.conv1.weight.grad.abs().sum() > 0
    assert all(param.grad is not None for param in model.parameters())


def test_eman_target_averages_bn_buffers_and_runs_in_eval_mode():
    """EMAN (LayneH/LEWEL models/lewel.py LEWELB_EMAN.momentum_update): EMA over parameters AND BN
    running stats; num_batches_tracked copied."""
    torch.manual_seed(0)
    model = lewel.LEWEL(tiny_config())
    target = common.make_target({"backbone": model.backbone, "projector": model.projector,
                                 "aligned_projector": model.aligned_projector})
    target.train(False)
    pairs = common.ema_pairs(target, model, buffers=True)
    old_mean = target.projector[1].running_mean.clone()
    model([torch.randn(4, 3, 40, 40)])  # an online train-mode forward moves its BN stats
    new_mean = model.projector[1].running_mean.clone()
    common.ema_update(pairs, 0.98)
    torch.testing.assert_close(target.projector[1].running_mean, 0.98 * old_mean + 0.02 * new_mean)
    assert (target.projector[1].num_batches_tracked.item()
            == model.projector[1].num_batches_tracked.item() == 1)
    # eval mode: the target's embedding of one image does not depend on the rest of the batch
    images = torch.randn(4, 3, 40, 40)
    with torch.no_grad():
        alone = lewel.embed(target, images[:1], 4, 1.0)[0]
        in_batch = lewel.embed(target, images, 4, 1.0)[0][:1]
    torch.testing.assert_close(alone, in_batch, rtol=1e-4, atol=1e-5)


def test_config_checks_reject_bad_groups_and_small_queue():
    with pytest.raises(common.InputError, match="--groups"):
        lewel.check_config(tiny_config(groups=3), world_size=1)
    with pytest.raises(common.InputError, match="--queue-size"):
        lewel.check_config(tiny_config(variant="moco", queue_size=16, batch_size=16), world_size=1)
    lewel.check_config(tiny_config(), world_size=1)
    preset = common.parse_config(lewel.Config, lewel.PRESETS, ["--preset", "moco"])
    assert ((preset.variant, preset.hidden_dim, preset.proj_dim, preset.weight_decay)
            == ("moco", 2048, 128, 1e-4))


# --------------------------------------------------------------------------------------------------
# 2-process torchrun on CPU: shuffle-BN bookkeeping, then a few LEWEL_B and LEWEL_M steps


DRIVER = r'''
import json, sys, torch
import common, lewel
out = sys.argv[1]
dist = common.setup_distributed("cpu")
# shuffle-BN bookkeeping: with an eval-mode (batch-independent) encoder the shuffled keys equal the
# plain ones
torch.manual_seed(0)
cfg = lewel.Config(image_size=40, hidden_dim=32, proj_dim=16)
encoder = lewel.LEWEL(cfg).eval()
views = [torch.randn(4, 3, 40, 40, generator=torch.Generator().manual_seed(10 * dist.rank + v))
         for v in range(2)]
encode = lambda vs: [lewel.embed(encoder, v, cfg.groups, cfg.scale) for v in vs]
with torch.no_grad():
    shuffled = lewel.shuffled_key_forward(encode, views, dist, seed=3)
    plain = encode([common.all_gather_nograd(v) for v in views])
error = max((a - b).abs().max().item() for s, p in zip(shuffled, plain) for a, b in zip(s, p))
if dist.is_main:
    json.dump(dict(shuffle_error=error, rows=shuffled[0][0].shape[0]),
              open(out + "/shuffle.json", "w"))
# main() = parse + check + train + destroy the process group; one launch cannot re-create the
# group, so call train()
tiny = ["--synthetic-size", "64", "--batch-size", "8", "--epochs", "1", "--image-size", "40",
        "--hidden-dim", "32", "--proj-dim", "16", "--knn-every", "0", "--log-every", "1",
        "--stop-after", "2"]
for argv in (tiny + ["--out", out + "/b"],
             ["--preset", "moco"] + tiny + ["--queue-size", "64", "--out", out + "/m"]):
    cfg = common.parse_config(lewel.Config, lewel.PRESETS, argv)
    lewel.check_config(cfg, dist.world_size)
    lewel.train(cfg, dist)
common.cleanup_distributed()
'''


def test_torchrun_two_processes_both_variants(tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    # own session: if a rank fails, its peer can sit in a collective with SIGTERM caught
    # (common.StopSignal), and torchrun exits without it; kill the whole group so no orphan
    # keeps a CPU
    command = [torchrun, "--standalone", "--nproc_per_node=2", str(driver), str(tmp_path)]
    process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=300)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert process.returncode == 0, stderr[-3000:]
    shuffle = json.loads((tmp_path / "shuffle.json").read_text())
    assert shuffle["rows"] == 8 and shuffle["shuffle_error"] < 1e-5
    for variant in ("b", "m"):
        records = [json.loads(line)
                   for line in (tmp_path / variant / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in records if "loss" in r]
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
        state = torch.load(tmp_path / variant / "last.pt", map_location="cpu", weights_only=True)
        assert state["step"] == 2 and state["world_size"] == 2
    state = torch.load(tmp_path / "m" / "last.pt", map_location="cpu", weights_only=True)
    assert state["config"]["variant"] == "moco"
    # 2 steps x 2 views x global batch 8
    assert state["queue"]["pointer"].item() == 2 * 2 * 8 % 64


def test_c5_openselfsup_form_matches_the_official_rule_while_lr_changes():
    """common.LARS(form="openselfsup") (lewel.py's default) is the official rule step for step,
    warmup included."""
    for lrs in ([3.6], [1.8, 3.6], [0.5, 1.0, 2.0, 3.6, 3.0]):
        dp, dq = run_common_lars(lrs, form="openselfsup")
        ref_dp, ref_dq = run_reference_lars(lrs)
        torch.testing.assert_close(dp, ref_dp, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(dq, ref_dq, rtol=1e-6, atol=1e-5)
    with pytest.raises(common.InputError, match="--lars-form"):
        common.LARS([torch.zeros(1, requires_grad=True)], lr=1.0, form="sgd")


# --------------------------------------------------------------------------------------------------
# train() itself: the EMAN target's mode and the LEWEL_M queue order, through short real runs


TINY_RUN = ["--synthetic-size", "16", "--batch-size", "4", "--epochs", "1", "--image-size", "40",
            "--hidden-dim", "32", "--proj-dim", "16", "--knn-every", "0", "--log-every", "1",
            "--device", "cpu"]


@pytest.mark.parametrize("eman", [True, False])
def test_train_runs_the_eman_target_in_eval_mode(tmp_path, monkeypatch, eman):
    """EMAN (official LEWELB_EMAN, main.py `train`: target_net.eval()): every target forward inside
    train() runs with all of the target's modules in eval mode; without EMAN (LEWELB) in train mode.
    The online network always trains."""
    modes = {"online": set(), "target": set()}
    real_embed = lewel.embed

    def recording_embed(net, view, groups, scale):
        role = "online" if isinstance(net, lewel.LEWEL) else "target"
        modes[role].update(module.training for module in net.modules())
        return real_embed(net, view, groups, scale)

    monkeypatch.setattr(lewel, "embed", recording_embed)
    flag = "--eman" if eman else "--no-eman"
    lewel.main(TINY_RUN + [flag, "--stop-after", "1", "--out", str(tmp_path)])
    assert modes["online"] == {True}
    assert modes["target"] == ({False} if eman else {True})


def test_train_updates_the_lewel_m_queue_only_after_the_loss_and_the_step(tmp_path, monkeypatch):
    """LEWEL_M in train(): each step's loss sees the queue as it was before the step (its own keys
    are not among its negatives); the step's keys are enqueued after loss, backward and optimizer
    step (MoCo's order, also DenseCL's `forward_train`)."""
    events = []
    real_loss, real_enqueue = lewel.lewel_m_loss, lewel.KeyQueue.enqueue
    real_step = torch.optim.SGD.step

    def recording_loss(embeddings, keys, negatives, first_index, beta, tau):
        events.append(("loss", negatives.clone(), torch.cat([key for key, _ in keys]).clone()))
        return real_loss(embeddings, keys, negatives, first_index, beta, tau)

    def recording_enqueue(queue, keys):
        before = queue.keys.clone()
        real_enqueue(queue, keys)
        events.append(("enqueue", before, queue.keys.clone()))

    def recording_step(optimizer, *args, **kwargs):
        events.append(("step",))
        return real_step(optimizer, *args, **kwargs)

    monkeypatch.setattr(lewel, "lewel_m_loss", recording_loss)
    monkeypatch.setattr(lewel.KeyQueue, "enqueue", recording_enqueue)
    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    lewel.main(["--preset", "moco"] + TINY_RUN + ["--queue-size", "64", "--stop-after", "2",
                                                  "--out", str(tmp_path)])
    assert [event[0] for event in events] == ["loss", "step", "enqueue"] * 2
    first_loss, _, first_enqueue, second_loss, _, second_enqueue = events
    torch.testing.assert_close(first_loss[1], first_enqueue[1])   # step 1: queue before its keys
    torch.testing.assert_close(second_loss[1], first_enqueue[2])  # step 2: with step 1's keys
    torch.testing.assert_close(second_enqueue[1], first_enqueue[2])
    for loss_event, enqueue_event in ((first_loss, first_enqueue), (second_loss, second_enqueue)):
        _, negatives, keys = loss_event
        queue_after = enqueue_event[2]
        keys = F.normalize(keys, dim=1)                     # 2 views x global batch 4 = 8 keys
        assert (keys @ negatives.t()).max() < 0.999         # no key of the step is its own negative
        assert (keys @ queue_after.t()).max(dim=1).values.min() > 0.999  # ... each is in it after


def test_lewel_m_resume_reaches_the_same_state_bitwise(tmp_path):
    """Stopped after 3 of 6 steps and resumed: the same online and target weights, optimizer state
    and LEWEL_M key queue (contents and pointer) as a straight run."""
    args = ["--preset", "moco", "--synthetic-size", "48", "--batch-size", "8", "--epochs", "1",
            "--knn-every", "0", "--log-every", "1", "--device", "cpu", "--image-size", "40",
            "--hidden-dim", "32", "--proj-dim", "16", "--queue-size", "64"]
    lewel.main(args + ["--out", str(tmp_path / "straight")])
    lewel.main(args + ["--out", str(tmp_path / "resumed"), "--stop-after", "3"])
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["step"] == 3
    lewel.main(args + ["--out", str(tmp_path / "resumed"), "--resume"])
    (step, straight), (resumed_step, resumed) = (final_state(tmp_path / run / "last.pt")
                                                 for run in ("straight", "resumed"))
    assert step == resumed_step == 6 and straight.keys() == resumed.keys()
    assert any(name.startswith("queue.") for name in straight)
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
