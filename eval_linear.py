"""Evaluate the frozen backbone of any checkpoint of this repo: weighted kNN and a linear probe, per stage.

Works for every method file (byol, ladder_byol, dense_byol, densesiam, lewel, mcl): it reads only the checkpoint
(the backbone lives under the `backbone.` prefix, the architecture in the saved config), never the method code.

    python eval_linear.py --ckpt runs/byol/last.pt                       # kNN + fast linear probe on res5
    python eval_linear.py --ckpt runs/byol/last.pt --random-init         # same architecture at initialisation
    python eval_linear.py --ckpt runs/byol/last.pt,runs/ladder_byol/last.pt --stage res2,res3,res4,res5
                                                                         # Ladder paper Table 7 layout
    torchrun --nproc_per_node=8 eval_linear.py --ckpt last.pt --data /path/to/imagenet --probe augmented
    python eval_linear.py --ckpt runs/byol/last.pt,runs/ladder_byol/last.pt --stage res2,res3,res4,res5 --view-distance
                                                                         # Ladder paper Fig. 3: two-view distances
    python eval_linear.py --ckpt runs/byol/last.pt --export resnet.pth   # torchvision ResNet state_dict
    python eval_linear.py --ckpt runs/mcl/last.pt --export resnet.pth --export-detectron2 mcl_d2.pth --stage ""
                                                                         # + resnet_fpn_head.pth, detectron2 names

Protocols:
    kNN      weighted kNN on L2-normalised global-average-pooled features, k=200, T=0.1 (InstDisc rule).
    fast     linear classifier on cached features of the centre view (standardised per channel, like a BN without
             affine in front of the classifier): SGD momentum 0.9, cosine lr, no weight decay. For small data.
    augmented  the standard ImageNet protocol (BYOL/SimSiam style): frozen backbone in eval mode, RandomResizedCrop +
             flip on the fly for training, resize + centre crop for validation, SGD momentum 0.9 (Nesterov), cosine
             lr, no weight decay.
    view distance  (--view-distance, instead of kNN and probe) two BYOL views of every val image (seeded: the same
             views for every checkpoint of the same image size and crop scale), frozen backbone in eval mode; the
             euclidean distance between the two views' GAP features per stage: raw (as the paper's Fig. 3), between
             l2-normalised features, and relative to the distance between features of different images.
"""

import dataclasses
import math
from pathlib import Path

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
    random_init: bool = False         # also evaluate the first checkpoint's architecture at initialisation (first row)
    probe: str = "fast"               # fast (cached features) | augmented (standard ImageNet protocol) | none (kNN only)
    probe_epochs: int = 100           # fast: 100; augmented: 90 (SimSiam) / 80 (BYOL)
    probe_lr: float = 0.0             # 0 = 1.0 for fast, 0.1 * batch/256 for augmented
    batch_size: int = 256             # global batch of the probe
    knn_k: int = 200
    knn_t: float = 0.1
    seed: int = 0
    workers: int = 8
    view_distance: bool = False       # instead of kNN/probe: two-view GAP-feature distances per stage (Ladder Fig. 3)
    view_crop_min_scale: float = 0.0  # crop scale (lo, 1) of those views; 0 = the checkpoint's crop_min_scale (or 0.08)
    export: str = ""                  # write the backbone as a torchvision ResNet state_dict to this path; for MCL also
                                      # its FPN and head to <path stem>_fpn_head<suffix> (see fpn_head_weights)
    export_all: bool = False          # also export every other module of the online network into the same file
    export_detectron2: str = ""       # write backbone (+ MCL's FPN, box-head convs) under detectron2 names to this path
    device: str = ""


