"""ladder_byol.py: Eq. 4-6 weights, analytic checks L1-L3 (below), equivalence with BYOL at zero
intermediate weights, gradient flow per rung, Ladder-DenseBYOL (both readings of a dense rung, by
hand), DDP on CPU, resume, bad flags.

L1: equal stage losses L give 1.4375 L; L2: each rung's loss reaches its own head and the stages
below; L3: the intermediate heads' input widths are ResNet-50's stage widths (Sec. 4.1)."""

import json

import pytest
import torch

import byol
import common
import ladder_byol
from ddp_runner import assert_same_parameters, run_two_processes

TINY = ["--synthetic-size", "32", "--image-size", "32", "--batch-size", "8", "--hidden-dim", "32",
        "--proj-dim", "16", "--dense-hidden-dim", "16", "--epochs", "1", "--knn-every", "0",
        "--log-every", "1"]


def config(*args):
    return common.parse_config(ladder_byol.Config, ladder_byol.PRESETS, list(TINY) + list(args))


def build(cfg, seed=0):
    torch.manual_seed(seed)
    model = ladder_byol.LadderBYOL(cfg)
    heads = torch.nn.ModuleDict({s: h.target_modules() for s, h in model.heads.items()})
    target = common.make_target({"backbone": model.backbone, "heads": heads})
    return model, target


def views(seed=1, batch=4, size=32):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=generator) for _ in range(2)]


def forward_loss(cfg, model, target, pair):
    predictions = model(pair)
    with torch.no_grad():
        targets = [ladder_byol.embed(target, view, cfg.match_on) for view in pair]
    return ladder_byol.ladder_loss(predictions, targets, ladder_byol.stage_weights(cfg),
                                   cfg.dense_weight)


# --- Eq. 6 and Table 6 weights --------------------------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    ([], [1 / 16, 1 / 8, 1 / 4, 1]),                             # paper default (Sec. 4.1), w = 1/2
    (["--w", "0.25"], [1 / 32, 1 / 16, 1 / 8, 1]),               # Table 6 rows
    (["--w", "1"], [1 / 8, 1 / 4, 1 / 2, 1]),
    (["--weights", "1/8,1/8,1/8,1"], [1 / 8, 1 / 8, 1 / 8, 1]),
    (["--weights", "0,0,0,1"], [0, 0, 0, 1]),                    # BYOL
])
def test_stage_weights_follow_eq6_and_table6(args, expected):
    weights = ladder_byol.stage_weights(config(*args))
    assert list(weights) == ["res2", "res3", "res4", "res5"]
    assert list(weights.values()) == pytest.approx(expected)


def test_L1_equal_stage_losses_give_1_4375_L():
    """L1: every stage loss equal to L -> total = L (1 + 1/4 + 1/8 + 1/16) = 1.4375 L with the
    default weights."""
    generator = torch.Generator().manual_seed(0)
    p, z = torch.randn(2, 4, 8, generator=generator), torch.randn(2, 4, 8, generator=generator)
    predictions = [{s: {"global": p[i]} for s in common.STAGES} for i in range(2)]
    targets = [{s: {"global": z[i]} for s in common.STAGES} for i in range(2)]
    total, stage_losses, _ = ladder_byol.ladder_loss(predictions, targets,
                                                     ladder_byol.stage_weights(config()), 0.5)
    single = common.regression_loss(p[0], z[1]) + common.regression_loss(p[1], z[0])
    assert all(torch.allclose(loss, single) for loss in stage_losses.values())
    assert total.item() == pytest.approx(1.4375 * single.item(), rel=1e-6)


def test_L3_intermediate_projector_inputs_match_resnet50_stages():
    """L3: pooled res2/res3/res4 of ResNet-50 have 256/512/1024 channels; res5 2048. Dense heads
    too."""
    cfg = config("--arch", "resnet50", "--dense-stages", "res2,res3", "--dense-hidden-dim", "0")
    model = ladder_byol.LadderBYOL(cfg)
    widths = {s: head.projector[0].in_features for s, head in model.heads.items()}
    assert widths == {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}
    dense_in = [model.heads[s].dense_projector[0].in_channels for s in ("res2", "res3")]
    dense_hidden = [model.heads[s].dense_projector[0].out_channels for s in ("res2", "res3")]
    # default hidden width = the stage's channels (DenseCL)
    assert dense_in == dense_hidden == [256, 512]
    assert not hasattr(model.heads["res4"], "dense_projector")


