"""Ladder-BYOL and Ladder-DenseBYOL: Ladder Siamese Network (Yoshihashi et al., arXiv:2211.13844).

BYOL with a self-supervised loss on every stage of the backbone, not only the last one. Each stage
res2..res5 has its own side branch (global pool -> projector -> predictor), mirrored by EMA
projectors in the target, and its own BYOL loss; the intermediate losses reach the lower stages
directly instead of only through the layers above them. Ladder-DenseBYOL makes the losses of the
lower stages (res2, res3) dense: DenseBYOL, a non-contrastive DenseCL, averaged with the global loss
of the same stage (default) or replacing it (--dense-mode replace; see the NOTE below).

    z_i = f_i(z_{i-1})                                   stage maps res2..res5, online backbone
    L_i = l(q_i(p_i(pool z_i^a)), sg p'_i(pool z'_i^b))  + the same with a <-> b             (Eq. 5)
    L_all = L_res5 + sum_i w_i L_i                                                           (Eq. 4)
    w_i = 2^(i-N) w                                      res2..4: 1/16, 1/8, 1/4 (w = 1/2)   (Eq. 6)
    dense stage:  L_i <- (1 - lambda) L_i + lambda D_i   lambda = 1/2, as DenseCL         (Sec. 3.3)
                  L_i <- D_i                             with --dense-mode replace        (Sec. 4.1)
    D_i = mean_jk l(q_i^conv(y^a)_jk, sg align(y'^b; y^a)_jk) + a <-> b,  y = p_i^conv(z_i)  (Eq. 7)
    align: for every position jk of view a, the position of view b whose projection has the
           highest cosine
    l(p, z) = 2 - 2 cos(p, z);  xi <- tau xi + (1 - tau) theta after every step, as in BYOL

Loss patterns of Table 5 (G = global, D = dense + global or, with --dense-mode replace, dense only,
- = no loss):
    G G G G  Ladder-B   python ladder_byol.py                                (Ladder-BYOL)
    D D G G  Ladder-DB  python ladder_byol.py --dense-stages res2,res3       (Ladder-DenseBYOL)
    D D D D             python ladder_byol.py --dense-stages res2,res3,res4,res5 --image-size 40
    - - - G  BYOL       python ladder_byol.py --weights 0,0,0,1  (same loss, gradients as byol.py)
    - - - D  DenseBYOL  python ladder_byol.py --weights 0,0,0,1 --dense-stages res5 --image-size 40
                        (the same model, initialisation and loss as `python dense_byol.py`)
Table 6 rows: --w 0.25 | --w 0.5 (default) | --w 1 | --weights 1/8,1/8,1/8,1
A dense res5 rung needs a res5 map larger than 1x1: at the 32 px CPU default res5 is 1x1 (stride
32), its one position matches itself and D_res5 is a global loss on the unpooled vector;
--image-size 40 makes res5 2x2 (dense_byol.py's default). The ImageNet presets (224 px): 7x7.

NOTE: the paper describes a dense rung in two ways. Sec. 3.3: "Following DenseCL [69], we used the
dense losses in combination with the global ones by averaging." Sec. 4.1: Ladder-DenseBYOL "replaced
the intermediate losses on the earlier-half stages by the dense loss described in Eq. 7" (Table 5's
caption: "replacing global losses with dense losses"). We default to the explicit formula of
Sec. 3.3, averaging as DenseCL does: (1 - lambda) L_global + lambda L_dense, lambda = 0.5
(`loss_lambda` in WXinlong/DenseCL openselfsup/models/densecl.py). --dense-mode replace is the
Sec. 4.1 reading: a dense rung has only D_i and no global head. The same choice applies to a dense
res5 rung (DenseBYOL: "a top-level loss of Eq. 7").

Commands:
    python ladder_byol.py                                   # built-in data, CPU-sized defaults
    torchrun --standalone --nproc_per_node=2 ladder_byol.py # same run, 2 processes (gloo/nccl)
    # Ladder-BYOL (200 ep), then Ladder-DenseBYOL, on 8 GPUs:
    torchrun --nproc_per_node=8 ladder_byol.py --data /path/to/imagenet --preset imagenet
    torchrun --nproc_per_node=8 ladder_byol.py --data /path/to/imagenet --preset imagenet-dense
    python eval_linear.py --ckpt runs/ladder_byol/last.pt   # kNN + linear probe (any --stage)

NOTE: the CPU defaults (plain SGD without momentum at lr 0.24, no warmup, tau 0.996) are byol.py's,
not the paper's LARS recipe (the presets keep it); see byol.py's NOTE. The same recipe for both
keeps the Table 7 comparison fair.

No official code was released; everything here follows the paper (Sec. 3-4, Eq. 4-7, Tables 5-7).
"""

