"""DenseBYOL: BYOL plus a dense loss on the last feature map, a non-contrastive DenseCL.

Defined in Ladder Siamese Network (Yoshihashi et al., arXiv:2211.13844, Sec. 3.3, Eq. 7, Table 4-5
row "DenseBYOL") as the BYOL counterpart of DenseCL (Wang et al., CVPR 2021, arXiv:2011.09157). Next
to BYOL's global branch, a 1x1-conv projector and predictor run at every position of the res5 map;
every position of view a regresses the target projection of the position of view b that looks most
like it (highest cosine), with a stop-gradient.

    y = f(v), z = g(pool y), p = q(z)                   global branch, exactly BYOL
    y^a = g^conv(y_a), p^a = q^conv(y^a)                dense branch, online (res5: B x D x h x w)
    y'^b = g'^conv(f'(v_b))                             target, no gradient: EMA of f, g, g^conv
    align(y'^b; y^a)_ij = y'^b_uv,  (u, v) = argmax_uv cos(y^a_ij, y'^b_uv)                  (Eq. 7)
    D = mean_ij l(p^a_ij, sg align(y'^b; y^a)_ij) + (a <-> b)     range [0, 8], with
    l(p, z) = 2 - 2 cos(p, z)
    loss = (1 - lambda) L_BYOL + lambda D,  lambda = 1/2          DenseCL's averaging

Commands:
    python dense_byol.py                                   # built-in data, CPU-sized defaults
    torchrun --standalone --nproc_per_node=2 dense_byol.py # same run, 2 processes (gloo/nccl)
    torchrun --nproc_per_node=8 dense_byol.py --data /path/to/imagenet --preset imagenet
    python eval_linear.py --ckpt runs/dense_byol/last.pt   # kNN + linear probe

No code was released for DenseBYOL; this follows the Ladder paper's Eq. 7 and, where it is silent,
DenseCL's code (WXinlong/DenseCL openselfsup/models/densecl.py: loss_lambda = 0.5; necks.py
DenseCLNeck: the 1x1-conv dense head).
NOTE: the Ladder paper averages the dense loss with the global one ("Following DenseCL [69], we
used the dense losses in combination with the global ones by averaging", Sec. 3.3) and also calls
DenseBYOL "a top-level loss of Eq. 7" (Sec. 4.1). We average (default); --dense-weight 1 keeps D
alone (the global head then gets no gradient).
The same model, initialisation and loss:
    python ladder_byol.py --weights 0,0,0,1 --dense-stages res5 --image-size 40
(tests/test_dense_byol.py checks parameters and loss at these default widths).
"""

import dataclasses

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import common
from common import (augment, conv_mlp, cosine_tau, dense_regression_loss, ema_update,
                    global_pool, lr_at, mlp, print0, regression_loss)


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Config:
    """DenseBYOL pretraining. Defaults: a 2-core CPU, built-in data. --preset imagenet: paper."""
    # data
    data: str = "synthetic"          # "synthetic", "cifar10", ImageNet layout, or any image folder
    val_data: str = ""               # labelled set for the kNN monitor ("" = --data if labelled)
    synthetic_size: int = 2560       # images in the built-in training set (val: as many again)
    image_size: int = 40             # px of each augmented view; paper: 224.
                                     # NOTE: not byol.py's 32: res5 is 2 x 2, not 1 x 1
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
    proj_dim: int = 256              # projection width; paper: 256
    sync_bn: bool = True             # SyncBatchNorm across processes (CUDA only); paper: yes
    # dense branch (Eq. 7)
    dense_hidden_dim: int = 4096     # 1x1-conv projector/predictor hidden width; paper: not stated
                                     # (BYOL's 4096)
    dense_weight: float = 0.5        # lambda of (1-lambda) L_global + lambda L_dense; DenseCL: 0.5
    match_on: str = "projection"     # match on dense projections (Eq. 7) | backbone maps (DenseCL)
    # optimisation
    epochs: int = 4                  # paper: 100 (Table 5); 4: a CPU run under 5 minutes
    batch_size: int = 128            # GLOBAL batch over all processes; paper: 4096
    base_lr: float = 1.0             # peak lr = base_lr * batch_size / 256;
                                     # paper: 0.45 (lr 7.2 at batch 4096)
    weight_decay: float = 1.5e-6     # LARS weight decay (not on biases/BN);
                                     # paper: 1e-6
    warmup_epochs: float = 1.0       # linear lr warmup; paper: 10
    tau_base: float = 0.99           # initial target momentum, cosine to 1;
                                     # paper: "as BYOL" (0.99 for 100-300 ep)
    predictor_lr_mult: float = 10.0  # predictor lr = this x the lr; paper: 1 (presets). See NOTE
                                     # (every predictor). NOTE: 10 on CPU, as byol.py --preset lars
    # run
    seed: int = 0
    out: str = "runs/dense_byol"     # checkpoints, metrics.jsonl
    resume: bool = False             # continue from <out>/last.pt
    knn_every: int = 2               # epochs between kNN monitors (0 = only at the end)
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