def load_backbone(path, random_init=False):
    """Build a common.ResNetTrunk from a checkpoint's config and load its `backbone.` weights."""
    state = common.load_checkpoint(path)
    saved = state["config"]
    if "arch" not in saved or "stem" not in saved:
        raise InputError(f"checkpoint {path} has no arch/stem in its config")
    backbone = common.ResNetTrunk(saved["arch"], saved["stem"])
    weights = backbone_weights(state["model"])
    if not weights:
        raise InputError(f"checkpoint {path} holds no backbone weights (no 'backbone.' entries in its model)")
    if not random_init:
        try:
            backbone.load_state_dict(weights)
        except RuntimeError as error:
            raise InputError(f"checkpoint {path}: backbone weights do not fit {saved['arch']}/{saved['stem']}: "
                             f"{str(error).splitlines()[0]}") from None
    return backbone, state


# ---------------------------------------------------------------------------------------------------------------------
# Export: torchvision backbone, MCL's FPN and head, detectron2 names
# ---------------------------------------------------------------------------------------------------------------------

def backbone_weights(model_state):
    """A checkpoint model's `backbone.` entries without the prefix: torchvision names (conv1, layer1.0.bn2, ...)."""
    return {key[len("backbone."):]: value for key, value in model_state.items() if key.startswith("backbone.")}


def fpn_head_weights(model_state):
    """MCL's FPN and region head under the checkpoint's own names ({} for a checkpoint without them):

        fpn.lateral.pK.conv.weight, fpn.lateral.pK.norm.*   1x1 lateral conv (no bias) + BN on resK
        fpn.output.pK.conv.weight, fpn.output.pK.norm.*     3x3 output conv (no bias) + BN giving PK
        head.convs.I.conv.weight, head.convs.I.norm.*       region head conv I = 0..3 (3x3, no bias) + BN (+ ReLU)
        head.mlp.*                                          region head MLP (pretraining only; no detector counterpart)

    `.norm.*` = weight, bias, running_mean, running_var, num_batches_tracked. They load with strict=True into
    mcl.FPN / mcl.RegionHead after dropping the `fpn.` / `head.` prefix (the paper transfers all three modules).
    """
    return {key: value for key, value in model_state.items() if key.startswith(("fpn.", "head."))}


def companion_path(path, tag):
    """resnet.pth, "fpn_head" -> resnet_fpn_head.pth (next to the backbone file)."""
    path = Path(path)
    return path.with_name(f"{path.stem}_{tag}{path.suffix}")


def detectron2_name(key):
    """detectron2 name of one torchvision-backbone or MCL fpn./head. key; None for tensors a detector does not take."""
    parts = key.split(".")
    tensor = parts[-1]
    if tensor == "num_batches_tracked":      # FrozenBN (detectron2's default) has none; SyncBN restarts it at 0 (logged
        return None                          # as missing; it only matters with momentum=None)
    if parts[0] in ("conv1", "bn1"):         # conv1.weight, bn1.<tensor>
        return "backbone.bottom_up.stem.conv1." + ("norm." if parts[0] == "bn1" else "") + tensor
    if parts[0].startswith("layer"):         # layerN.B.convK.weight, layerN.B.bnK.<tensor>, layerN.B.downsample.{0,1}.*
        stage, block, module = f"res{int(parts[0][len('layer'):]) + 1}", parts[1], parts[2]
        if module == "downsample":
            module = "shortcut" if parts[3] == "0" else "shortcut.norm"
        elif module.startswith("bn"):
            module = f"conv{module[len('bn'):]}.norm"
        return f"backbone.bottom_up.{stage}.{block}.{module}.{tensor}"
    if parts[0] == "fpn":                    # fpn.{lateral,output}.pK.{conv,norm}.<tensor>
        return f"backbone.fpn_{parts[1]}{parts[2][1:]}." + ("norm." if parts[3] == "norm" else "") + tensor
    if parts[:2] == ["head", "convs"]:       # head.convs.I.{conv,norm}.<tensor>
        return f"roi_heads.box_head.conv{int(parts[2]) + 1}." + ("norm." if parts[3] == "norm" else "") + tensor
    if parts[:2] == ["head", "mlp"]:         # detectron2's fc1 reads the flattened 7x7 RoI map: another shape
        return None
    raise InputError(f"no detectron2 name for checkpoint tensor {key!r}")