import dataclasses
from fractions import Fraction

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import common
from common import (STAGES, InputError, augment, conv_mlp, cosine_tau, dense_regression_loss,
                    ema_update, global_pool, lr_at, mlp, print0, regression_loss)


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Config:
    """Ladder-BYOL pretraining. Defaults: a 2-core CPU, built-in data. --preset imagenet: paper."""
    # data
    data: str = "synthetic"          # "synthetic", "cifar10", ImageNet layout, or any image folder
    val_data: str = ""               # labelled set for the kNN monitor ("" = --data if labelled)
    synthetic_size: int = 2560       # images in the built-in training set (val: as many again)
    image_size: int = 32             # px of each augmented view; paper: 224
    load_size: int = 0               # px of the square decoded before cropping; 0 = image_size
                                     # (folders: 256/224 of it)
    workers: int = 8                 # DataLoader workers per process (folder data only)
    gpu_decode: bool = False         # folder data: workers read JPEG bytes, the GPU decodes them
    crop_min_scale: float = 0.25     # smallest random-resized-crop area; paper: 0.08
                                     # (too small a piece of a 32-px image)
    # model
    arch: str = "resnet18"           # resnet18 | resnet50 (paper)
    stem: str = "imagenet"           # imagenet (7x7/2 + max-pool) | cifar (3x3/1, no pool)
    hidden_dim: int = 4096           # projector/predictor hidden width; paper: 4096
                                     # (at every stage; for res2..res4 the paper states none)
    proj_dim: int = 256              # projection width; paper: 256
                                     # (at every stage; for res2..res4 the paper states none)
    sync_bn: bool = True             # SyncBatchNorm across processes (CUDA only); paper: yes
    # ladder (Eq. 4-7)
    w: float = 0.5                   # Eq. 6 coefficient: res2..res4 get w/8, w/4, w/2; paper: 0.5
                                     # (Table 6 also 0.25, 1)
    weights: tuple = ()              # res2,res3,res4,res5 weights, overrides --w; 0 = no head
                                     # (Table 6: 1/8,1/8,1/8,1)
    dense_stages: tuple = ()         # stages whose loss is dense + global (Eq. 7);
                                     # Ladder-DenseBYOL: res2,res3 (Table 5)
    dense_mode: str = "average"      # average (Sec. 3.3) | replace: D only (Sec. 4.1)
    dense_weight: float = 0.5        # lambda in (1-lambda) L + lambda D (average); DenseCL: 0.5
    dense_hidden_dim: int = 0        # 1x1-conv hidden width; 0 = hidden_dim at res5, channels below
    match_on: str = "projection"     # match on dense projections (Eq. 7) | backbone maps (DenseCL)
    # optimisation
    optimizer: str = "sgd"           # sgd (plain SGD, no momentum; CPU, as byol.py's NOTE) |
                                     # lars (momentum 0.9; paper, presets)
    epochs: int = 6                  # paper: 100 and 200 (Table 1 also 400); 6: a short CPU run
    batch_size: int = 128            # GLOBAL batch over all processes; paper: 4096
    base_lr: float = 0.48            # peak lr = base_lr * batch_size / 256;
                                     # paper (LARS): 0.45 (lr 7.2 at batch 4096)
    weight_decay: float = 1.5e-6     # weight decay (not on biases/BN); paper: 1e-6
    warmup_epochs: float = 0.0       # linear lr warmup; paper: 10
    tau_base: float = 0.996          # initial target momentum, cosine to 1;
                                     # paper: "as BYOL" (0.99 for 100-300 ep)
    predictor_lr_mult: float = 1.0   # lr factor of every predictor; paper: 1
    # run
    seed: int = 0
    out: str = "runs/ladder_byol"    # checkpoints, metrics.jsonl
    resume: bool = False             # continue from <out>/last.pt
    knn_every: int = 3               # epochs between kNN monitors (0 = only at the end)
    log_every: int = 10              # steps between logged metrics (and host syncs)
    ckpt_every_steps: int = 0        # also write last.pt every N steps (0 = at epoch ends only)
    keep_every: int = 0              # keep a copy ckpt_<epoch>.pt every N epochs (0 = never)
    stop_after: int = 0              # stop (with a checkpoint) after this many steps;
                                     # the schedule still spans all epochs
    device: str = ""                 # "" = cuda if available else cpu
    precision: str = "auto"          # auto | bf16 | fp32; auto = bf16 on CUDA and on CPUs with
                                     # native bf16 (avx512_bf16/AMX), fp32 elsewhere
    compile: bool = False            # torch.compile the online and target networks
    show: bool = False               # write <out>/show.png (the method on one batch), then exit