def test_target_mirrors_projectors_only():
    cfg = config("--dense-stages", "res2")
    model, target = build(cfg)
    assert set(target["heads"]["res2"].keys()) == {"projector", "dense_projector"}
    assert set(target["heads"]["res5"].keys()) == {"projector"}
    assert all(not p.requires_grad for p in target.parameters())
    online = dict(model.named_parameters())
    for name, param in target.named_parameters():  # EMA pairs by name; initial target == online
        assert torch.equal(param, online[name]), name


# --- BYOL is the special case w_i = 0 (Sec. 3.2) --------------------------------------------------

def test_zero_intermediate_weights_give_byol_loss_and_gradients():
    cfg = config("--weights", "0,0,0,1")
    model, target = build(cfg)
    assert list(model.heads) == ["res5"]
    byol_model = byol.BYOL(byol.Config(hidden_dim=32, proj_dim=16))
    byol_model.load_state_dict({name.replace("heads.res5.", ""): value
                                for name, value in model.state_dict().items()})
    byol_target = common.make_target({"backbone": byol_model.backbone,
                                      "projector": byol_model.projector})
    pair = views()

    loss, stage_losses, _ = forward_loss(cfg, model, target, pair)
    with torch.no_grad():
        byol_targets = [byol.embed(byol_target, view) for view in pair]
    byol_loss = byol.byol_loss(byol_model(pair), byol_targets)
    assert list(stage_losses) == ["res5"]
    assert loss.item() == pytest.approx(byol_loss.item(), abs=1e-6)
    loss.backward()
    byol_loss.backward()
    byol_grads = {name: p.grad for name, p in byol_model.named_parameters()}
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, byol_grads[name.replace("heads.res5.", "")],
                              atol=1e-6), name


# --- L2: gradient flow ----------------------------------------------------------------------------

LAYER_OF = {"res2": "layer1", "res3": "layer2", "res4": "layer3", "res5": "layer4"}


def has_gradient(module):
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_L2_each_stage_loss_reaches_its_own_head_and_the_stages_below():
    cfg = config("--dense-stages", "res2,res3")
    model, target = build(cfg)
    _, stage_losses, dense_losses = forward_loss(cfg, model, target, views())
    assert set(dense_losses) == {"res2", "res3"}
    for index, stage in enumerate(common.STAGES):
        model.zero_grad(set_to_none=True)
        stage_losses[stage].backward(retain_graph=True)
        for other, head in model.heads.items():
            assert has_gradient(head) == (other == stage), f"head {other} vs loss {stage}"
        for lower_index, lower in enumerate(common.STAGES):
            layer = getattr(model.backbone, LAYER_OF[lower])
            assert has_gradient(layer) == (lower_index <= index), \
                f"backbone {LAYER_OF[lower]} vs loss {stage}"
        assert has_gradient(model.backbone.conv1)
        if stage in dense_losses:
            assert has_gradient(model.heads[stage].dense_predictor)
            assert has_gradient(model.heads[stage].dense_projector)
    assert all(p.grad is None for p in target.parameters())


def test_L2_with_res5_loss_detached_lower_blocks_still_learn():
    cfg = config()
    model, target = build(cfg)
    _, stage_losses, _ = forward_loss(cfg, model, target, views())
    weights = ladder_byol.stage_weights(cfg)
    total = sum(weights[s] * (loss.detach() if s == "res5" else loss)
                for s, loss in stage_losses.items())
    total.backward()
    assert all(has_gradient(getattr(model.backbone, LAYER_OF[s])) for s in ("res2", "res3", "res4"))
    assert not has_gradient(model.backbone.layer4) and not has_gradient(model.heads["res5"])


# --- Ladder-DenseBYOL -----------------------------------------------------------------------------