_IMAGENET = dict(crop_min_scale=0.08, arch="resnet50", stem="imagenet", image_size=224,
                 batch_size=4096, base_lr=0.45, weight_decay=1e-6, warmup_epochs=10.0,
                 tau_base=0.99, knn_every=10, workers=10, predictor_lr_mult=1.0)
PRESETS = {
    # The DenseBYOL baseline of Ladder Siamese Network (arXiv:2211.13844, Sec. 4.1, Tables 4-5):
    # LARS, batch 4096, lr 7.2 (= 0.45 x 4096 / 256), wd 1e-6, cosine, the rest as BYOL; its
    # runs: 100 epochs. NOTE: no warmup or tau_base is stated there; BYOL's 10 epochs
    # and 0.99.
    "imagenet": dict(_IMAGENET, epochs=100),
    "imagenet-200ep": dict(_IMAGENET, epochs=200),
    # CIFAR-10 with the usual small-image changes (3x3 stem, 32 px); not a paper recipe.
    # At 32 px res5 is 4 x 4.
    "cifar10": dict(data="cifar10", arch="resnet18", stem="cifar", image_size=32,
                    batch_size=512, epochs=200, base_lr=1.0, weight_decay=1e-6,
                    warmup_epochs=10.0, tau_base=0.99, knn_every=10, predictor_lr_mult=1.0),
}


def check_config(cfg, world_size):
    """What main() checks before any data or model is built: the common checks and DenseBYOL's."""
    common.check_common_config(cfg, world_size)
    common.check(0 <= cfg.dense_weight <= 1,
                 f"--dense-weight must be in [0, 1], got {cfg.dense_weight}")
    common.check(cfg.match_on in ("projection", "backbone"),
                 f"--match-on must be projection or backbone, got {cfg.match_on!r}")


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------

class DenseBYOL(nn.Module):
    """Online network: BYOL's backbone, projector, predictor, plus a 1x1-conv projector and
    predictor on res5.

    The target copies backbone + both projectors. NOTE: the paper gives no dense head widths; we
    mirror BYOL's MLPs per position (C -> 4096 -> 256; DenseCL's dense head: 2048 -> 2048 -> 128).
    At res5 of a 224 px view (7 x 7) that is cheap (0.5 GMACs per view for ResNet-50), unlike at
    res2 (see ladder_byol.py).
    """

    def __init__(self, cfg):
        super().__init__()
        self.backbone = common.ResNetTrunk(cfg.arch, cfg.stem)
        self.projector = mlp(self.backbone.channels["res5"], cfg.hidden_dim, cfg.proj_dim)
        self.predictor = mlp(cfg.proj_dim, cfg.hidden_dim, cfg.proj_dim)
        self.dense_projector = conv_mlp(self.backbone.channels["res5"], cfg.dense_hidden_dim,
                                        cfg.proj_dim)
        self.dense_predictor = conv_mlp(cfg.proj_dim, cfg.dense_hidden_dim, cfg.proj_dim)
        self.match_on = cfg.match_on

    def forward(self, views):
        """views: list of B x 3 x S x S. Returns per view {"global": B x proj_dim, "dense":
        B x proj_dim x h x w, "match": the map align() compares} (BN statistics per view)."""
        outputs = []
        for view in views:
            out = embed(self, view, self.match_on)
            out["global"] = self.predictor(out["global"])  # B x proj_dim
            out["dense"] = self.dense_predictor(out["dense"])  # B x proj_dim x h x w
            outputs.append(out)
        return outputs


def embed(net, view, match_on):
    """Global and dense projections of a network holding .backbone, .projector, .dense_projector
    (the online model or its target)."""
    feature_map = net.backbone(view)["res5"]  # B x C x h x w
    dense = net.dense_projector(feature_map)  # B x proj_dim x h x w
    # NOTE: Eq. 7 matches on the projected vectors y = p^conv(z) (default: the paper we implement);
    # DenseCL matches on backbone features (--match-on backbone), which do not move with the head.
    # align() is an argmax, no gradient.
    return {"global": net.projector(global_pool(feature_map)), "dense": dense,
            "match": dense if match_on == "projection" else feature_map}


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------

