"""Evaluate the frozen backbone of any checkpoint of this repo: weighted kNN and a linear probe, per stage.

Works for every method file (byol, ladder_byol, dense_byol, densesiam, lewel, mcl): it reads only the checkpoint
(the backbone lives under the `backbone.` prefix, the architecture in the saved config), never the method code.

    python eval_linear.py --ckpt runs/byol/last.pt                       # kNN + fast linear probe on res5
    python eval_linear.py --ckpt runs/byol/last.pt --random-init         # same architecture at initialisation
    python eval_linear.py --ckpt runs/byol/last.pt,runs/ladder_byol/last.pt --stage res2,res3,res4,res5
                                                                         # Ladder paper Table 7 layout
    torchrun --nproc_per_node=8 eval_linear.py --ckpt last.pt --data /path/to/imagenet --probe augmented
    python eval_linear.py --ckpt runs/byol/last.pt --export resnet.pth   # torchvision ResNet state_dict

Protocols:
    kNN      weighted kNN on L2-normalised global-average-pooled features, k=200, T=0.1 (InstDisc rule).
    fast     linear classifier on cached features of the centre view (standardised per channel, like a BN without
             affine in front of the classifier): SGD momentum 0.9, cosine lr, no weight decay. For small data.
    augmented  the standard ImageNet protocol (BYOL/SimSiam style): frozen backbone in eval mode, RandomResizedCrop +
             flip on the fly for training, resize + centre crop for validation, SGD momentum 0.9 (Nesterov), cosine
             lr, no weight decay.
"""

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import InputError, print0

STAGE_NAMES = common.STAGES


@dataclasses.dataclass(frozen=True)
class Config:
    """Evaluate a checkpoint's frozen backbone (kNN + linear probe)."""
    ckpt: tuple = ()                  # one or more checkpoints (comma list); rows of the table
    stage: tuple = ("res5",)          # stages to probe (comma list of res2,res3,res4,res5); columns of the table
    data: str = ""                    # "" = the data the checkpoint was trained on
    image_size: int = 0               # 0 = the checkpoint's image size
    random_init: bool = False         # evaluate the same architecture at initialisation instead of the weights
    probe: str = "fast"               # fast (cached features) | augmented (standard ImageNet protocol) | none (kNN only)
    probe_epochs: int = 100           # fast: 100; augmented: 90 (SimSiam) / 80 (BYOL)
    probe_lr: float = 0.0             # 0 = 1.0 for fast, 0.1 * batch/256 for augmented
    batch_size: int = 256             # global batch of the probe
    knn_k: int = 200
    knn_t: float = 0.1
    seed: int = 0
    workers: int = 8
    export: str = ""                  # write the backbone as a torchvision ResNet state_dict to this path
    export_all: bool = False          # also export every other module of the online network (e.g. MCL's fpn./head.)
    device: str = ""


def load_backbone(path, random_init=False):
    """Build a common.ResNetTrunk from a checkpoint's config and load its `backbone.` weights."""
    state = common.load_checkpoint(path)
    saved = state["config"]
    if "arch" not in saved or "stem" not in saved:
        raise InputError(f"checkpoint {path} has no arch/stem in its config")
    backbone = common.ResNetTrunk(saved["arch"], saved["stem"])
    weights = {key[len("backbone."):]: value for key, value in state["model"].items() if key.startswith("backbone.")}
    if not weights:
        raise InputError(f"checkpoint {path} holds no backbone weights (no 'backbone.' entries in its model)")
    if not random_init:
        try:
            backbone.load_state_dict(weights)
        except RuntimeError as error:
            raise InputError(f"checkpoint {path}: backbone weights do not fit {saved['arch']}/{saved['stem']}: "
                             f"{str(error).splitlines()[0]}") from None
    return backbone, state


def export_weights(state, path, include_all=False):
    """Save the backbone as a torchvision ResNet state_dict (no fc), and optionally the other online modules.

    The trunk uses torchvision's attribute names, so `torchvision.models.resnet50().load_state_dict(sd, strict=False)`
    loads it (only fc.* is missing). With include_all, other modules keep their prefix (e.g. `fpn.`, `head.`).
    """
    exported = {}
    for key, value in state["model"].items():
        if key.startswith("backbone."):
            exported[key[len("backbone."):]] = value
        elif include_all:
            exported[key] = value
    common.save_checkpoint(exported, path)
    return exported