_IMAGENET = dict(optimizer="lars", crop_min_scale=0.08, arch="resnet50", stem="imagenet",
                 image_size=224, batch_size=4096, base_lr=0.45, weight_decay=1e-6,
                 warmup_epochs=10.0, tau_base=0.99, knn_every=10, workers=10,
                 predictor_lr_mult=1.0)
PRESETS = {
    # Ladder-BYOL and Ladder-DenseBYOL of Ladder Siamese Network (arXiv:2211.13844, Sec. 4.1):
    # LARS, batch 4096, lr 7.2 (= 0.45 x 4096 / 256), wd 1e-6, cosine, the rest as BYOL; its
    # runs: 100 and 200 epochs. NOTE: no warmup or tau_base is stated there; BYOL's 10 epochs
    # and 0.99.
    "imagenet": dict(_IMAGENET, epochs=200),                        # Ladder-BYOL: Tables 1-4, 6
    "imagenet-100ep": dict(_IMAGENET, epochs=100),                  # Tables 1, 5, 6
    "imagenet-400ep": dict(_IMAGENET, epochs=400),                  # Table 1, 400-epoch row
    # Ladder-DenseBYOL:
    "imagenet-dense": dict(_IMAGENET, epochs=200, dense_stages=("res2", "res3")),
    "imagenet-dense-100ep": dict(_IMAGENET, epochs=100, dense_stages=("res2", "res3")),  # Table 5
    # Table 5, last row (D D D D: every rung dense), 100 epochs like the whole table.
    "imagenet-dense-all-100ep": dict(_IMAGENET, epochs=100, dense_stages=STAGES),
    # NOTE: not a paper recipe. LARS at the CPU size, as byol.py's --preset lars.
    "lars": dict(optimizer="lars", base_lr=1.0, warmup_epochs=1.0, predictor_lr_mult=10.0,
                 tau_base=0.99),
    # CIFAR-10 with the usual small-image changes (3x3 stem, 32 px); not a paper recipe.
    "cifar10": dict(optimizer="lars", data="cifar10", arch="resnet18", stem="cifar",
                    image_size=32, batch_size=512, epochs=200, base_lr=1.0, weight_decay=1e-6,
                    warmup_epochs=10.0, tau_base=0.99, knn_every=10, predictor_lr_mult=1.0),
}


def stage_weights(cfg):
    """Loss weight of each stage (Eq. 4, 6): {"res2": w/8, "res3": w/4, "res4": w/2, "res5": 1}, or
    --weights.

    Eq. 6, w_i = 2^(i-N) w, counts the ResNet stages conv1, res2, ..., res5 as i = 1..N = 5; the
    final loss keeps weight 1 (Eq. 4). A stage with weight 0 gets no head at all, so --weights
    0,0,0,1 is BYOL.
    """
    if not cfg.weights:
        return {"res2": cfg.w / 8, "res3": cfg.w / 4, "res4": cfg.w / 2, "res5": 1.0}
    if len(cfg.weights) != len(STAGES):
        raise InputError(f"--weights needs {len(STAGES)} values (res2,res3,res4,res5), "
                         f"got {len(cfg.weights)}")
    try:
        values = [float(Fraction(str(value))) for value in cfg.weights]
    except (ValueError, ZeroDivisionError):
        raise InputError(f"--weights: cannot read {','.join(map(str, cfg.weights))} "
                         "as numbers or fractions") from None
    return dict(zip(STAGES, values))