def dense_byol_loss(predictions, targets, dense_weight):
    """(1 - lambda) L_BYOL + lambda D, both symmetric (range [0, 8]). Returns (loss, L_BYOL, D)."""
    p1, p2 = predictions
    z1, z2 = targets
    global_loss = (regression_loss(p1["global"], z2["global"])
                   + regression_loss(p2["global"], z1["global"]))
    dense_loss = (dense_regression_loss(p1["dense"], z2["dense"], p1["match"], z2["match"])
                  + dense_regression_loss(p2["dense"], z1["dense"], p2["match"], z1["match"]))
    return (1 - dense_weight) * global_loss + dense_weight * dense_loss, global_loss, dense_loss


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

    model = DenseBYOL(cfg).to(dist.device, memory_format=memory_format)
    target = common.make_target({"backbone": model.backbone, "projector": model.projector,
                                 "dense_projector": model.dense_projector})
    if cfg.sync_bn and dist.device.type == "cuda" and dist.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        target = nn.SyncBatchNorm.convert_sync_batchnorm(target)
    ema_pairs = common.ema_pairs(target, model)
    predictor_lr_mults = {"predictor": cfg.predictor_lr_mult,
                          "dense_predictor": cfg.predictor_lr_mult}
    optimizer = common.LARS(
        common.lars_param_groups(model, cfg.weight_decay, predictor_lr_mults),
        lr=peak_lr)

    step = 0
    if common.should_resume(cfg):  # --resume, or a torchrun --max-restarts restart with a last.pt
        state = common.load_checkpoint(f"{cfg.out}/last.pt", method="dense_byol")
        common.check_resume_compatible(state, cfg)
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

    common.print_run_header("dense_byol", cfg, dist, dict(
        peak_lr=peak_lr, batch_per_rank=batch_per_rank, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps))
    log = common.MetricsLog(f"{cfg.out}/metrics.jsonl", dist.is_main)
    stop = common.StopSignal()

    def save(epoch, reason):
        if dist.is_main:
            state = dict(method="dense_byol", config=common.config_dict(cfg), step=step,
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
            loss, global_loss, dense_loss = dense_byol_loss(predictions, targets, cfg.dense_weight)

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
                terms = dict(loss=loss, loss_global=global_loss, loss_dense=dense_loss)
                values = common.check_finite(step, terms, f"{cfg.out}/last.pt")
                images_per_s, data_wait = timer.rate()
                bar.set_postfix(loss=f"{values['loss']:.4f}", glob=f"{values['loss_global']:.3f}",
                                dense=f"{values['loss_dense']:.3f}", lr=f"{lr:.3g}",
                                tau=f"{tau:.4f}", img_s=f"{images_per_s:.0f}")
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
    """--show: <out>/show.png, the two views of four images as train() makes them at step 0, and
    where align() sends every res5 position of view 1 in view 2, for the untrained model (whose
    target is the same network)."""
    torch.manual_seed(cfg.seed)
    images, generator = common.show_batch(cfg, dist)
    recipes = [dataclasses.replace(recipe, crop_scale=(cfg.crop_min_scale, 1.0))
               for recipe in common.BYOL_VIEWS]
    views, boxes, flips = zip(*(augment(images, recipe, cfg.image_size, generator)
                                for recipe in recipes))
    model = DenseBYOL(cfg).to(dist.device)  # train mode (batch statistics), as the loss sees it
    with torch.no_grad():
        query, key = (embed(model, view, cfg.match_on)["match"] for view in views)  # B x C x h x w
    index = common.dense_match(query, key)  # B x hw: the view-2 position of each view-1 position
    matches = common.draw_matches(images, index, query.shape[-2:], boxes, flips)
    rows = common.view_rows(images, views, boxes, flips)
    rows = [row + [panel] for row, panel in zip(rows, matches)]
    return common.save_picture(
        rows, f"{cfg.out}/show.png",
        "per image: the crops of view 1 (yellow) and view 2 (cyan), the views ('flip' = mirrored), "
        "and the dense matches on the image: every res5 position of view 1 (red dot) joined to the "
        "view-2 position dense_match picks for it. UNTRAINED model: the matches of random features")


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