def detectron2_names(weights):
    """Rename a torchvision-named ResNet (+ MCL's fpn./head. entries) to a detectron2 R-FPN Mask R-CNN state_dict.

    Pure dict renaming (same tensors, new keys):
        conv1 / bn1                       -> backbone.bottom_up.stem.conv1 / stem.conv1.norm
        layerN.B.convK / bnK              -> backbone.bottom_up.res{N+1}.B.convK / convK.norm
        layerN.B.downsample.0 / .1        -> backbone.bottom_up.res{N+1}.B.shortcut / shortcut.norm
        fpn.lateral.pK.conv / .norm       -> backbone.fpn_lateralK / fpn_lateralK.norm
        fpn.output.pK.conv / .norm        -> backbone.fpn_outputK / fpn_outputK.norm
        head.convs.I.conv / .norm         -> roi_heads.box_head.conv{I+1} / conv{I+1}.norm
    Dropped: every num_batches_tracked and head.mlp.*.
    NOTE: targets detectron2's configs/Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml (SyncBN in the ResNet, the FPN and a
    4conv1fc box head, so every conv above has a `.norm` and no bias), with MODEL.WEIGHTS = this file,
    RESNETS.STRIDE_IN_1X1 False (torchvision strides the 3x3 conv), FPN.OUT_CHANNELS and ROI_BOX_HEAD.CONV_DIM =
    the checkpoint's fpn_dim, and torchvision's input convention (INPUT.FORMAT RGB, PIXEL_MEAN [123.675, 116.28,
    103.53], PIXEL_STD [58.395, 57.12, 57.375]), as detectron2's tools/convert-torchvision-to-d2.py documents;
    ResNet-18/34 also need RESNETS.DEPTH and RES2_OUT_CHANNELS 64. Written from detectron2's module names and
    never loaded into detectron2 here (it is not a dependency of this repo).
    """
    renamed = {}
    for key, value in weights.items():
        name = detectron2_name(key)
        if name is not None:
            renamed[name] = value
    return renamed


def export_weights(state, path, include_all=False):
    """Save the backbone as a torchvision ResNet state_dict (no fc), and optionally the other online modules.

    The trunk uses torchvision's attribute names, so `torchvision.models.resnet50().load_state_dict(sd, strict=False)`
    loads it (only fc.* is missing). With include_all, other modules keep their prefix (e.g. `fpn.`, `head.`).
    """
    exported = backbone_weights(state["model"])
    if include_all:
        exported.update({key: value for key, value in state["model"].items() if not key.startswith("backbone.")})
    common.save_checkpoint(exported, path)
    return exported


def export_all_formats(cfg, state):
    """--export (+ MCL's FPN/head file beside it) and --export-detectron2 of one checkpoint. Rank 0 only."""
    model_state = state["model"]
    if cfg.export:
        exported = export_weights(state, cfg.export, cfg.export_all)
        print0(f"exported {len(exported)} tensors to {cfg.export}")
        fpn_head = fpn_head_weights(model_state)
        if fpn_head:
            path = companion_path(cfg.export, "fpn_head")
            common.save_checkpoint(fpn_head, path)
            print0(f"exported {len(fpn_head)} FPN and head tensors to {path}")
    if cfg.export_detectron2:
        stem = state["config"]["stem"]
        common.check(stem == "imagenet", f"--export-detectron2 needs the imagenet stem (detectron2's 7x7 stem), "
                                         f"the checkpoint has {stem!r}")
        renamed = detectron2_names({**backbone_weights(model_state), **fpn_head_weights(model_state)})
        # detectron2's checkpointer reads a .pth as {"model": state_dict}; exact names, no matching heuristics needed
        common.save_checkpoint({"model": renamed, "__author__": "eval_linear.py"}, cfg.export_detectron2)
        print0(f"exported {len(renamed)} tensors under detectron2 names to {cfg.export_detectron2}")


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