def check_config(cfg, world_size):
    """What main() checks before any data or model is built: the common checks and the ladder's."""
    common.check_common_config(cfg, world_size)
    common.check(cfg.optimizer in common.BYOL_OPTIMIZERS,
                 f"--optimizer must be lars or sgd, not {cfg.optimizer!r}")
    weights = stage_weights(cfg)
    common.check(all(value >= 0 for value in weights.values()),
                 f"--weights must be >= 0, got {weights}")
    common.check(weights["res5"] > 0,
                 "--weights: the final res5 loss is always on (Eq. 4); give it a weight > 0")
    for stage in cfg.dense_stages:
        common.check(stage in STAGES,
                     f"--dense-stages: unknown stage {stage!r}; choose from {','.join(STAGES)}")
        common.check(weights[stage] > 0,
                     f"--dense-stages: {stage} has loss weight 0, so it has no head")
    common.check(cfg.dense_mode in ("average", "replace"),
                 f"--dense-mode must be average or replace, got {cfg.dense_mode!r}")
    common.check(0 <= cfg.dense_weight <= 1,
                 f"--dense-weight must be in [0, 1], got {cfg.dense_weight}")
    common.check(cfg.dense_hidden_dim >= 0,
                 f"--dense-hidden-dim must be >= 0, got {cfg.dense_hidden_dim}")
    common.check(cfg.match_on in ("projection", "backbone"),
                 f"--match-on must be projection or backbone, got {cfg.match_on!r}")


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------

class StageHead(nn.Module):
    """One rung of the ladder: the side branch on one stage map (Fig. 2).

    global (Eq. 5): global pool -> projector p_i (MLP) -> predictor q_i (MLP), the BYOL head on a
                    pooled stage map.
    dense  (Eq. 7): 1x1-conv projector p_i^conv -> 1x1-conv predictor q_i^conv, the same MLP at
                    every position.
    A dense rung has both (average mode, default) or only the dense head (--dense-mode replace).
    NOTE: the paper states no head widths for the intermediate stages; the global heads copy BYOL's
    (hidden_dim, proj_dim). A dense res5 head is DenseBYOL's (dense_byol.py): hidden_dim wide,
    BYOL's MLP at every position (0.5 GMACs per 224 px ResNet-50 view at 7 x 7). Below res5 the
    dense hidden width is the stage's channel count, as DenseCL's dense head (2048 -> 2048 -> 128 at
    res5): a 4096-wide 1x1-conv head at res2 (56 x 56 positions) would cost 6.6 GMACs per view, more
    than the backbone (4.1 GMACs); 256 wide it costs 0.4 GMACs.
    The output width stays proj_dim. --dense-hidden-dim N sets one width for every dense stage.
    """

    def __init__(self, stage, in_dim, cfg):
        super().__init__()
        dense = stage in cfg.dense_stages
        if not (dense and cfg.dense_mode == "replace"):
            self.projector = mlp(in_dim, cfg.hidden_dim, cfg.proj_dim)
            self.predictor = mlp(cfg.proj_dim, cfg.hidden_dim, cfg.proj_dim)
        if dense:
            dense_hidden = cfg.dense_hidden_dim or (cfg.hidden_dim if stage == "res5" else in_dim)
            self.dense_projector = conv_mlp(in_dim, dense_hidden, cfg.proj_dim)
            self.dense_predictor = conv_mlp(cfg.proj_dim, dense_hidden, cfg.proj_dim)

    def target_modules(self):
        """What the EMA target mirrors: the projectors (BYOL's target has no predictor)."""
        return nn.ModuleDict({name: module for name, module in self.named_children()
                              if name.endswith("projector")})


class LadderBYOL(nn.Module):
    """Online network: backbone with one StageHead per stage that has a loss. The target copies
    backbone + projectors."""

    def __init__(self, cfg):
        super().__init__()
        self.backbone = common.ResNetTrunk(cfg.arch, cfg.stem)
        weights = stage_weights(cfg)
        self.heads = nn.ModuleDict({stage: StageHead(stage, self.backbone.channels[stage], cfg)
                                    for stage in STAGES if weights[stage] > 0})
        self.match_on = cfg.match_on

    def forward(self, views):
        """views: list of B x 3 x S x S. Returns per view {stage: predictions} (BN statistics per
        view).

        predictions: "global" B x proj_dim (not at a dense stage in replace mode); at a dense stage
        "dense" B x proj_dim x h x w (q^conv(y^a)) and "match" (the view-a map align() compares:
        y^a = p^conv(z^a) from before the predictor, or z^a with --match-on backbone).
        """
        outputs = []
        for view in views:
            projections = embed(self, view, self.match_on)
            for stage, out in projections.items():
                head = self.heads[stage]
                if "global" in out:
                    out["global"] = head.predictor(out["global"])  # B x proj_dim
                if "dense" in out:
                    out["dense"] = head.dense_predictor(out["dense"])  # B x proj_dim x h x w
            outputs.append(projections)
        return outputs