def test_dense_stage_loss_averages_global_and_dense():
    cfg = config("--dense-stages", "res2,res3")
    model, target = build(cfg)
    pair = views()
    predictions = model(pair)
    with torch.no_grad():
        targets = [ladder_byol.embed(target, view, cfg.match_on) for view in pair]
    _, stage_losses, dense_losses = ladder_byol.ladder_loss(predictions, targets,
                                                            ladder_byol.stage_weights(cfg), 0.5)
    p1, p2 = predictions
    z1, z2 = targets
    # 32 px, strides 4/8
    assert p1["res2"]["dense"].shape == (4, 16, 8, 8)
    assert p1["res3"]["dense"].shape == (4, 16, 4, 4)
    global_res2 = (common.regression_loss(p1["res2"]["global"], z2["res2"]["global"])
                   + common.regression_loss(p2["res2"]["global"], z1["res2"]["global"]))
    dense_res2 = (common.dense_regression_loss(p1["res2"]["dense"], z2["res2"]["dense"],
                                               p1["res2"]["match"], z2["res2"]["match"])
                  + common.dense_regression_loss(p2["res2"]["dense"], z1["res2"]["dense"],
                                                 p2["res2"]["match"], z1["res2"]["match"]))
    assert dense_losses["res2"].item() == pytest.approx(dense_res2.item(), rel=1e-6)
    assert stage_losses["res2"].item() == pytest.approx(
        0.5 * global_res2.item() + 0.5 * dense_res2.item(), rel=1e-6)
    assert 0 < dense_res2.item() < 8


def test_match_on_backbone_uses_stage_maps():
    cfg = config("--dense-stages", "res3", "--match-on", "backbone")
    model, _ = build(cfg)
    out = ladder_byol.embed(model, views()[0], cfg.match_on)
    assert out["res3"]["match"].shape == (4, model.backbone.channels["res3"], 4, 4)


def test_table5_patterns_are_expressible():
    patterns = {"G G G G": [], "D D G G": ["--dense-stages", "res2,res3"],
                "D D D D": ["--dense-stages", "res2,res3,res4,res5"],
                "- - - G": ["--weights", "0,0,0,1"],
                "- - - D": ["--weights", "0,0,0,1", "--dense-stages", "res5"]}
    for pattern, args in patterns.items():
        model = ladder_byol.LadderBYOL(config(*args))
        got = ["-" if s not in model.heads
               else ("D" if hasattr(model.heads[s], "dense_projector") else "G")
               for s in common.STAGES]
        assert " ".join(got) == pattern


# --- training runs --------------------------------------------------------------------------------

def test_two_process_ddp_ladder_dense_keeps_ranks_identical(tmp_path):
    states = run_two_processes("ladder_byol",
                               TINY + ["--dense-stages", "res2,res3", "--stop-after", "2"],
                               str(tmp_path))
    assert_same_parameters(states)
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert ({"loss_res2", "loss_res3", "loss_res4", "loss_res5", "dense_res2", "dense_res3"}
            <= set(records[-1]))
    assert records[-1]["step"] == 2