def train_fast_probe(train_x, train_y, val_x, val_y, epochs, lr, batch_size, seed):
    """Linear classifier on cached features. Returns top-1 (%) on the validation features."""
    mean, std = train_x.mean(dim=0), train_x.std(dim=0) + 1e-6
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    generator = torch.Generator().manual_seed(seed)
    classifier = nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
    nn.init.normal_(classifier.weight, std=0.01, generator=generator)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9)
    steps_per_epoch = math.ceil(train_x.shape[0] / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    for epoch in common.progress(range(epochs), common.is_main(), desc="linear probe", leave=False):
        order = torch.randperm(train_x.shape[0], generator=generator).to(train_x.device)
        for start in range(0, train_x.shape[0], batch_size):
            index = order[start:start + batch_size]
            for group in optimizer.param_groups:
                group["lr"] = common.lr_at(step, total, 0, lr)
            loss = F.cross_entropy(classifier(train_x[index]), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    with torch.no_grad():
        return (classifier(val_x).argmax(dim=1) == val_y).float().mean().item() * 100


def train_augmented_probe(backbone, stage, train_loader, val_loader, image_size, epochs, lr, dist, autocast_dtype,
                          memory_format):
    """Standard protocol: frozen backbone (eval mode), RandomResizedCrop + flip, SGD Nesterov, cosine, no decay."""
    recipe = common.ViewRecipe(crop_scale=(0.08, 1.0), interpolation="bilinear", jitter_p=0.0, gray_p=0.0,
                               blur_p=0.0, solarize_p=0.0)
    backbone.eval()
    classifier = None
    total = epochs * len(train_loader)
    step = 0
    for epoch in range(epochs):
        train_loader.set_epoch(epoch)
        for images, labels in common.progress(train_loader, dist.is_main, desc=f"probe epoch {epoch + 1}/{epochs}",
                                              leave=False):
            generator = common.step_generator(dist.device, 1234, dist.rank, step)
            views = augment_views(images, recipe, image_size, generator, memory_format)
            with torch.no_grad(), torch.autocast(dist.device.type, dtype=autocast_dtype or torch.bfloat16,
                                                 enabled=autocast_dtype is not None):
                features = common.global_pool(backbone(views, last_stage=stage)[stage]).float()
            if classifier is None:
                num_classes = int(common.all_gather_nograd(labels.max().view(1)).max()) + 1
                # BN without affine in front of the classifier: standardises features (MAE/MoCo v3 linear probe)
                layer = nn.Sequential(nn.BatchNorm1d(features.shape[1], affine=False),
                                      nn.Linear(features.shape[1], num_classes)).to(dist.device)
                classifier = (torch.nn.parallel.DistributedDataParallel(layer) if dist.world_size > 1 else layer)
                optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9, nesterov=True)
            for group in optimizer.param_groups:
                group["lr"] = common.lr_at(step, total, 0, lr)
            loss = F.cross_entropy(classifier(features), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    classifier.eval()
    correct = torch.zeros(2, device=dist.device)
    with torch.no_grad():
        for images, labels in val_loader:
            x = common.eval_transform(images, image_size).contiguous(memory_format=memory_format)
            with torch.autocast(dist.device.type, dtype=autocast_dtype or torch.bfloat16,
                                enabled=autocast_dtype is not None):
                features = common.global_pool(backbone(x, last_stage=stage)[stage]).float()
            correct += torch.stack([(classifier(features).argmax(dim=1) == labels).sum().float(),
                                    torch.tensor(float(labels.numel()), device=dist.device)])
    if dist.world_size > 1:
        torch.distributed.all_reduce(correct)
    return (correct[0] / correct[1]).item() * 100


def augment_views(images, recipe, image_size, generator, memory_format):
    return common.augment(images, recipe, image_size, generator)[0].contiguous(memory_format=memory_format)


def evaluate(cfg, dist):
    autocast_dtype, memory_format = common.cuda_setup(dist)
    for stage in cfg.stage:
        common.check(stage in STAGE_NAMES, f"--stage {stage!r} is not one of {', '.join(STAGE_NAMES)}")
    common.check(cfg.probe in ("fast", "augmented", "none"), f"--probe must be fast, augmented or none, got {cfg.probe!r}")
    common.check(len(cfg.ckpt) > 0, "--ckpt is required (one checkpoint or a comma list)")
    common.check(cfg.batch_size > 0 and cfg.batch_size % dist.world_size == 0,
                 f"--batch-size {cfg.batch_size} must be positive and divisible by the world size {dist.world_size}")
    rows = {}
    for path in cfg.ckpt:
        torch.manual_seed(cfg.seed)
        backbone, state = load_backbone(path, cfg.random_init)
        if cfg.export:
            if dist.is_main:
                exported = export_weights(state, cfg.export, cfg.export_all)
                print0(f"exported {len(exported)} tensors to {cfg.export}")
            if cfg.probe == "none" and not cfg.stage:
                continue
        saved = state["config"]
        data = cfg.data or saved.get("data", "synthetic")
        image_size = cfg.image_size or saved["image_size"]
        synthetic_size = saved.get("synthetic_size", 2560)
        folder = data not in ("synthetic", "cifar10")
        load_size = image_size * 256 // 224 if folder else image_size
        backbone = backbone.to(dist.device, memory_format=memory_format)
        per_rank = max(cfg.batch_size // dist.world_size, 1)
        bank = common.make_loader(data, "train", image_size, per_rank, dist, cfg.seed, cfg.workers, shuffle=False,
                                  drop_last=False, synthetic_size=synthetic_size, load_size=load_size)
        val = common.make_loader(data, "val", image_size, per_rank, dist, cfg.seed, cfg.workers, shuffle=False,
                                 drop_last=False, synthetic_size=synthetic_size, load_size=load_size)
        label = f"{path}{' (random init)' if cfg.random_init else ''}"
        rows[label] = {}
        for stage in cfg.stage:
            train_x, train_y = common.extract_features(backbone, bank, image_size, stage, autocast_dtype, memory_format,
                                                       show_progress=True)
            val_x, val_y = common.extract_features(backbone, val, image_size, stage, autocast_dtype, memory_format,
                                                   show_progress=True)
            knn = common.knn_accuracy(train_x, train_y, val_x, val_y, cfg.knn_k, cfg.knn_t)
            result = dict(knn=knn)
            if cfg.probe == "fast":
                result["linear"] = train_fast_probe(train_x, train_y, val_x, val_y, cfg.probe_epochs,
                                                    cfg.probe_lr or 1.0, min(cfg.batch_size, train_x.shape[0]), cfg.seed)
            elif cfg.probe == "augmented":
                train = common.make_loader(data, "train", image_size, per_rank, dist, cfg.seed, cfg.workers,
                                           synthetic_size=synthetic_size, load_size=load_size)
                lr = cfg.probe_lr or 0.1 * cfg.batch_size / 256
                result["linear"] = train_augmented_probe(backbone, stage, train, val, image_size, cfg.probe_epochs, lr,
                                                         dist, autocast_dtype, memory_format)
            rows[label][stage] = result
            print0(f"{label} {stage}: kNN top-1 {knn:.2f}%"
                   + (f", linear top-1 {result['linear']:.2f}%" if "linear" in result else ""))
    print_table(rows, cfg.stage)
    return rows


def print_table(rows, stages):
    """Rows = checkpoints, columns = stages (the Ladder paper's Table 7 layout), one block per metric."""
    if not rows:
        return
    width = max(len(label) for label in rows) + 2
    for metric in ("knn", "linear"):
        if not any(metric in cell for row in rows.values() for cell in row.values()):
            continue
        print0(f"\n{metric} top-1 (%)".ljust(width) + "".join(f"{stage:>9}" for stage in stages))
        for label, row in rows.items():
            print0(label.ljust(width) + "".join(f"{row[stage][metric]:9.2f}" for stage in stages))


def main(argv=None):
    try:
        cfg = common.parse_config(Config, {}, argv)
        dist = common.setup_distributed(cfg.device or None)
        return evaluate(cfg, dist)
    except InputError as error:
        common.die(str(error))
    finally:
        common.cleanup_distributed()


if __name__ == "__main__":
    main()