def embed(net, view, match_on):
    """Projections of every stage of a network holding .backbone and .heads (the online model or
    its target).

    Returns {stage: {"global": B x proj_dim, and at dense stages "dense": B x proj_dim x h x w,
    "match": B x C x h x w}}; "global" only where the head has a global projector (not at a dense
    stage in replace mode).
    """
    maps = net.backbone(view)  # stage -> B x C x h x w
    out = {}
    for stage, head in net.heads.items():
        out[stage] = {}
        if hasattr(head, "projector"):  # a global rung, or a dense one in average mode
            out[stage]["global"] = head.projector(global_pool(maps[stage]))  # B x proj_dim
        if hasattr(head, "dense_projector"):  # a dense stage
            dense = head.dense_projector(maps[stage])  # B x proj_dim x h x w
            out[stage]["dense"] = dense
            # NOTE: Eq. 7 matches on the projected vectors y = p^conv(z) (default); DenseCL matches
            # on backbone features (--match-on backbone). We follow the paper we implement; align()
            # is an argmax, no gradient.
            out[stage]["match"] = dense if match_on == "projection" else maps[stage]
    return out


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------

def ladder_loss(predictions, targets, weights, dense_weight):
    """Eq. 4: L_all = sum_i w_i L_i over the stages with a head. Returns (L_all, {stage: L_i},
    {stage: D_i}).

    Each L_i is the symmetric BYOL loss on the pooled stage (Eq. 5, range [0, 8]). At a dense stage
    with a global head (average mode) it is averaged with the symmetric DenseBYOL loss D_i (Eq. 7),
    (1 - dense_weight) L_i + dense_weight D_i, as DenseCL does; without one (replace mode): D_i.
    """
    p1, p2 = predictions
    z1, z2 = targets
    stage_losses, dense_losses = {}, {}
    for stage in p1:
        if "global" in p1[stage]:
            loss = (regression_loss(p1[stage]["global"], z2[stage]["global"])
                    + regression_loss(p2[stage]["global"], z1[stage]["global"]))
        if "dense" in p1[stage]:
            dense_losses[stage] = (
                dense_regression_loss(p1[stage]["dense"], z2[stage]["dense"],
                                      p1[stage]["match"], z2[stage]["match"])
                + dense_regression_loss(p2[stage]["dense"], z1[stage]["dense"],
                                        p2[stage]["match"], z1[stage]["match"]))
            if "global" in p1[stage]:  # average mode
                loss = (1 - dense_weight) * loss + dense_weight * dense_losses[stage]
            else:  # replace mode
                loss = dense_losses[stage]
        stage_losses[stage] = loss
    total = sum(weights[stage] * loss for stage, loss in stage_losses.items())
    return total, stage_losses, dense_losses


# --------------------------------------------------------------------------------------------------
# Train loop
# --------------------------------------------------------------------------------------------------

