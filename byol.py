"""BYOL: Bootstrap Your Own Latent (Grill et al., NeurIPS 2020, arXiv:2006.07733).

An online network (backbone f, projector g, predictor q) learns to predict the projection that a
slowly moving target network (EMA copies f', g' of the backbone and projector) produces for another
augmented view of the same image. No negatives: the predictor, the stop-gradient and the EMA target
keep the representation from collapsing.

    y = f(v), z = g(y), p = q(z)             online, on views v1 and v2
    z' = g'(f'(v))                           target, no gradient
    loss = l(p1, sg z'2) + l(p2, sg z'1)     range [0, 8], with
    l(p, z) = || p/|p| - z/|z| ||^2          = 2 - 2 cos(p, z)
    xi <- tau xi + (1 - tau) theta,          tau(k) = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2

NOTE: the CPU defaults are not the paper's recipe: plain SGD without momentum at lr 0.24 (base
0.48), no warmup, tau 0.996, where the paper uses LARS (the presets keep it). At batch 128 and
100-120 steps this SGD lifts the kNN accuracy over random init on the built-in digits, and on a real
image set (scikit-learn's digit scans) as much as a peer BYOL built from lightly's modules; LARS at
the CPU size (--preset lars) gains nothing on the scans. README "What the CPU defaults show" has the
runs and what they do not show.

This file is the template of the repo: ladder_byol.py, dense_byol.py, densesiam.py, lewel.py and
mcl.py copy its skeleton (config -> model -> loss -> train loop -> main) and differ only where the
method differs.

Commands:
    python byol.py                                   # built-in synthetic data, CPU-sized defaults
    python byol.py --data data/digits --epochs 10    # a small real image set
    torchrun --standalone --nproc_per_node=2 byol.py # same run, 2 processes (CPU: gloo, GPU: nccl)
    torchrun --nproc_per_node=8 byol.py --data /path/to/imagenet --preset imagenet
    python eval_linear.py --ckpt runs/byol/last.pt   # kNN + linear probe of the frozen backbone
"""

import dataclasses

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import common
from common import (augment, cosine_tau, ema_update, global_pool, lr_at, mlp, print0,
                    regression_loss)


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Config:
    """BYOL pretraining. Defaults: a 2-core CPU on the built-in data. --preset imagenet: paper."""
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
    proj_dim: int = 256              # projection width; paper: 256
    sync_bn: bool = True             # SyncBatchNorm across processes (CUDA only); paper: yes
    # optimisation
    optimizer: str = "sgd"           # sgd (plain SGD, no momentum; CPU, see NOTE) |
                                     # lars (momentum 0.9; paper, presets)
    epochs: int = 6                  # paper: 300 (1000 for the headline number)
    batch_size: int = 128            # GLOBAL batch over all processes; paper: 4096
    base_lr: float = 0.48            # peak lr = base_lr * batch_size / 256; paper (LARS):
                                     # 0.3 (300 ep), 0.2 (1000 ep), 0.45 (100 ep)
    weight_decay: float = 1.5e-6     # weight decay (not on biases/BN);
                                     # paper: 1.5e-6 (1000 ep), 1e-6 otherwise
    warmup_epochs: float = 0.0       # linear lr warmup; paper: 10
    tau_base: float = 0.996          # initial target momentum, cosine to 1;
                                     # paper: 0.99 (300 ep), 0.996 (1000 ep)
    predictor_lr_mult: float = 1.0   # predictor lr = this x the lr; paper: 1
    # run
    seed: int = 0
    out: str = "runs/byol"           # checkpoints, metrics.jsonl
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
                 image_size=224, batch_size=4096, weight_decay=1e-6, warmup_epochs=10.0,
                 tau_base=0.99, knn_every=10, workers=10, predictor_lr_mult=1.0)
PRESETS = {
    # BYOL paper recipe (Sec. 3.3, Appendix C; deepmind-research byol/configs/byol.py): LARS,
    # 4096 global batch, 10-epoch warmup, cosine.
    "imagenet": dict(_IMAGENET, epochs=300, base_lr=0.3),
    "imagenet-100ep": dict(_IMAGENET, epochs=100, base_lr=0.45),
    "imagenet-1000ep": dict(_IMAGENET, epochs=1000, base_lr=0.2, weight_decay=1.5e-6,
                            tau_base=0.996),
    # The BYOL baseline of Ladder Siamese Network (arXiv:2211.13844, Sec. 4.1, Tables 1 and 3):
    # LARS, batch 4096, lr 7.2 (= 0.45 x 4096 / 256), wd 1e-6, cosine, the rest as BYOL; its
    # 100-epoch row is imagenet-100ep. NOTE: no warmup or tau_base is stated there; BYOL's 10 epochs
    # and 0.99.
    "imagenet-200ep": dict(_IMAGENET, epochs=200, base_lr=0.45),
    "imagenet-400ep": dict(_IMAGENET, epochs=400, base_lr=0.45),
    # NOTE: not a paper recipe. LARS at the CPU size: lr 0.5, a 1-epoch warmup, the predictor at
    # 10x the lr (BYOL wants it near-optimal for the current target, and 120 steps leave it little
    # time), tau 0.99. On the built-in data it gains about as much as the CPU defaults, on the
    # digits nothing (README "What the CPU defaults show").
    "lars": dict(optimizer="lars", base_lr=1.0, warmup_epochs=1.0, predictor_lr_mult=10.0,
                 tau_base=0.99),
    # CIFAR-10 with the usual small-image changes (3x3 stem, 32 px); not a paper recipe.
    "cifar10": dict(optimizer="lars", data="cifar10", arch="resnet18", stem="cifar",
                    image_size=32, batch_size=512, epochs=200, base_lr=1.0, weight_decay=1e-6,
                    warmup_epochs=10.0, tau_base=0.99, knn_every=10, predictor_lr_mult=1.0),
}