# ---------------------------------------------------------------------------------------------------------------------
# Two-view distances per stage (Ladder Siamese Network, Sec. 4 "Analyses on intermediate representations", Fig. 3)
# ---------------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def two_view_features(backbone, loader, recipes, image_size, stages, seed, rank, autocast_dtype=None,
                      memory_format=torch.contiguous_format):
    """GAP features of two augmented views of every image, per stage: {stage: (view1 N x C, view2 N x C)} float32.

    Batch b draws both views from common.step_generator(seed, rank, b) (view 1 first). The loader is unshuffled, so
    every checkpoint evaluated with the same seed, image size and crop scale sees exactly the same views.
    """
    backbone.eval()
    last_stage = max(stages, key=STAGE_NAMES.index)
    first, second = {stage: [] for stage in stages}, {stage: [] for stage in stages}
    for batch_index, (images, _) in enumerate(loader):
        generator = common.step_generator(images.device, seed, rank, batch_index)
        views = torch.cat([augment_views(images, recipe, image_size, generator, memory_format) for recipe in recipes])
        with torch.autocast(views.device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            maps = backbone(views, last_stage=last_stage)
        for stage in stages:
            view1, view2 = common.global_pool(maps[stage]).float().chunk(2)   # B x C each
            first[stage].append(view1)
            second[stage].append(view2)
    return {stage: (common.gather_ragged(torch.cat(first[stage])), common.gather_ragged(torch.cat(second[stage])))
            for stage in stages}


def distance_summary(distances):
    """Mean and quartiles of a 1-D tensor of distances."""
    quartiles = torch.quantile(distances, torch.tensor([0.25, 0.5, 0.75], device=distances.device)).tolist()
    return dict(mean=distances.mean().item(), p25=quartiles[0], median=quartiles[1], p75=quartiles[2])


def view_distance_stats(view1, view2):
    """Euclidean distances between the two views' features of each image (N x C each), three ways:

    view_raw         ||f(v1) - f(v2)||, the paper's Fig. 3 quantity (raw pooled features)
    view_normalised  the same between l2-normalised features: sqrt(2 - 2 cos), in [0, 2]
    view_ratio       mean raw two-view distance / mean raw distance between different images (view 1 of image i
                     against view 2 of image i-1): below 1 = views closer together than unrelated images
    NOTE: the raw distance is not comparable across stages or checkpoints: it scales with the feature norm, which
    differs between stages (width, depth) and between checkpoints (learned BN scales, more or less sparse ReLU
    outputs), so a smaller raw distance can mean smaller features, not more invariant ones. view_normalised and
    view_ratio are invariant to a rescaling of the features; compare checkpoints (Ladder vs BYOL) on those.
    """
    raw = (view1 - view2).norm(dim=1)
    normalised = (F.normalize(view1, dim=1) - F.normalize(view2, dim=1)).norm(dim=1)
    different = (view1 - view2.roll(1, dims=0)).norm(dim=1)
    return dict(view_raw=distance_summary(raw), view_normalised=distance_summary(normalised),
                view_ratio=raw.mean().item() / max(different.mean().item(), 1e-12))


def evaluate(cfg, dist):
    autocast_dtype, memory_format = common.cuda_setup(dist)
    for stage in cfg.stage:
        common.check(stage in STAGE_NAMES, f"--stage {stage!r} is not one of {', '.join(STAGE_NAMES)}")
    common.check(cfg.probe in ("fast", "augmented", "none"), f"--probe must be fast, augmented or none, got {cfg.probe!r}")
    common.check(len(cfg.ckpt) > 0, "--ckpt is required (one checkpoint or a comma list)")
    common.check(cfg.batch_size > 0 and cfg.batch_size % dist.world_size == 0,
                 f"--batch-size {cfg.batch_size} must be positive and divisible by the world size {dist.world_size}")
    common.check(0 <= cfg.view_crop_min_scale <= 1,
                 f"--view-crop-min-scale must be in [0, 1], got {cfg.view_crop_min_scale}")
    rows = {}
    # --random-init adds a baseline row: the first checkpoint's architecture and data, seeded initial weights.
    entries = ([(cfg.ckpt[0], True)] if cfg.random_init else []) + [(path, False) for path in cfg.ckpt]
    for path, random_init in entries:
        torch.manual_seed(cfg.seed)
        backbone, state = load_backbone(path, random_init)
        if (cfg.export or cfg.export_detectron2) and dist.is_main and not random_init:
            export_all_formats(cfg, state)
        if not cfg.stage:  # --stage "": export only
            continue
        saved = state["config"]
        data = cfg.data or saved.get("data", "synthetic")
        image_size = cfg.image_size or saved["image_size"]
        synthetic_size = saved.get("synthetic_size", 2560)
        folder = data not in ("synthetic", "cifar10")
        load_size = image_size * 256 // 224 if folder else image_size
        backbone = backbone.to(dist.device, memory_format=memory_format)
        per_rank = max(cfg.batch_size // dist.world_size, 1)
        val = common.make_loader(data, "val", image_size, per_rank, dist, cfg.seed, cfg.workers, shuffle=False,
                                 drop_last=False, synthetic_size=synthetic_size, load_size=load_size)
        label = f"{path}{' (random init)' if random_init else ''}"
        rows[label] = {}
        if cfg.view_distance:
            # NOTE: the pretraining's BYOL view pair and crop scale (the paper: "two random data-augmented views");
            # a checkpoint without crop_min_scale (densesiam: SimSiam crops 0.2-1) gets BYOL's 0.08.
            min_scale = cfg.view_crop_min_scale or saved.get("crop_min_scale", 0.08)
            recipes = [dataclasses.replace(recipe, crop_scale=(min_scale, 1.0)) for recipe in common.BYOL_VIEWS]
            features = two_view_features(backbone, val, recipes, image_size, cfg.stage, cfg.seed, dist.rank,
                                         autocast_dtype, memory_format)
            print0(f"{label}: two BYOL views of {len(features[cfg.stage[0]][0])} val images, {image_size} px, "
                   f"crop scale ({min_scale}, 1)")
            for stage in cfg.stage:
                result = rows[label][stage] = view_distance_stats(*features[stage])
                print0(f"{label} {stage}: two-view distance raw {format_cell(result['view_raw'])}, l2-normalised "
                       f"{format_cell(result['view_normalised'])}, ratio to different images "
                       f"{format_cell(result['view_ratio'])}")
            continue
        bank = common.make_loader(data, "train", image_size, per_rank, dist, cfg.seed, cfg.workers, shuffle=False,
                                  drop_last=False, synthetic_size=synthetic_size, load_size=load_size)
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


METRICS = (("knn", "knn top-1 (%)"),
           ("linear", "linear top-1 (%)"),
           ("view_raw", "two-view distance, raw GAP features (mean / p25-p75)"),
           ("view_normalised", "two-view distance, l2-normalised GAP features, range 0-2 (mean / p25-p75)"),
           ("view_ratio", "two-view distance / distance between different images (raw GAP features)"))


def format_cell(value):
    """A distance summary as "mean / p25-p75" (two significant decimals at least), any other number as %.2f."""
    if isinstance(value, dict):
        mean = value["mean"]
        decimals = max(2, 1 - math.floor(math.log10(mean))) if mean > 0 else 2
        return f"{mean:.{decimals}f} / {value['p25']:.{decimals}f}-{value['p75']:.{decimals}f}"
    return f"{value:.2f}"


def print_table(rows, stages):
    """Rows = checkpoints, columns = stages (the Ladder paper's Table 7 layout), one block per metric."""
    if not rows:
        return
    width = max(len(label) for label in list(rows) + ["checkpoint"]) + 2
    for metric, title in METRICS:
        if not any(metric in cell for row in rows.values() for cell in row.values()):
            continue
        cells = {label: [format_cell(row[stage][metric]) for stage in stages] for label, row in rows.items()}
        column = max(len(text) for text in [*stages, *(text for line in cells.values() for text in line)]) + 2
        print0(f"\n{title}")
        print0("checkpoint".ljust(width) + "".join(stage.rjust(column) for stage in stages))
        for label, line in cells.items():
            print0(label.ljust(width) + "".join(text.rjust(column) for text in line))


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
