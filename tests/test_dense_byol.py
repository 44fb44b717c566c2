"""dense_byol.py and common.py's dense matching (Ladder paper Eq. 7): checks M1-M3 (below),
identity/flip invariants, matching on the projection before the predictor, the same model as
ladder_byol.py's "- - - D" pattern at the default widths, DDP on CPU, bad flags.

M1: argmax-cosine matches on fixed random maps (the rule of DenseCL's code, WXinlong/DenseCL
openselfsup/models/densecl.py); M2: identical views match the identity and give zero dense loss;
M3: a flipped view matches mirrored columns."""

import json

import pytest
import torch
import torch.nn.functional as F

import common
import dense_byol
import ladder_byol
from ddp_runner import assert_same_parameters, run_two_processes

TINY = ["--synthetic-size", "32", "--image-size", "64", "--batch-size", "8", "--hidden-dim", "32",
        "--proj-dim", "16", "--dense-hidden-dim", "16", "--epochs", "1", "--knn-every", "0",
        "--log-every", "1"]


def config(*args):
    return common.parse_config(dense_byol.Config, dense_byol.PRESETS, list(TINY) + list(args))


def build(cfg, seed=0):
    torch.manual_seed(seed)
    model = dense_byol.DenseBYOL(cfg)
    target = common.make_target({"backbone": model.backbone, "projector": model.projector,
                                 "dense_projector": model.dense_projector})
    return model, target


# --- dense matching (common.py) -------------------------------------------------------------------

def test_M1_matches_the_densecl_rule():
    torch.manual_seed(0)
    query = F.normalize(torch.randn(2, 32, 9), dim=1)
    key = F.normalize(torch.randn(2, 32, 9), dim=1)
    expected = [[2, 3, 1, 6, 5, 7, 6, 5, 0], [6, 8, 6, 2, 5, 8, 0, 3, 6]]
    assert common.dense_match(query.view(2, 32, 3, 3), key.view(2, 32, 3, 3)).tolist() == expected
    # the similarity is built a few images at a time; one image per chunk gives the same answer
    chunked = common.dense_match(query.view(2, 32, 3, 3), key.view(2, 32, 3, 3), max_elements=81)
    assert chunked.tolist() == expected


def test_match_is_scale_invariant_and_gather_picks_the_matched_vectors():
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(2, 8, 3, 4, generator=generator)
    key = torch.randn(2, 8, 5, 2, generator=generator)
    idx = common.dense_match(query, key)
    assert idx.shape == (2, 12) and int(idx.max()) < 10
    assert torch.equal(common.dense_match(3 * query, 0.5 * key), idx)
    gathered = common.gather_positions(key, idx)  # B x C x HW
    for b in range(2):
        for position in range(12):
            row, col = divmod(int(idx[b, position]), 2)
            assert torch.equal(gathered[b, :, position], key[b, :, row, col])


def test_M2_identical_views_match_the_identity_and_give_zero_loss():
    features = torch.randn(3, 16, 7, 7)
    idx = common.dense_match(features, features)
    assert torch.equal(idx, torch.arange(49).expand(3, -1))
    loss = common.dense_regression_loss(features, features, features, features)
    assert loss.item() == pytest.approx(0, abs=1e-6)


def test_M3_flipped_view_matches_mirrored_columns():
    """A per-position head (1x1 convs) commutes with the flip, so position (r, c) must match
    (r, 6 - c)."""
    torch.manual_seed(0)
    head = common.conv_mlp(32, 64, 16).eval()
    feature_map = torch.randn(2, 32, 7, 7)
    with torch.no_grad():
        y_a, y_b = head(feature_map), head(feature_map.flip(-1))
    rows, cols = torch.meshgrid(torch.arange(7), torch.arange(7), indexing="ij")
    mirrored = (rows * 7 + (6 - cols)).flatten()
    assert torch.equal(common.dense_match(y_a, y_b), mirrored.expand(2, -1))
    # and with the flipped target aligned back, an identity predictor has zero dense loss
    assert common.dense_regression_loss(y_a, y_b, y_a, y_b).item() == pytest.approx(0, abs=1e-6)


# --- the model ------------------------------------------------------------------------------------

def test_M2_identical_views_through_the_model_give_identity_matches_and_zero_dense_loss():
    cfg = config("--image-size", "96")  # res5 is 3 x 3
    model, target = build(cfg)
    model.dense_predictor = torch.nn.Identity()
    view = torch.randn(4, 3, 96, 96)
    predictions = model([view, view])
    with torch.no_grad():
        targets = [dense_byol.embed(target, v, cfg.match_on) for v in (view, view)]
    assert predictions[0]["dense"].shape == (4, 16, 3, 3)
    assert torch.equal(common.dense_match(predictions[0]["match"], targets[1]["match"]),
                       torch.arange(9).expand(4, -1))
    _, _, dense_loss = dense_byol.dense_byol_loss(predictions, targets, 0.5)
    assert dense_loss.item() == pytest.approx(0, abs=1e-5)