def train(cfg, dist):
    torch.manual_seed(cfg.seed)
    out = common.prepare_output_dir(cfg.out) if dist.is_main else None
    autocast_dtype, memory_format = common.device_setup(dist, cfg.precision)
    world_batch = cfg.batch_size
    batch_per_rank = world_batch // dist.world_size
    train_loader, bank_loader, val_loader = common.make_loaders(cfg, dist)  # uint8, on the device
    steps_per_epoch = len(train_loader)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    peak_lr = cfg.base_lr * world_batch / 256
    recipes = [dataclasses.replace(recipe, crop_scale=(cfg.crop_min_scale, 1.0))
               for recipe in common.BYOL_VIEWS]

    weights = stage_weights(cfg)
    model = LadderBYOL(cfg).to(dist.device, memory_format=memory_format)
    target = common.make_target({"backbone": model.backbone, "heads": nn.ModuleDict(
        {stage: head.target_modules() for stage, head in model.heads.items()})})
    if cfg.sync_bn and dist.device.type == "cuda" and dist.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        target = nn.SyncBatchNorm.convert_sync_batchnorm(target)
    ema_pairs = common.ema_pairs(target, model)
    predictor_lr_mults = {"predictor": cfg.predictor_lr_mult,
                          "dense_predictor": cfg.predictor_lr_mult}
    groups = common.lars_param_groups(model, cfg.weight_decay, predictor_lr_mults)
    optimizer = common.byol_optimizer(cfg.optimizer, groups, peak_lr)  # LARS or plain SGD

    step = 0
    if common.should_resume(cfg):  # --resume, or a torchrun --max-restarts restart with a last.pt
        state = common.load_checkpoint(f"{cfg.out}/last.pt", method="ladder_byol")
        common.check_resume_compatible(state, cfg)
        # these decide which heads exist
        for key in ("w", "weights", "dense_stages", "dense_mode", "dense_hidden_dim"):
            saved, now = state["config"].get(key), common.config_dict(cfg)[key]
            common.check(saved == now, f"--resume: checkpoint has {key}={saved!r} "
                                       f"but this run has {key}={now!r}")
        model.load_state_dict(state["model"])
        target.load_state_dict(state["target"])
        optimizer.load_state_dict(state["optimizer"])
        common.set_rng_state(state["rng"])
        step = state["step"]
        print0(f"resumed from {cfg.out}/last.pt at step {step}")

    ddp_model = DistributedDataParallel(model) if dist.world_size > 1 else model
    online_forward = ddp_model
    target_forward = (lambda views: [embed(target, view, cfg.match_on) for view in views])
    common.compile_colour_ops(cfg.compile)  # --compile also fuses the colour-jitter ops
    if cfg.compile:
        online_forward = torch.compile(online_forward)
        target_forward = torch.compile(target_forward)

    common.print_run_header("ladder_byol", cfg, dist, dict(
        peak_lr=peak_lr, batch_per_rank=batch_per_rank, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, stage_weights=weights, dense_stages=list(cfg.dense_stages)))
    log = common.MetricsLog(f"{cfg.out}/metrics.jsonl", dist.is_main)
    stop = common.StopSignal()

    def save(epoch, reason):
        if dist.is_main:
            state = dict(method="ladder_byol", config=common.config_dict(cfg), step=step,
                         epoch=epoch, model=model.state_dict(), target=target.state_dict(),
                         optimizer=optimizer.state_dict(), rng=common.rng_state(),
                         world_size=dist.world_size)
            common.save_checkpoint(state, out / "last.pt")
            if reason == "keep":
                common.save_checkpoint(state, out / f"ckpt_{epoch:04d}.pt")
        common.barrier()

    def knn(epoch):
        if val_loader is None:  # unlabelled --data, no --val-data: off (make_loaders said so)
            return None
        accuracy = common.knn_monitor(model.backbone, bank_loader, val_loader, cfg.image_size,
                                      autocast_dtype, memory_format)
        print0(f"epoch {epoch}: kNN top-1 {accuracy:.2f}%")
        log.write(epoch=epoch, step=step, knn_top1=accuracy)
        return accuracy

    if step == 0 and cfg.knn_every > 0:
        knn(0)  # the random-init baseline every report compares against
    accuracy = None
    timer = common.Timer(dist.device)  # images/s and data-wait fraction between log points
    start_epoch = step // steps_per_epoch
    for epoch in range(start_epoch, cfg.epochs):
        train_loader.set_epoch(epoch, start_batch=step - epoch * steps_per_epoch)
        bar = common.progress(common.timed(train_loader, timer), dist.is_main,
                              desc=f"epoch {epoch + 1}/{cfg.epochs}",
                              initial=step - epoch * steps_per_epoch, total=steps_per_epoch)
        for images, _ in bar:
            lr = lr_at(step, total_steps, warmup_steps, peak_lr)
            tau = cosine_tau(step, total_steps, cfg.tau_base)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]

            generator = common.step_generator(dist.device, cfg.seed, dist.rank, step)
            views = [augment(images, recipe, cfg.image_size, generator)[0]
                     .contiguous(memory_format=memory_format) for recipe in recipes]
            with torch.autocast(dist.device.type, dtype=autocast_dtype or torch.bfloat16,
                                enabled=autocast_dtype is not None):
                predictions = online_forward(views)
                with torch.no_grad():
                    targets = target_forward(views)
            loss, stage_losses, dense_losses = ladder_loss(predictions, targets, weights,
                                                           cfg.dense_weight)

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ema_update(ema_pairs, tau)  # target <- tau * target + (1 - tau) * online
            step += 1
            timer.add(images.shape[0] * dist.world_size)

            at_epoch_end = step % steps_per_epoch == 0
            stopping = step == cfg.stop_after or (step % cfg.log_every == 0 and stop.agreed())
            checkpoint_now = (stopping or at_epoch_end
                              or (cfg.ckpt_every_steps and step % cfg.ckpt_every_steps == 0))
            if step % cfg.log_every == 0 or checkpoint_now:  # the only host syncs of the loop
                terms = dict(loss=loss,  # and every rung's
                             **{f"loss_{s}": value for s, value in stage_losses.items()},
                             **{f"dense_{s}": value for s, value in dense_losses.items()})
                values = common.check_finite(step, terms, f"{cfg.out}/last.pt")
                images_per_s, data_wait = timer.rate()
                bar.set_postfix(loss=f"{values['loss']:.4f}",
                                **{s: f"{values[f'loss_{s}']:.3f}" for s in stage_losses},
                                lr=f"{lr:.3g}", tau=f"{tau:.4f}",
                                img_s=f"{images_per_s:.0f}")
                log.write(step=step, epoch=epoch, **values, lr=lr, tau=tau,
                          images_per_s=images_per_s, data_wait=data_wait)
            if checkpoint_now and (stopping or not at_epoch_end):  # else: the epoch-end save
                save(step // steps_per_epoch, "step")
            if stopping:
                print0(f"stopped at step {step} ({stop.received or 'stop_after'}); "
                       "resume with --resume")
                stop.exit_if_received()  # on a signal: exit 128 + signal number, checkpoint saved
                return dict(model=model, target=target, step=step, knn=None)
        bar.close()
        last_epoch = epoch + 1 == cfg.epochs
        save(epoch + 1, "keep" if cfg.keep_every and (epoch + 1) % cfg.keep_every == 0 else "epoch")
        if last_epoch or (cfg.knn_every and (epoch + 1) % cfg.knn_every == 0):
            accuracy = knn(epoch + 1)
    print0(f"done: {cfg.out}/last.pt"
           + (f", final kNN top-1 {accuracy:.2f}%" if accuracy is not None else ""))
    return dict(model=model, target=target, step=step, knn=accuracy)


# --------------------------------------------------------------------------------------------------
# Show
# --------------------------------------------------------------------------------------------------

def show(cfg, dist):
    """--show: <out>/show.png, the two views of four images as train() makes them at step 0 and,
    per dense rung, where align() sends every position of view 1 in view 2, for the untrained
    model (whose target is the same network)."""
    torch.manual_seed(cfg.seed)
    images, generator = common.show_batch(cfg, dist)
    recipes = [dataclasses.replace(recipe, crop_scale=(cfg.crop_min_scale, 1.0))
               for recipe in common.BYOL_VIEWS]
    views, boxes, flips = zip(*(augment(images, recipe, cfg.image_size, generator)
                                for recipe in recipes))
    rows = common.view_rows(images, views, boxes, flips)
    model = LadderBYOL(cfg).to(dist.device)  # train mode (batch statistics), as the loss sees it
    with torch.no_grad():
        outputs = [embed(model, view, cfg.match_on) for view in views]
    for stage in cfg.dense_stages:  # one column per dense rung
        query, key = (out[stage]["match"] for out in outputs)  # B x C x h x w each
        index = common.dense_match(query, key)                 # B x hw
        matches = common.draw_matches(images, index, query.shape[-2:], boxes, flips)
        rows = [row + [panel] for row, panel in zip(rows, matches)]
    rungs = ",".join(cfg.dense_stages) or "none; --dense-stages res2,res3 adds them"
    return common.save_picture(
        rows, f"{cfg.out}/show.png",
        "per image: the crops of view 1 (yellow) and view 2 (cyan), the views ('flip' = mirrored), "
        f"then per dense rung ({rungs}) the dense matches on the image: every position of view 1 "
        "(red dot) joined to the view-2 position dense_match picks for it. UNTRAINED model: the "
        "matches of random features")


def main(argv=None):
    with common.main_errors():  # bad input: one line, exit 2; training failure: exit 3
        cfg = common.parse_config(Config, PRESETS, argv)
        dist = common.setup_distributed(cfg.device or None)
        check_config(cfg, dist.world_size)
        if cfg.show:
            return show(cfg, dist)
        return train(cfg, dist)


if __name__ == "__main__":
    main()