def test_resume_refuses_a_checkpoint_with_other_heads(tmp_path, capsys):
    """The shared loop's exact resume is tested in test_byol.py; here: a different ladder must not
    load silently."""
    ladder_byol.main(TINY + ["--device", "cpu", "--out", str(tmp_path), "--dense-stages", "res2",
                             "--stop-after", "1"])
    with pytest.raises(SystemExit) as exit_info:
        ladder_byol.main(TINY + ["--device", "cpu", "--out", str(tmp_path), "--resume"])
    assert exit_info.value.code == 2 and "dense_stages" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--weights", "1,1,1"], "--weights needs 4 values"),
    (["--weights", "a,b,c,d"], "cannot read"),
    (["--weights", "1,1,1,0"], "final res5 loss is always on"),
    (["--weights", "0,1,1,1", "--dense-stages", "res2"], "res2 has loss weight 0"),
    (["--dense-stages", "res6"], "unknown stage 'res6'"),
    (["--match-on", "pixels"], "--match-on must be"),
    (["--dense-hidden-dim", "-1"], "--dense-hidden-dim must be >= 0"),
    (["--dense-mode", "sum"], "--dense-mode must be average or replace"),
    (["--optimizer", "adam"], "--optimizer must be lars or sgd, not 'adam'"),
])
def test_bad_flags(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        ladder_byol.main(["--out", str(tmp_path)] + TINY + args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_predictor_learning_rate_factor_defaults():
    """byol.py's recipes: SGD and 1x on the CPU default, 10x in --preset lars, LARS and 1x in every
    paper preset; every preset names its optimizer."""
    assert (ladder_byol.Config().predictor_lr_mult, ladder_byol.Config().optimizer) == (1.0, "sgd")
    for name, values in ladder_byol.PRESETS.items():
        assert values["optimizer"] == "lars", name
        cfg = common.parse_config(ladder_byol.Config, ladder_byol.PRESETS, ["--preset", name])
        assert cfg.predictor_lr_mult == (10.0 if name == "lars" else 1.0), name
    for field in ("optimizer", "base_lr", "weight_decay", "warmup_epochs", "tau_base",
                  "predictor_lr_mult", "epochs", "batch_size", "crop_min_scale"):
        assert getattr(ladder_byol.Config(), field) == getattr(byol.Config(), field), field
        assert ladder_byol.PRESETS["lars"].get(field) == byol.PRESETS["lars"].get(field), field


def test_cpu_default_trains_with_plain_sgd_and_preset_lars_with_lars(tmp_path):
    """The optimiser the config names is the one that steps: torch's SGD without momentum by
    default, LARS (trust coefficient 1e-3, momentum 0.9) under --preset lars."""
    for name, args in (("sgd", []), ("lars", ["--preset", "lars"])):
        ladder_byol.main(["--out", str(tmp_path / name), "--stop-after", "1"] + TINY + args)
        groups = torch.load(tmp_path / name / "last.pt", weights_only=True)["optimizer"][
            "param_groups"]
        if name == "sgd":
            assert all(g["momentum"] == 0 and "trust_coefficient" not in g for g in groups)
        else:
            assert all(g["momentum"] == 0.9 and g["trust_coefficient"] == 1e-3 for g in groups)


# --- a dense rung by hand: Eq. 5 and Eq. 7 written as loops ---------------------------------------


def hand_regression(p, z):
    """Mean over rows of 2 - 2 cos(p_i, z_i), one row at a time."""
    terms = [2 - 2 * torch.dot(p[i], z[i]) / (p[i].norm() * z[i].norm()) for i in range(len(p))]
    return sum(terms) / len(terms)


def hand_dense(prediction, target, query, key):
    """Eq. 7, one direction: each position of view a regresses the target vector of view b at the
    position whose `key` vector has the highest cosine with its `query` vector.
    Returns (loss, matches)."""
    terms, matches = [], []
    for b in range(prediction.shape[0]):
        pred, tgt = prediction[b].flatten(1), target[b].flatten(1)      # D x HW
        qry, ky = query[b].flatten(1), key[b].flatten(1)                # C x HW
        for i in range(pred.shape[1]):
            j = int(torch.nn.functional.cosine_similarity(qry[:, i:i + 1], ky, dim=0).argmax())
            matches.append(j)
            cos = torch.dot(pred[:, i], tgt[:, j]) / (pred[:, i].norm() * tgt[:, j].norm())
            terms.append(2 - 2 * cos)
    return sum(terms) / len(terms), matches


def hand_rung(model, target, pair, stage):
    """Symmetric global (Eq. 5) and dense (Eq. 7) loss of one rung, from the modules themselves. The
    dense matching compares the online projection y^a = p^conv(z^a) (before the predictor) with the
    target's y'^b. Also returns the matches the online PREDICTION q^conv(y^a) would have picked."""
    head, target_head = model.heads[stage], target["heads"][stage]
    online = [model.backbone(view)[stage] for view in pair]
    offline = [target["backbone"](view)[stage] for view in pair]
    global_loss = dense_loss = 0.0
    by_projection, by_prediction = [], []
    for a, b in ((0, 1), (1, 0)):
        if hasattr(head, "projector"):
            prediction = head.predictor(head.projector(online[a].mean(dim=(2, 3))))
            target_projection = target_head["projector"](offline[b].mean(dim=(2, 3)))
            global_loss = global_loss + hand_regression(prediction, target_projection)
        if hasattr(head, "dense_projector"):
            projection = head.dense_projector(online[a])                     # y^a
            prediction = head.dense_predictor(projection)                    # q^conv(y^a)
            target_projection = target_head["dense_projector"](offline[b])   # y'^b
            loss, matches = hand_dense(prediction, target_projection, projection, target_projection)
            dense_loss = dense_loss + loss
            by_projection += matches
            _, matches = hand_dense(prediction, target_projection, prediction, target_projection)
            by_prediction += matches
    return global_loss, dense_loss, by_projection, by_prediction


def check_rungs_by_hand(cfg, mix_of_dense):
    """Every rung's loss against hand_rung; mix_of_dense(G, D) is what a dense rung should be."""
    model, target = build(cfg)
    pair = views(batch=2)
    total, stage_losses, dense_losses = forward_loss(cfg, model, target, pair)
    with torch.no_grad():
        for stage in common.STAGES:
            global_loss, dense_loss, _, _ = hand_rung(model, target, pair, stage)
            if stage in cfg.dense_stages:
                assert dense_losses[stage].item() == pytest.approx(dense_loss.item(), rel=1e-5)
                expected = mix_of_dense(global_loss, dense_loss)
            else:
                expected = global_loss
            assert stage_losses[stage].item() == pytest.approx(expected.item(), rel=1e-5), stage
    default_weights = (1 / 16, 1 / 8, 1 / 4, 1)
    weighted = sum(w * stage_losses[s].item() for s, w in zip(common.STAGES, default_weights))
    assert total.item() == pytest.approx(weighted, rel=1e-6)
    return model, target, total


def test_dense_rung_average_reading_by_hand():
    """Default (Sec. 3.3, "by averaging"): a dense rung is (L_i + D_i) / 2 (lambda = 1/2)."""
    cfg = config("--dense-stages", "res2,res3")
    model, _, _ = check_rungs_by_hand(cfg, lambda g, d: (g + d) / 2)
    head = model.heads["res2"]
    assert hasattr(head, "projector") and hasattr(head, "dense_projector")


def test_dense_rung_replace_reading_by_hand():
    """--dense-mode replace (Sec. 4.1: "replaced ... by the dense loss"): a dense rung is D_i alone
    and has no global head at all, so every parameter still gets a gradient (DDP needs that)."""
    cfg = config("--dense-stages", "res2,res3", "--dense-mode", "replace")
    model, target, total = check_rungs_by_hand(cfg, lambda g, d: d)
    res2, res4 = model.heads["res2"], model.heads["res4"]
    assert not hasattr(res2, "projector") and not hasattr(res2, "predictor")
    assert set(target["heads"]["res2"].keys()) == {"dense_projector"}
    assert hasattr(res4, "projector") and not hasattr(res4, "dense_projector")
    total.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_dense_matching_uses_the_projection_before_the_predictor():
    """Eq. 7: align() compares y^a = p^conv(z^a), the ONLINE PROJECTION, with the target projection
    y'^b; the loss regresses the prediction q^conv(y^a) onto the matched y'^b. With a real (random,
    non-identity) predictor the matches by prediction differ, so matching on it changes the loss."""
    cfg = config("--dense-stages", "res2", "--weights", "1,0,0,1")
    model, target = build(cfg)
    pair = views(batch=2)
    _, _, dense_losses = forward_loss(cfg, model, target, pair)
    with torch.no_grad():
        _, dense_loss, by_projection, by_prediction = hand_rung(model, target, pair, "res2")
    assert by_projection != by_prediction  # the test can tell the two tensors apart
    assert dense_losses["res2"].item() == pytest.approx(dense_loss.item(), rel=1e-5)


def test_docstring_res5_dense_commands_have_more_than_one_res5_position():
    """A dense res5 rung on a 1x1 map matches its one position to itself: the docstring's res5
    commands must use an image size whose res5 map is at least 2x2."""
    lines = [line for line in ladder_byol.__doc__.splitlines()
             if "python ladder_byol.py" in line and "--dense-stages" in line and "res5" in line]
    commands = [line.split("ladder_byol.py", 1)[1].split() for line in lines]
    assert len(commands) == 2  # "D D D D" and "- - - D"
    for tokens in commands:
        args = []
        for flag, value in zip(tokens[::2], tokens[1::2]):
            if not flag.startswith("--"):
                break
            args += [flag, value]
        cfg = common.parse_config(ladder_byol.Config, ladder_byol.PRESETS, args)
        trunk = common.ResNetTrunk(cfg.arch, cfg.stem).eval()
        with torch.no_grad():
            res5 = trunk(torch.zeros(1, 3, cfg.image_size, cfg.image_size))["res5"]
        assert res5.shape[2] * res5.shape[3] >= 4, (args, tuple(res5.shape))