def test_dense_matching_uses_the_projection_before_the_predictor():
    """Eq. 7 with a real (random, non-identity) predictor: align() compares the online
    projection y^a = p^conv(z^a), not the prediction q^conv(y^a), with the target projection
    y'^b, and q^conv(y^a) regresses onto the matched y'^b. Expected value: a loop over
    positions on the modules' outputs."""
    cfg = config()
    model, target = build(cfg)
    generator = torch.Generator().manual_seed(5)
    pair = [torch.randn(2, 3, 96, 96, generator=generator) for _ in range(2)]  # res5 is 3 x 3
    targets = [dense_byol.embed(target, v, cfg.match_on) for v in pair]
    _, _, dense_loss = dense_byol.dense_byol_loss(model(pair), targets, 0.5)
    expected, differ = 0.0, False
    with torch.no_grad():
        for a, b in ((0, 1), (1, 0)):
            projection = model.dense_projector(model.backbone(pair[a])["res5"])     # B x D x 3 x 3
            prediction = model.dense_predictor(projection).flatten(2)               # B x D x 9
            projection = projection.flatten(2)
            key = target["dense_projector"](target["backbone"](pair[b])["res5"]).flatten(2)
            terms = []
            for image in range(2):
                for i in range(9):
                    cos_y = F.cosine_similarity(projection[image, :, i:i + 1], key[image], dim=0)
                    cos_q = F.cosine_similarity(prediction[image, :, i:i + 1], key[image], dim=0)
                    j = int(cos_y.argmax())
                    differ = differ or j != int(cos_q.argmax())
                    cos = F.cosine_similarity(prediction[image, :, i], key[image, :, j], dim=0)
                    terms.append(2 - 2 * cos)
            expected += sum(terms) / len(terms)
    assert differ  # matching on the prediction picks other positions: the test tells them apart
    assert dense_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_loss_is_the_average_of_global_and_dense_and_gradients_reach_both_heads():
    cfg = config()
    model, target = build(cfg)
    pair = [torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)]
    predictions = model(pair)
    with torch.no_grad():
        targets = [dense_byol.embed(target, view, cfg.match_on) for view in pair]
    loss, global_loss, dense_loss = dense_byol.dense_byol_loss(predictions, targets, 0.5)
    assert loss.item() == pytest.approx(0.5 * global_loss.item() + 0.5 * dense_loss.item(),
                                        rel=1e-6)
    assert 0 < dense_loss.item() < 8
    loss.backward()
    for module in (model.backbone, model.projector, model.predictor, model.dense_projector,
                   model.dense_predictor):
        assert all(p.grad is not None for p in module.parameters())
    assert all(p.grad is None for p in target.parameters())
    assert set(dict(target.named_children())) == {"backbone", "projector", "dense_projector"}


@pytest.mark.parametrize("match_on", ["projection", "backbone"])
def test_same_model_as_ladder_byol_dense_res5_at_default_widths(match_on):
    """dense_byol.py == ladder_byol.py --weights 0,0,0,1 --dense-stages res5 --image-size 40
    (Table 5 row "- - - D"), both at their DEFAULT head widths (4096-wide global and dense
    heads): the same parameters from the same seed and the same loss. Only the backbone is the
    CPU default, ResNet-18."""
    dense_cfg = common.parse_config(dense_byol.Config, {}, ["--match-on", match_on])
    torch.manual_seed(0)
    model = dense_byol.DenseBYOL(dense_cfg)
    target = common.make_target({"backbone": model.backbone, "projector": model.projector,
                                 "dense_projector": model.dense_projector})
    ladder_args = ["--weights", "0,0,0,1", "--dense-stages", "res5", "--image-size", "40"]
    ladder_cfg = common.parse_config(ladder_byol.Config, {}, ladder_args + ["--match-on", match_on])
    torch.manual_seed(0)
    ladder = ladder_byol.LadderBYOL(ladder_cfg)
    ladder_target = common.make_target({"backbone": ladder.backbone, "heads": torch.nn.ModuleDict(
        {"res5": ladder.heads["res5"].target_modules()})})
    assert model.dense_projector[0].out_channels == model.dense_predictor[0].out_channels == 4096
    ours = {(name if name.startswith("backbone.") else "heads.res5." + name): value
            for name, value in model.state_dict().items()}
    theirs = ladder.state_dict()
    shapes = {name: tuple(value.shape) for name, value in theirs.items()}
    assert {name: tuple(value.shape) for name, value in ours.items()} == shapes
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)  # same initialisation
    generator = torch.Generator().manual_seed(1)
    pair = [torch.randn(2, 3, 40, 40, generator=generator) for _ in range(2)]  # res5 is 2 x 2
    with torch.no_grad():
        targets = [dense_byol.embed(target, v, match_on) for v in pair]
        loss, _, _ = dense_byol.dense_byol_loss(model(pair), targets, dense_cfg.dense_weight)
        ladder_targets = [ladder_byol.embed(ladder_target, v, match_on) for v in pair]
        ladder_loss, _, _ = ladder_byol.ladder_loss(ladder(pair), ladder_targets,
                                                    ladder_byol.stage_weights(ladder_cfg),
                                                    ladder_cfg.dense_weight)
    assert loss.item() == pytest.approx(ladder_loss.item(), abs=1e-6)


# --- training runs --------------------------------------------------------------------------------

def test_two_process_ddp_keeps_ranks_identical(tmp_path):
    states = run_two_processes("dense_byol", TINY + ["--stop-after", "2"], str(tmp_path))
    assert_same_parameters(states)
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert records[-1]["step"] == 2 and {"loss_global", "loss_dense"} <= set(records[-1])


@pytest.mark.parametrize("args, message", [
    (["--dense-weight", "1.5"], "--dense-weight must be in [0, 1]"),
    (["--match-on", "pixels"], "--match-on must be"),
])
def test_bad_flags(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        dense_byol.main(["--out", str(tmp_path)] + TINY + args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_predictor_learning_rate_factor_defaults():
    """10x on the CPU default (as byol.py), 1x in every paper preset; the predictors are the modules
    it applies to."""
    assert dense_byol.Config().predictor_lr_mult == 10.0
    for name in dense_byol.PRESETS:
        cfg = common.parse_config(dense_byol.Config, dense_byol.PRESETS, ["--preset", name])
        assert cfg.predictor_lr_mult == 1.0