def check_config(cfg, world_size):
    """What main() checks before any data or model is built: the common checks and the
    optimizer."""
    common.check_common_config(cfg, world_size)
    common.check(cfg.optimizer in common.BYOL_OPTIMIZERS,
                 f"--optimizer must be lars or sgd, not {cfg.optimizer!r}")


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------

class BYOL(nn.Module):
    """Online network: backbone -> global pool -> projector -> predictor. The target copies
    backbone + projector."""

    def __init__(self, cfg):
        super().__init__()
        self.backbone = common.ResNetTrunk(cfg.arch, cfg.stem)
        self.projector = mlp(self.backbone.channels["res5"], cfg.hidden_dim, cfg.proj_dim)
        self.predictor = mlp(cfg.proj_dim, cfg.hidden_dim, cfg.proj_dim)

    def forward(self, views):
        """views: list of B x 3 x S x S. Returns one prediction B x proj_dim per view (BN statistics
        per view)."""
        return [self.predictor(embed(self, view)) for view in views]


def embed(net, view):
    """Projection z = g(f(v)) of a network holding .backbone and .projector (the online model or
    its target)."""
    return net.projector(global_pool(net.backbone(view)["res5"]))  # B x proj_dim


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------

def byol_loss(predictions, targets):
    """Symmetric BYOL loss: view 1's prediction regresses view 2's target projection and vice
    versa. Range [0, 8].

    NOTE: BYOL's online linear classifier on stop-gradient embeddings (deepmind-research
    byol/byol_experiment.py) is left out: it cannot change the backbone, and the kNN monitor takes
    its place as the running measure of the features."""
    p1, p2 = predictions
    z1, z2 = targets
    return regression_loss(p1, z2) + regression_loss(p2, z1)


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

    model = BYOL(cfg).to(dist.device, memory_format=memory_format)
    target = common.make_target({"backbone": model.backbone, "projector": model.projector})
    if cfg.sync_bn and dist.device.type == "cuda" and dist.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        target = nn.SyncBatchNorm.convert_sync_batchnorm(target)
    ema_pairs = common.ema_pairs(target, model)
    groups = common.lars_param_groups(model, cfg.weight_decay, {"predictor": cfg.predictor_lr_mult})
    optimizer = common.byol_optimizer(cfg.optimizer, groups, peak_lr)  # LARS or plain SGD

    step = 0
    if common.should_resume(cfg):  # --resume, or a torchrun --max-restarts restart with a last.pt
        state = common.load_checkpoint(f"{cfg.out}/last.pt", method="byol")
        common.check_resume_compatible(state, cfg)
        model.load_state_dict(state["model"])
        target.load_state_dict(state["target"])
        optimizer.load_state_dict(state["optimizer"])
        common.set_rng_state(state["rng"])
        step = state["step"]
        print0(f"resumed from {cfg.out}/last.pt at step {step}")

    ddp_model = DistributedDataParallel(model) if dist.world_size > 1 else model
    online_forward = ddp_model
    target_forward = (lambda views: [embed(target, view) for view in views])
    common.compile_colour_ops(cfg.compile)  # --compile also fuses the colour-jitter ops
    if cfg.compile:
        online_forward = torch.compile(online_forward)
        target_forward = torch.compile(target_forward)

    common.print_run_header("byol", cfg, dist, dict(
        peak_lr=peak_lr, batch_per_rank=batch_per_rank, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps))
    log = common.MetricsLog(f"{cfg.out}/metrics.jsonl", dist.is_main)
    stop = common.StopSignal()

    def save(epoch, reason):
        if dist.is_main:
            state = dict(method="byol", config=common.config_dict(cfg), step=step, epoch=epoch,
                         model=model.state_dict(), target=target.state_dict(),
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
            loss = byol_loss(predictions, targets)

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
                values = common.check_finite(step, dict(loss=loss), f"{cfg.out}/last.pt")
                images_per_s, data_wait = timer.rate()
                bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.3g}", tau=f"{tau:.4f}",
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
    """--show: <out>/show.png, the two views of four images as train() makes them at step 0."""
    images, generator = common.show_batch(cfg, dist)
    recipes = [dataclasses.replace(recipe, crop_scale=(cfg.crop_min_scale, 1.0))
               for recipe in common.BYOL_VIEWS]
    views, boxes, flips = zip(*(augment(images, recipe, cfg.image_size, generator)
                                for recipe in recipes))
    return common.save_picture(
        common.view_rows(images, views, boxes, flips), f"{cfg.out}/show.png",
        "per image: the crops of view 1 (yellow) and view 2 (cyan), then the views ('flip' = "
        "mirrored; BYOL_VIEWS: view 1 is always blurred, view 2 rarely, and solarized at p 0.2)")


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
