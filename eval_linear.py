"""Evaluate the frozen backbone of any checkpoint of this repo: weighted kNN and a linear probe, per
stage.

Works for every method file (byol, ladder_byol, dense_byol, densesiam, lewel, mcl): it reads only
the checkpoint (the backbone lives under the `backbone.` prefix, the architecture in the saved
config), never the method code.

    python eval_linear.py --ckpt runs/byol/last.pt        # kNN + fast linear probe on res5
    python eval_linear.py --ckpt runs/byol/last.pt \
             --random-init                                # same architecture at initialisation
    python eval_linear.py --ckpt runs/byol/last.pt,runs/ladder_byol/last.pt \
             --stage res2,res3,res4,res5                  # Ladder paper Table 7 layout
    torchrun --nproc_per_node=8 eval_linear.py --ckpt last.pt --data /path/to/imagenet \
             --protocol byol                              # a paper's protocol (see PROTOCOLS)
    python eval_linear.py --ckpt runs/byol/last.pt,runs/ladder_byol/last.pt \
             --stage res2,res3,res4,res5 --view-distance  # Ladder paper Fig. 3: two-view distances
    python eval_linear.py --ckpt runs/byol/last.pt,runs/ladder_byol/last.pt --random-init --dense \
             --stage res2,res3,res4,res5,pixels \
             --report results.md                          # + dense mIoU, one report
    python eval_linear.py --ckpt runs/byol_s0/last.pt,runs/byol_s1/last.pt,runs/byol_s2/last.pt \
             --report results.md                          # + mean +- std over the seeds
    python eval_linear.py --ckpt runs/mcl/last.pt --dense --data /path/to/VOCdevkit/VOC2012 \
             --image-size 224 --stage res2,p2,p3,p4,p5    # MCL's FPN levels, VOC
    python eval_linear.py --ckpt runs/byol/last.pt \
             --export resnet.pth                          # torchvision ResNet state_dict
    python eval_linear.py --ckpt runs/mcl/last.pt --export resnet.pth \
             --export-detectron2 mcl_d2.pth --stage ""    # + resnet_fpn_head.pth, detectron2 names

Protocols (kNN always; the linear probe by --protocol, values in PROTOCOLS below):
    kNN      weighted kNN on L2-normalised global-average-pooled features, k=200, T=0.1
             (InstDisc rule).
    fast     (default) linear classifier on cached features of the centre view (standardised per
             channel, like a BN without affine in front of the classifier): SGD momentum 0.9,
             cosine lr, no weight decay. A quick probe for small data, no paper's protocol.
    byol, ladder, lewel_b, lewel_m   each paper's linear evaluation as it states it: frozen
             backbone in eval mode, a linear classifier (N(0, 0.01) init) on its pooled features,
             RandomResizedCrop (scale 0.08-1) + flip for training, resize to 256/224 of the view +
             centre crop for validation; optimiser, batch, epochs, lr and schedule from the paper.
             byol first sweeps its lr on a held-out part of the train set (the whole grid in one
             pass: one classifier per lr on the same features), then trains on the whole train set
             with the best one. --probe-epochs / --probe-batch-size / --probe-lr override (step
             milestones scale with the epochs, the lr linearly with the batch). DenseSiam and MCL
             state no linear protocol (they fine-tune detectors and segmenters; see transfer.py).
    none     kNN only.
    dense    (--dense, besides kNN and the probe when the data has image labels) a per-pixel linear
             classifier on each frozen feature map (standardised per channel with the train set's
             mean and std, then a 1x1 conv; logits upsampled bilinearly to the label size),
             cross-entropy over the labelled pixels (255 = ignore), SGD momentum 0.9, cosine lr
             per step, no weight decay, no augmentation (the loader's centre square at
             --image-size), all stages trained together on one forward pass per batch; scored by
             mIoU on the val split (common.segmentation_iou). No paper's protocol (the papers
             fine-tune segmenters). Stages: res2..res5, p2..p5 (an MCL checkpoint's FPN) and
             "pixels" (the normalised input: what colour alone tells a linear classifier).
             Data: --data synthetic (make_synthetic's masks: background or the digit), or a
             folder in one of common.DENSE_LAYOUTS (Pascal VOC, <split>/images + <split>/masks,
             cocostuff.py's output).
    view distance  (--view-distance, instead of kNN and probe) two BYOL views of every val image
             (seeded: the same views for every checkpoint of the same image size and crop scale),
             frozen backbone in eval mode; the euclidean distance between the two views' GAP
             features per stage: raw (as the paper's Fig. 3), between l2-normalised features, and
             relative to the distance between features of different images.
"""

import copy
import dataclasses
import datetime
import json
import math
import os
import shlex
import statistics
from collections import OrderedDict
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
    stage: tuple = ("res5",)          # stages to probe (comma list of res2,res3,res4,res5);
                                      # the columns of the table
    data: str = ""                    # "" = the data the checkpoint was trained on
    image_size: int = 0               # 0 = the checkpoint's image size
    random_init: bool = False         # also evaluate the first checkpoint's architecture at
                                      # initialisation (first row)
    protocol: str = "fast"            # fast | byol | ladder | lewel_b | lewel_m | none (kNN only)
    probe_epochs: int = 0             # 0 = the protocol's epochs
    probe_lr: float = 0.0             # 0 = the protocol's lr (byol: best of its grid, held out)
    probe_batch_size: int = 0         # 0 = the protocol's global batch
    batch_size: int = 256             # global batch of feature extraction (kNN, fast cache, views)
    knn_k: int = 200                  # neighbours of the weighted kNN (InstDisc: 200)
    knn_t: float = 0.1                # its temperature (InstDisc: 0.1)
    seed: int = 0
    workers: int = 8                  # DataLoader workers per process (folder data only)
    view_distance: bool = False       # instead of kNN/probe: two-view GAP-feature distances per
                                      # stage (Ladder Fig. 3)
    view_crop_min_scale: float = 0.0  # crop scale (lo, 1) of those views; 0 = the checkpoint's
                                      # crop_min_scale (or 0.08)
    export: str = ""                  # write the backbone as a torchvision ResNet state_dict to
                                      # this path; for MCL also its FPN and head to
                                      # <path stem>_fpn_head<suffix> (see fpn_head_weights)
    export_all: bool = False          # also export every other online module into the same file
    export_detectron2: str = ""       # write backbone (+ MCL's FPN, box-head convs) under
                                      # detectron2 names to this path
    dense: bool = False               # also a per-pixel linear probe (mIoU) on --data's label maps
    dense_epochs: int = 10            # epochs of the dense probe
    dense_lr: float = 0.1             # its peak lr (SGD momentum 0.9, cosine per step, no wd)
    dense_batch_size: int = 64        # its global batch
    dense_classes: int = 0            # 0 = from the data (built in 3, VOC 21, else max label + 1)
    report: str = ""                  # write every metric as Markdown tables to this file (+ PNG
                                      # charts beside it when matplotlib is installed; + mean +-
                                      # std over checkpoints that differ only in their seed)
    device: str = ""                  # "" = cuda if available else cpu
    precision: str = "auto"           # auto | bf16 | fp32; auto = bf16 on CUDA and on CPUs with
                                      # native bf16 (avx512_bf16/AMX), fp32 elsewhere


def load_backbone(path, random_init=False):
    """Build a common.ResNetTrunk from a checkpoint's config and load its `backbone.` weights."""
    state = common.load_checkpoint(path)
    saved = state["config"]
    if "arch" not in saved or "stem" not in saved:
        raise InputError(f"checkpoint {path} has no arch/stem in its config")
    backbone = common.ResNetTrunk(saved["arch"], saved["stem"])
    weights = backbone_weights(state["model"])
    if not weights:
        raise InputError(f"checkpoint {path} holds no backbone weights "
                         "(no 'backbone.' entries in its model)")
    if not random_init:
        try:
            backbone.load_state_dict(weights)
        except RuntimeError as error:
            raise InputError(f"checkpoint {path}: backbone weights do not fit "
                             f"{saved['arch']}/{saved['stem']}: "
                             f"{str(error).splitlines()[0]}") from None
    return backbone, state


# --------------------------------------------------------------------------------------------------
# Export: torchvision backbone, MCL's FPN and head, detectron2 names
# --------------------------------------------------------------------------------------------------

def backbone_weights(model_state):
    """A checkpoint model's `backbone.` entries without the prefix: torchvision names (conv1,
    layer1.0.bn2, ...)."""
    return {key[len("backbone."):]: value for key, value in model_state.items()
            if key.startswith("backbone.")}


def fpn_head_weights(model_state):
    """MCL's FPN and region head under the checkpoint's own names ({} if it has none):

        fpn.lateral.pK.conv.weight, fpn.lateral.pK.norm.*   1x1 lateral conv (no bias) + BN on resK
        fpn.output.pK.conv.weight, fpn.output.pK.norm.*     3x3 output conv (no bias) + BN giving PK
        head.convs.I.conv.weight, head.convs.I.norm.*       region head conv I = 0..3 (3x3, no
                                                            bias) + BN (+ ReLU)
        head.mlp.*                                          region head MLP (pretraining only; no
                                                            detector counterpart)

    `.norm.*` = weight, bias, running_mean, running_var, num_batches_tracked. They load with
    strict=True into mcl.FPN / mcl.RegionHead after dropping the `fpn.` / `head.` prefix (the paper
    transfers all three modules).
    """
    return {key: value for key, value in model_state.items() if key.startswith(("fpn.", "head."))}


def companion_path(path, tag):
    """resnet.pth, "fpn_head" -> resnet_fpn_head.pth (next to the backbone file)."""
    path = Path(path)
    return path.with_name(f"{path.stem}_{tag}{path.suffix}")


def detectron2_name(key):
    """detectron2 name of one torchvision-backbone or MCL fpn./head. key; None for tensors a
    detector does not take."""
    parts = key.split(".")
    tensor = parts[-1]
    if tensor == "num_batches_tracked":      # FrozenBN (detectron2's default) has none; SyncBN
        return None                          # restarts it at 0 (logged as missing; it only
                                             # matters with momentum=None)
    if parts[0] in ("conv1", "bn1"):         # conv1.weight, bn1.<tensor>
        return "backbone.bottom_up.stem.conv1." + ("norm." if parts[0] == "bn1" else "") + tensor
    if parts[0].startswith("layer"):         # layerN.B.convK.weight, layerN.B.bnK.<tensor>,
                                             # layerN.B.downsample.{0,1}.*
        stage, block, module = f"res{int(parts[0][len('layer'):]) + 1}", parts[1], parts[2]
        if module == "downsample":
            module = "shortcut" if parts[3] == "0" else "shortcut.norm"
        elif module.startswith("bn"):
            module = f"conv{module[len('bn'):]}.norm"
        return f"backbone.bottom_up.{stage}.{block}.{module}.{tensor}"
    if parts[0] == "fpn":                    # fpn.{lateral,output}.pK.{conv,norm}.<tensor>
        return (f"backbone.fpn_{parts[1]}{parts[2][1:]}."
                + ("norm." if parts[3] == "norm" else "") + tensor)
    if parts[:2] == ["head", "convs"]:       # head.convs.I.{conv,norm}.<tensor>
        return (f"roi_heads.box_head.conv{int(parts[2]) + 1}."
                + ("norm." if parts[3] == "norm" else "") + tensor)
    if parts[:2] == ["head", "mlp"]:         # detectron2's fc1 reads the flattened 7x7 RoI
        return None                          # map: another shape
    raise InputError(f"no detectron2 name for checkpoint tensor {key!r}")


def detectron2_names(weights):
    """Rename a torchvision-named ResNet (+ MCL's fpn./head. entries) to a detectron2 R-FPN Mask
    R-CNN state_dict.

    Pure dict renaming (same tensors, new keys):
        conv1 / bn1                       -> backbone.bottom_up.stem.conv1 / stem.conv1.norm
        layerN.B.convK / bnK              -> backbone.bottom_up.res{N+1}.B.convK / convK.norm
        layerN.B.downsample.0 / .1        -> backbone.bottom_up.res{N+1}.B.shortcut / shortcut.norm
        fpn.lateral.pK.conv / .norm       -> backbone.fpn_lateralK / fpn_lateralK.norm
        fpn.output.pK.conv / .norm        -> backbone.fpn_outputK / fpn_outputK.norm
        head.convs.I.conv / .norm         -> roi_heads.box_head.conv{I+1} / conv{I+1}.norm
    Dropped: every num_batches_tracked and head.mlp.*.
    NOTE: the names fit the model of detectron2's configs/Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml
    (SyncBN in the ResNet, the FPN and a 4conv1fc box head, so every conv above has a `.norm` and no
    bias), but the papers fine-tune with the 1x schedule: 90k iterations at batch 16, lr / 10 at 60k
    and 80k (LEWEL Sec. 4.3; Ladder Sec. 4.2, DenseSiam Sec. 5.1 and MCL Sec. 4.2 name the 1x
    schedule). So replace that config's 3x solver: SOLVER.STEPS (60000, 80000) SOLVER.MAX_ITER 90000
    (the values of detectron2's configs/Base-RCNN-FPN.yaml). Also MODEL.WEIGHTS = this file,
    RESNETS.STRIDE_IN_1X1 False (torchvision strides the 3x3 conv), FPN.OUT_CHANNELS and
    ROI_BOX_HEAD.CONV_DIM = the checkpoint's fpn_dim, and torchvision's input convention
    (INPUT.FORMAT RGB, PIXEL_MEAN [123.675, 116.28, 103.53], PIXEL_STD [58.395, 57.12, 57.375]), as
    detectron2's tools/convert-torchvision-to-d2.py documents; ResNet-18/34 also need RESNETS.DEPTH
    and RES2_OUT_CHANNELS 64. Written from detectron2's module names only: the file is never loaded
    into detectron2 here (not a dependency of this repo); transfer.py's torchvision export is the
    tested path.
    """
    renamed = {}
    for key, value in weights.items():
        name = detectron2_name(key)
        if name is not None:
            renamed[name] = value
    return renamed


def export_weights(state, path, include_all=False):
    """Save the backbone as a torchvision ResNet state_dict (no fc), and optionally the other online
    modules.

    The trunk uses torchvision's attribute names, so
    `torchvision.models.resnet50().load_state_dict(sd, strict=False)` loads it (only fc.* is
    missing). With include_all, other modules keep their prefix (e.g. `fpn.`, `head.`).
    """
    exported = backbone_weights(state["model"])
    if include_all:
        exported.update({key: value for key, value in state["model"].items()
                         if not key.startswith("backbone.")})
    common.save_checkpoint(exported, path)
    return exported


def export_all_formats(cfg, state):
    """--export (+ MCL's FPN/head file beside it) and --export-detectron2 of one checkpoint. Rank 0
    only."""
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
        common.check(stem == "imagenet",
                     f"--export-detectron2 needs the imagenet stem (detectron2's 7x7 stem), "
                     f"the checkpoint has {stem!r}")
        renamed = detectron2_names({**backbone_weights(model_state),
                                    **fpn_head_weights(model_state)})
        # detectron2's checkpointer reads a .pth as {"model": state_dict}; exact names, no matching
        # heuristics needed
        common.save_checkpoint({"model": renamed, "__author__": "eval_linear.py"},
                               cfg.export_detectron2)
        print0(f"exported {len(renamed)} tensors under detectron2 names to {cfg.export_detectron2}")


# --------------------------------------------------------------------------------------------------
# Linear-evaluation protocols, one per paper: frozen backbone, linear classifier on pooled features
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LinearProtocol:
    """One paper's linear evaluation. `lrs` are the lrs at `batch_size`; more than one = a grid
    swept on a held-out part of the train set (the best one then trains on the whole train set)."""
    optimizer: str                  # sgd | lars (common.LARS: trust 1e-3, biases not adapted)
    nesterov: bool
    momentum: float
    batch_size: int                 # global
    epochs: int
    lrs: tuple
    weight_decay: float
    schedule: str                   # cosine (lr to 0) | step (lr / 10 at every milestone reached)
    milestones: tuple = ()          # 0-based epochs: 30 = lr / 10 from the 31st epoch on
    per_step: bool = False          # cosine updated every step instead of once per epoch
    interpolation: str = "bilinear"  # of the training RandomResizedCrop
    source: str = ""


# BYOL App. C picks its lr on a held-out split but lists no values. Our grid: peak lrs at batch
# 1024 = base lr (0.05, 0.1, 0.2, 0.4, 0.8) x 1024/256, centred on the official default base 0.2
# (deepmind-research byol/configs/eval.py, scaled by batch/256 in byol/utils/schedules.py).
BYOL_LR_GRID = (0.2, 0.4, 0.8, 1.6, 3.2)
BYOL_HELDOUT = 10_000  # held-out train images (deepmind-research byol/utils/dataset.py Split.VALID)

PROTOCOLS = {
    # this repo's quick probe on cached centre-view features (no paper's protocol)
    "fast": LinearProtocol("sgd", False, 0.9, 256, 100, (1.0,), 0.0, "cosine", per_step=True,
                           source="this repo's quick probe"),
    # BYOL App. C: SGD, Nesterov momentum 0.9, batch 1024, 80 ep, no weight decay, lr chosen
    # on a held-out split
    "byol": LinearProtocol("sgd", True, 0.9, 1024, 80, BYOL_LR_GRID, 0.0, "cosine", per_step=True,
                           interpolation="bicubic", source="BYOL (arXiv:2006.07733) App. C"),
    # Ladder Siamese Network Sec. 4.2 "Classification": SGD, 100 ep, cosine, with mmselfsup (whose
    # config gives lr 0.3, momentum 0.9, wd 1e-6, batch 8x32: mmselfsup
    # configs/benchmarks/classification/imagenet/resnet50_linear-8xb32-coslr-100e_in1k.py)
    "ladder": LinearProtocol("sgd", False, 0.9, 256, 100, (0.3,), 1e-6, "cosine",
                             source="Ladder Siamese Network (arXiv:2211.13844) Sec. 4.2"),
    # LEWEL Sec. 4.1, LEWEL_B: SGD with momentum, batch 256, wd 0, lr 0.4 / 10 at epochs 30, 40,
    # 50 ep
    "lewel_b": LinearProtocol("sgd", False, 0.9, 256, 50, (0.4,), 0.0, "step", (30, 40),
                              source="LEWEL (arXiv:2203.14898) Sec. 4.1, LEWEL_B"),
    # LEWEL Sec. 4.1, LEWEL_M: LARS, batch 4096, lr 3.2, wd 0, cosine, 90 ep (following SimSiam)
    "lewel_m": LinearProtocol("lars", False, 0.9, 4096, 90, (3.2,), 0.0, "cosine",
                              source="LEWEL (arXiv:2203.14898) Sec. 4.1, LEWEL_M"),
}
# NOTE: where a paper is silent we follow the code it names or builds on:
#   momentum 0.9: ladder (mmselfsup config above), lewel_b (LayneH/LEWEL main_lincls.py),
#     lewel_m (facebookresearch/simsiam main_lincls.py);
#   schedule: byol cosine to 0 per step, no warmup (deepmind-research byol/eval_experiment.py);
#     ladder per-epoch cosine (mmselfsup CosineAnnealingLR by epoch); lewel_m per-epoch cosine
#     (simsiam main_lincls.py);
#   classifier init N(0, 0.01), bias 0, for all (LEWEL and SimSiam main_lincls.py, mmselfsup's
#     linear head); BYOL's haiku Linear draws a truncated normal of std 1/sqrt(fan in) instead;
#   crop interpolation: bicubic for byol (its official input pipeline), bilinear otherwise
#     (torchvision's default, used by LEWEL, SimSiam, mmselfsup);
#   LARS: common.LARS, whose parameter groups leave the bias unadapted; SimSiam's apex LARC adapts
#     the bias too;
#   byol's held-out split: a seeded random min(10,000, a tenth) of the train images (the official
#     code holds out the first 10,000 of its TFDS train split).
# NOTE: a folder's loader decodes each image to a centre square of 256/224 of the view side
#   (common.make_loader), so the training RandomResizedCrop samples from that square, not from the
#   whole image as torchvision's does.


def protocol_lr(protocol, peak_lr, epoch):
    """lr at `epoch` (0-based; fractional inside an epoch for per-step schedules). Pure function.

    cosine: peak_lr * (1 + cos(pi * epoch / epochs)) / 2 (peak_lr at epoch 0, 0 at `epochs`);
    step:   peak_lr * 0.1 ** (number of milestones <= epoch).
    """
    if protocol.schedule == "step":
        return peak_lr * 0.1 ** sum(epoch >= milestone for milestone in protocol.milestones)
    return peak_lr * 0.5 * (1 + math.cos(math.pi * min(epoch / protocol.epochs, 1.0)))


def resolve_protocol(cfg):
    """PROTOCOLS[cfg.protocol] with --probe-epochs / --probe-batch-size / --probe-lr applied, as a
    new protocol: milestones scale with the epochs (30, 40 of 50 -> 3, 4 of 5), the lrs linearly
    with the batch."""
    protocol = PROTOCOLS[cfg.protocol]
    epochs = cfg.probe_epochs or protocol.epochs
    batch_size = cfg.probe_batch_size or protocol.batch_size
    scale = batch_size / protocol.batch_size
    lrs = (cfg.probe_lr,) if cfg.probe_lr else tuple(lr * scale for lr in protocol.lrs)
    milestones = tuple(round(epoch * epochs / protocol.epochs) for epoch in protocol.milestones)
    return dataclasses.replace(protocol, epochs=epochs, batch_size=batch_size, lrs=lrs,
                               milestones=milestones)


def describe_protocol(name, protocol):
    """One line: optimiser, batch, epochs, lr(s), weight decay, schedule and source."""
    if protocol.schedule == "step":
        schedule = f"lr / 10 at epochs {', '.join(map(str, protocol.milestones))}"
    else:
        schedule = f"cosine per {'step' if protocol.per_step else 'epoch'}"
    lrs = " | ".join(f"{lr:g}" for lr in protocol.lrs)
    if len(protocol.lrs) > 1:
        lrs += " (swept on a held-out split)"
    nesterov = " nesterov" if protocol.nesterov else ""
    return (f"{name} = {protocol.optimizer}{nesterov} momentum {protocol.momentum}, batch "
            f"{protocol.batch_size}, {protocol.epochs} epochs, lr {lrs}, weight decay "
            f"{protocol.weight_decay:g}, {schedule} ({protocol.source})")


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


def train_view_recipe(interpolation="bilinear"):
    """Linear-evaluation training view: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) + flip."""
    return common.ViewRecipe(crop_scale=(0.08, 1.0), interpolation=interpolation, jitter_p=0.0,
                             gray_p=0.0, blur_p=0.0, solarize_p=0.0)


def center_crop_view(images, image_size):
    """Validation view: resize to image_size * 256 // 224 (a folder's loader already did), centre
    crop image_size: resize 256 + centre crop 224 at 224 px.
    uint8 B x 3 x H x W -> normalised float B x 3 x S x S."""
    resize = image_size * 256 // 224
    x = images.float().div_(255)
    if x.shape[-2:] != (resize, resize):
        x = F.interpolate(x, size=(resize, resize), mode="bilinear", align_corners=False,
                          antialias=True)
    top = (resize - image_size) // 2
    return common.normalize(x[..., top:top + image_size, top:top + image_size].contiguous())


def dataset_size(loader):
    return len(loader.images) if isinstance(loader, common.TensorLoader) else len(loader.dataset)


def num_classes_of(loader):
    """1 + the largest label of the loader's whole dataset (not of one batch)."""
    if isinstance(loader, common.TensorLoader):
        return int(loader.labels.max()) + 1
    return max(label for _, label in loader.dataset.samples) + 1


def subset_loader(loader, keep, shuffle=True, drop_last=True):
    """A loader of the same kind over the images `keep` (indices into the loader's dataset)."""
    common.check(len(keep) > 0, "an empty subset of the training images")
    if isinstance(loader, common.TensorLoader):
        keep = torch.as_tensor(keep, device=loader.images.device)
        return common.TensorLoader(loader.images[keep], loader.labels[keep], loader.batch,
                                   loader.rank, loader.world, loader.seed, shuffle, drop_last)
    dataset = copy.copy(loader.dataset)
    dataset.samples = [loader.dataset.samples[index] for index in keep]
    return common.FolderLoader(dataset, loader.batch, loader.rank, loader.world, loader.seed,
                               loader.device, loader.workers, shuffle, drop_last)


def heldout_split(num_images, seed, size=BYOL_HELDOUT):
    """(train indices, held-out indices), both sorted: a seeded random min(size, num_images // 10)
    images held out."""
    held = min(size, num_images // 10)
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    return order[held:].sort().values, order[:held].sort().values


class LinearHeads(nn.Module):
    """One linear classifier per lr of a sweep (one without a sweep), all on the same features."""

    def __init__(self, dim, num_classes, count, generator):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(count))
        for head in self.heads:
            nn.init.normal_(head.weight, std=0.01, generator=generator)
            nn.init.zeros_(head.bias)

    def forward(self, features):
        """B x D -> K x B x num_classes."""
        return torch.stack([head(features) for head in self.heads])


def probe_optimizer(protocol, heads):
    """SGD or LARS; the groups of classifier k carry "peak_lr" = protocol.lrs[k]."""
    groups = []
    for head, lr in zip(heads.heads, protocol.lrs):
        if protocol.optimizer == "lars":
            head_groups = common.lars_param_groups(head, protocol.weight_decay)
        else:
            head_groups = [dict(params=list(head.parameters()), weight_decay=protocol.weight_decay)]
        groups += [dict(group, peak_lr=lr) for group in head_groups]
    if protocol.optimizer == "lars":
        return common.LARS(groups, lr=protocol.lrs[0], momentum=protocol.momentum)
    return torch.optim.SGD(groups, lr=protocol.lrs[0], momentum=protocol.momentum,
                           nesterov=protocol.nesterov)


def frozen_features(backbone, x, stage, autocast_dtype):
    """GAP features B x C (float32) of the frozen backbone's `stage`, no gradient."""
    with torch.no_grad(), torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16,
                                         enabled=autocast_dtype is not None):
        return common.global_pool(backbone(x, last_stage=stage)[stage]).float()


def train_linear_protocol(backbone, stage, protocol, train_loader, val_loader, image_size, dist,
                          seed, autocast_dtype=None, memory_format=torch.contiguous_format):
    """Train one linear classifier per lr in protocol.lrs on the frozen backbone (eval mode: its BN
    statistics stay as pretrained), then test them on val_loader's centre views.

    Returns dict(top1=[% per lr], top5=[% per lr], epoch_lrs=[lr of the first classifier at the
    first step of every epoch]).
    """
    backbone.eval()
    recipe = train_view_recipe(protocol.interpolation)
    generator = torch.Generator().manual_seed(seed)
    heads = LinearHeads(backbone.channels[stage], num_classes_of(train_loader), len(protocol.lrs),
                        generator).to(dist.device)
    classifier = torch.nn.parallel.DistributedDataParallel(heads) if dist.world_size > 1 else heads
    optimizer = probe_optimizer(protocol, heads)
    steps_per_epoch = len(train_loader)
    epoch_lrs = []
    for epoch in range(protocol.epochs):
        train_loader.set_epoch(epoch)
        batches = common.progress(train_loader, dist.is_main, leave=False,
                                  desc=f"probe epoch {epoch + 1}/{protocol.epochs}")
        for index, (images, labels) in enumerate(batches):
            position = epoch + index / steps_per_epoch if protocol.per_step else epoch
            for group in optimizer.param_groups:
                group["lr"] = protocol_lr(protocol, group["peak_lr"], position)
            if index == 0:
                epoch_lrs.append(optimizer.param_groups[0]["lr"])
            step = epoch * steps_per_epoch + index
            draws = common.step_generator(dist.device, seed + 1234, dist.rank, step)
            views = augment_views(images, recipe, image_size, draws, memory_format)
            features = frozen_features(backbone, views, stage, autocast_dtype)      # B x C
            loss = sum(F.cross_entropy(logits, labels) for logits in classifier(features))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    top1, top5 = classifier_accuracy(backbone, heads, stage, val_loader, image_size, dist,
                                     autocast_dtype, memory_format)
    return dict(top1=top1, top5=top5, epoch_lrs=epoch_lrs)


@torch.no_grad()
def classifier_accuracy(backbone, heads, stage, loader, image_size, dist, autocast_dtype=None,
                        memory_format=torch.contiguous_format):
    """Top-1 and top-5 (%) of every classifier in `heads` on the loader's centre views."""
    correct = torch.zeros(len(heads.heads), 2, device=dist.device)
    count = torch.zeros((), device=dist.device)
    for images, labels in loader:
        x = center_crop_view(images, image_size).contiguous(memory_format=memory_format)
        logits = heads(frozen_features(backbone, x, stage, autocast_dtype))     # K x B x classes
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices            # K x B x 5
        hits = top5 == labels[None, :, None]
        correct += torch.stack([hits[..., 0].sum(dim=1), hits.any(dim=-1).sum(dim=1)], dim=1)
        count += labels.numel()
    if dist.world_size > 1:
        torch.distributed.all_reduce(correct)
        torch.distributed.all_reduce(count)
    top1, top5 = (correct / count * 100).t().tolist()
    return top1, top5


def run_protocol(protocol, backbone, stage, train_loader, val_loader, image_size, dist, seed,
                 autocast_dtype=None, memory_format=torch.contiguous_format):
    """A paper's linear evaluation; with several lrs, first the best on a held-out train split.

    Returns dict(top1, top5 on val_loader, lr (the one used), sweep {lr: held-out top-1} or {}).
    """
    sweep = {}
    if len(protocol.lrs) > 1:
        kept, held = heldout_split(dataset_size(train_loader), seed)
        heldout = subset_loader(train_loader, held, shuffle=False, drop_last=False)
        result = train_linear_protocol(backbone, stage, protocol, subset_loader(train_loader, kept),
                                       heldout, image_size, dist, seed, autocast_dtype,
                                       memory_format)
        sweep = dict(zip(protocol.lrs, result["top1"]))
        print0(f"{stage}: lr sweep on {len(held)} held-out train images, top-1 (%): "
               + ", ".join(f"lr {lr:g}: {top1:.2f}" for lr, top1 in sweep.items()))
        protocol = dataclasses.replace(protocol, lrs=(max(sweep, key=sweep.get),))
    result = train_linear_protocol(backbone, stage, protocol, train_loader, val_loader, image_size,
                                   dist, seed, autocast_dtype, memory_format)
    return dict(top1=result["top1"][0], top5=result["top5"][0], lr=protocol.lrs[0], sweep=sweep)


def augment_views(images, recipe, image_size, generator, memory_format):
    view = common.augment(images, recipe, image_size, generator)[0]
    return view.contiguous(memory_format=memory_format)


# --------------------------------------------------------------------------------------------------
# Two-view distances per stage (Ladder Siamese Network, Sec. 4 "Analyses on intermediate
# representations", Fig. 3)
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def two_view_features(backbone, loader, recipes, image_size, stages, seed, rank,
                      autocast_dtype=None, memory_format=torch.contiguous_format):
    """GAP features of two augmented views of every image, per stage:
    {stage: (view1 N x C, view2 N x C)} float32.

    Batch b draws both views from common.step_generator(seed, rank, b) (view 1 first). The loader
    is unshuffled, so every checkpoint evaluated with the same seed, image size and crop scale sees
    exactly the same views.
    """
    backbone.eval()
    last_stage = max(stages, key=STAGE_NAMES.index)
    first, second = {stage: [] for stage in stages}, {stage: [] for stage in stages}
    for batch_index, (images, _) in enumerate(loader):
        generator = common.step_generator(images.device, seed, rank, batch_index)
        views = torch.cat([augment_views(images, recipe, image_size, generator, memory_format)
                           for recipe in recipes])
        with torch.autocast(views.device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            maps = backbone(views, last_stage=last_stage)
        for stage in stages:
            view1, view2 = common.global_pool(maps[stage]).float().chunk(2)   # B x C each
            first[stage].append(view1)
            second[stage].append(view2)
    return {stage: (common.gather_ragged(torch.cat(first[stage])),
                    common.gather_ragged(torch.cat(second[stage])))
            for stage in stages}


def distance_summary(distances):
    """Mean and quartiles of a 1-D tensor of distances."""
    probabilities = torch.tensor([0.25, 0.5, 0.75], device=distances.device)
    quartiles = torch.quantile(distances, probabilities).tolist()
    return dict(mean=distances.mean().item(), p25=quartiles[0], median=quartiles[1],
                p75=quartiles[2])


def view_distance_stats(view1, view2):
    """Euclidean distances between the two views' features of each image (N x C each), three ways:

    view_raw         ||f(v1) - f(v2)||, the paper's Fig. 3 quantity (raw pooled features)
    view_normalised  the same between l2-normalised features: sqrt(2 - 2 cos), in [0, 2]
    view_ratio       mean raw two-view distance / mean raw distance between different images (view 1
                     of image i against view 2 of image i-1): below 1 = views closer together than
                     unrelated images
    NOTE: the raw distance is not comparable across stages or checkpoints: it scales with the
    feature norm, which differs between stages (width, depth) and between checkpoints (learned BN
    scales, more or less sparse ReLU outputs), so a smaller raw distance can mean smaller features,
    not more invariant ones. view_normalised and view_ratio are invariant to a rescaling of the
    features; compare checkpoints (Ladder vs BYOL) on those.
    """
    raw = (view1 - view2).norm(dim=1)
    normalised = (F.normalize(view1, dim=1) - F.normalize(view2, dim=1)).norm(dim=1)
    different = (view1 - view2.roll(1, dims=0)).norm(dim=1)
    return dict(view_raw=distance_summary(raw), view_normalised=distance_summary(normalised),
                view_ratio=raw.mean().item() / max(different.mean().item(), 1e-12))


# --------------------------------------------------------------------------------------------------
# Dense linear probe (--dense): a per-pixel linear classifier on each frozen feature map, mIoU
# --------------------------------------------------------------------------------------------------

FPN_LEVELS = ("p2", "p3", "p4", "p5")
DENSE_ONLY_STAGES = ("pixels", *FPN_LEVELS)  # probed by --dense only: the input, MCL's FPN levels


def conv_norm(in_dim, out_dim, kernel_size):
    """Conv (no bias) + BatchNorm, named as an MCL checkpoint's fpn.* keys (conv, norm)."""
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(in_dim, out_dim, kernel_size, padding=kernel_size // 2, bias=False),
        norm=nn.BatchNorm2d(out_dim)))


class CheckpointFPN(nn.Module):
    """MCL's FPN (mcl.py, class FPN) rebuilt from a checkpoint's fpn.* tensors, its levels and
    widths read from their names and shapes: this file reads P2..P5 without importing mcl.py.

    P_k = output_k(top_k), top_k = lateral_k(res_k) + nearest_upsample(top_(k+1)); lateral = 1x1
    conv + BN, output = 3x3 conv + BN, no activation. Keys (without the fpn. prefix):
    lateral.pK.conv.weight, lateral.pK.norm.*, output.pK.conv.weight, output.pK.norm.*, so
    load_state_dict (strict) checks every one.
    """

    def __init__(self, weights):
        super().__init__()
        self.levels = tuple(sorted({key.split(".")[1] for key in weights
                                    if key.startswith("lateral.")}))
        self.lateral, self.output = nn.ModuleDict(), nn.ModuleDict()
        for level in self.levels:
            for modules, kind in ((self.lateral, "lateral"), (self.output, "output")):
                out_dim, in_dim, kernel_size, _ = weights[f"{kind}.{level}.conv.weight"].shape
                modules[level] = conv_norm(in_dim, out_dim, kernel_size)

    def forward(self, maps):
        """{"res2": B x C2 x H/4 x W/4, ...} -> {"p2": B x dim x H/4 x W/4, ..., "p5": ...}."""
        outputs, top_down = {}, None
        for level in reversed(self.levels):                                  # p5 first
            lateral = self.lateral[level](maps[f"res{level[1:]}"])
            if top_down is not None:
                lateral = lateral + F.interpolate(top_down, size=lateral.shape[-2:], mode="nearest")
            top_down = lateral
            outputs[level] = self.output[level](top_down)
        return outputs


def load_pyramid(state, random_init=False):
    """The CheckpointFPN of a checkpoint holding MCL's FPN (None otherwise); its weights loaded
    unless random_init (then PyTorch's default init, as mcl.FPN's)."""
    weights = {key[len("fpn."):]: value for key, value in fpn_head_weights(state["model"]).items()
               if key.startswith("fpn.")}
    if not weights:
        return None
    pyramid = CheckpointFPN(weights)
    if not random_init:
        pyramid.load_state_dict(weights)
    return pyramid


def dense_feature_maps(backbone, pyramid, x, stages, autocast_dtype=None):
    """{stage: B x C x h x w float32} of the frozen network on a normalised batch x, no gradient:
    res2..res5 of the backbone, p2..p5 of MCL's FPN (pyramid), "pixels" = x itself."""
    levels = [stage for stage in stages if stage in FPN_LEVELS]
    trunk = [stage for stage in stages if stage in STAGE_NAMES]
    last_stage = "res5" if levels else max(trunk, key=STAGE_NAMES.index, default=None)
    maps = {"pixels": x}
    with torch.no_grad(), torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16,
                                         enabled=autocast_dtype is not None):
        if last_stage is not None:
            maps.update(backbone(x, last_stage=last_stage))
        if levels:
            maps.update(pyramid(maps))
    return {stage: maps[stage].float() for stage in stages}


def check_label_range(labels, num_classes):
    """One line when a label map holds a class the probe has no output for (255 = ignore)."""
    outside = ((labels < 0) | (labels >= num_classes)) & (labels != common.IGNORE_LABEL)
    if outside.any():
        raise InputError(f"a label map holds class {int(labels[outside].max())}, but the dense "
                         f"probe has {num_classes} classes (--dense-classes)")


@torch.no_grad()
def channel_stats(backbone, pyramid, loader, stages, image_size, dist, autocast_dtype=None,
                  memory_format=torch.contiguous_format):
    """Per-channel mean and std of every probed map over all train pixels and ranks:
    {stage: (mean 1 x C x 1 x 1, std 1 x C x 1 x 1)}."""
    moments = {}                                           # {stage: 3 x C: count, sum, sum^2}
    for images, _ in common.progress(loader, dist.is_main, desc="dense statistics", leave=False):
        x = common.eval_transform(images, image_size).contiguous(memory_format=memory_format)
        maps = dense_feature_maps(backbone, pyramid, x, stages, autocast_dtype)
        for stage, feature in maps.items():
            feature = feature.double().transpose(0, 1).flatten(1)                    # C x pixels
            count = torch.full_like(feature[:, 0], feature.shape[1])
            batch = torch.stack([count, feature.sum(dim=1), feature.square().sum(dim=1)])
            moments[stage] = moments.get(stage, 0) + batch
    stats = {}
    for stage, summed in moments.items():
        if dist.world_size > 1:
            torch.distributed.all_reduce(summed)
        count, total, squares = summed
        mean = total / count
        std = (squares / count - mean.square()).clamp(min=0).sqrt() + 1e-6
        stats[stage] = (mean.float().view(1, -1, 1, 1), std.float().view(1, -1, 1, 1))
    return stats


class DenseHeads(nn.Module):
    """One per-pixel linear classifier (a 1x1 conv, N(0, 0.01) init, bias 0) per probed map, on the
    features standardised with the train set's per-channel mean and std (fixed, as the fast probe).

    The logits are upsampled bilinearly to the label size: the same as classifying the upsampled
    feature map (a 1x1 conv and a bilinear interpolation, whose weights sum to 1, commute), at
    classes / C of the cost.
    """

    def __init__(self, stats, num_classes, generator):
        super().__init__()
        self.stats = stats                                  # {stage: (mean, std)}, not trained
        self.convs = nn.ModuleDict()
        for stage, (mean, _) in stats.items():
            conv = nn.Conv2d(mean.shape[1], num_classes, 1)
            nn.init.normal_(conv.weight, std=0.01, generator=generator)
            nn.init.zeros_(conv.bias)
            self.convs[stage] = conv

    def forward(self, maps, size):
        """{stage: B x C x h x w} -> {stage: B x classes x size}."""
        logits = {}
        for stage, conv in self.convs.items():
            mean, std = self.stats[stage]
            logits[stage] = F.interpolate(conv((maps[stage] - mean) / std), size=size,
                                          mode="bilinear", align_corners=False)
        return logits


def pixel_cross_entropy(logits, labels):
    """Mean cross-entropy over the labelled pixels (255 = ignore); 0, not NaN, when none is."""
    total = F.cross_entropy(logits, labels, ignore_index=common.IGNORE_LABEL, reduction="sum")
    return total / (labels != common.IGNORE_LABEL).sum().clamp(min=1)


def train_dense_probe(backbone, pyramid, stages, train_loader, val_loader, num_classes, image_size,
                      dist, epochs, lr, seed, autocast_dtype=None,
                      memory_format=torch.contiguous_format):
    """Train one per-pixel linear classifier per stage on the frozen network (eval mode), all on one
    forward pass per batch: SGD momentum 0.9, lr cosine per step from `lr` to 0, no weight decay.
    Then score each on val_loader: {stage: common.segmentation_iou dict}."""
    backbone.eval()
    if pyramid is not None:
        pyramid.eval()
    stats = channel_stats(backbone, pyramid, train_loader, stages, image_size, dist, autocast_dtype,
                          memory_format)
    heads = DenseHeads(stats, num_classes, torch.Generator().manual_seed(seed)).to(dist.device)
    classifier = torch.nn.parallel.DistributedDataParallel(heads) if dist.world_size > 1 else heads
    optimizer = torch.optim.SGD(heads.parameters(), lr=lr, momentum=0.9)
    steps_per_epoch = len(train_loader)
    total_steps = epochs * steps_per_epoch
    for epoch in range(epochs):
        train_loader.set_epoch(epoch)
        batches = common.progress(train_loader, dist.is_main, leave=False,
                                  desc=f"dense probe epoch {epoch + 1}/{epochs}")
        for index, (images, labels) in enumerate(batches):
            for group in optimizer.param_groups:
                group["lr"] = common.lr_at(epoch * steps_per_epoch + index, total_steps, 0, lr)
            check_label_range(labels, num_classes)
            x = common.eval_transform(images, image_size).contiguous(memory_format=memory_format)
            maps = dense_feature_maps(backbone, pyramid, x, stages, autocast_dtype)
            logits = classifier(maps, labels.shape[-2:])
            loss = sum(pixel_cross_entropy(logit, labels) for logit in logits.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return dense_scores(backbone, pyramid, heads, val_loader, stages, num_classes, image_size, dist,
                        autocast_dtype, memory_format)


@torch.no_grad()
def dense_scores(backbone, pyramid, heads, loader, stages, num_classes, image_size, dist,
                 autocast_dtype=None, memory_format=torch.contiguous_format):
    """argmax of each classifier at the label size; one confusion matrix per stage over every val
    pixel and rank: {stage: common.segmentation_iou dict (miou, iou per class, pixel_acc)}."""
    confusion = {stage: torch.zeros(num_classes, num_classes, dtype=torch.long, device=dist.device)
                 for stage in stages}
    for images, labels in loader:
        check_label_range(labels, num_classes)
        x = common.eval_transform(images, image_size).contiguous(memory_format=memory_format)
        logits = heads(dense_feature_maps(backbone, pyramid, x, stages, autocast_dtype),
                       labels.shape[-2:])
        for stage in stages:
            prediction = logits[stage].argmax(dim=1)
            confusion[stage] += common.confusion_matrix(prediction, labels, num_classes)
    if dist.world_size > 1:
        for matrix in confusion.values():
            torch.distributed.all_reduce(matrix)
    return {stage: common.segmentation_iou(matrix) for stage, matrix in confusion.items()}


def dense_stages_of(label, stages, pyramid):
    """The requested stages this checkpoint can probe (p2..p5 need its FPN); a line for the rest."""
    available = [stage for stage in stages if stage not in FPN_LEVELS
                 or (pyramid is not None and stage in pyramid.levels)]
    skipped = [stage for stage in stages if stage not in available]
    if skipped:
        print0(f"{label}: no FPN level {', '.join(skipped)} in the checkpoint (MCL's fpn.* "
               f"weights): not probed")
    return available


def image_labelled(data):
    """True when --data has image labels for kNN and the linear probe (not a set of label maps)."""
    return common.has_labels(data) and common.dense_layout(data) in (None, "synthetic")


def evaluate(cfg, dist):
    autocast_dtype, memory_format = common.device_setup(dist, cfg.precision)
    allowed = STAGE_NAMES + (DENSE_ONLY_STAGES if cfg.dense else ())
    for stage in cfg.stage:
        dense_only = "" if cfg.dense else f" ({', '.join(DENSE_ONLY_STAGES)}: with --dense)"
        common.check(stage in allowed,
                     f"--stage {stage!r} is not one of {', '.join(allowed)}{dense_only}")
    common.check(not (cfg.dense and cfg.view_distance),
                 "--dense and --view-distance are separate runs: give one")
    if cfg.dense:
        common.check(cfg.dense_epochs > 0 and cfg.dense_lr > 0 and cfg.dense_classes >= 0,
                     "--dense-epochs and --dense-lr must be positive, --dense-classes >= 0")
        common.check(cfg.dense_batch_size > 0 and cfg.dense_batch_size % dist.world_size == 0,
                     f"--dense-batch-size {cfg.dense_batch_size} must be positive and divisible "
                     f"by the world size {dist.world_size}")
        print0(f"dense probe: {describe_dense(cfg)}")
    common.check(cfg.protocol in (*PROTOCOLS, "none"),
                 f"--protocol must be one of {', '.join(PROTOCOLS)} or none, got {cfg.protocol!r}")
    protocol = resolve_protocol(cfg) if cfg.protocol != "none" else None
    if protocol is not None:
        common.check(protocol.batch_size % dist.world_size == 0,
                     f"the probe batch {protocol.batch_size} must be divisible by the world size "
                     f"{dist.world_size}")
        if not cfg.view_distance:
            print0(f"linear probe: {describe_protocol(cfg.protocol, protocol)}")
    common.check(len(cfg.ckpt) > 0, "--ckpt is required (one checkpoint or a comma list)")
    common.check(cfg.batch_size > 0 and cfg.batch_size % dist.world_size == 0,
                 f"--batch-size {cfg.batch_size} must be positive and divisible by the world size "
                 f"{dist.world_size}")
    common.check(0 <= cfg.view_crop_min_scale <= 1,
                 f"--view-crop-min-scale must be in [0, 1], got {cfg.view_crop_min_scale}")
    rows, dense_sets, runs = {}, {}, {}
    # --random-init adds a baseline row: the first checkpoint's architecture and data, seeded
    # initial weights.
    entries = (([(cfg.ckpt[0], True)] if cfg.random_init else [])
               + [(path, False) for path in cfg.ckpt])
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
        label = f"{path}{' (random init)' if random_init else ''}"
        rows[label] = {}
        runs[label] = run_key(state, random_init)
        common.check(not cfg.dense or common.dense_layout(data) is not None,
                     f"--dense: --data {data} has no per-pixel labels; give 'synthetic' or a "
                     f"folder laid out as " + "; or ".join(common.DENSE_LAYOUTS.values()))
        image_stages = [stage for stage in cfg.stage if stage in STAGE_NAMES]
        # kNN and the linear probe: on res2..res5, when the data has image labels
        image_level = bool(image_stages) and (not cfg.dense or image_labelled(data))
        if cfg.dense and image_stages and not image_level:
            print0(f"{label}: --data {data} holds label maps, no image labels: no kNN or linear "
                   f"probe")
        if cfg.view_distance or image_level:
            val = common.make_loader(data, "val", image_size, per_rank, dist, cfg.seed, cfg.workers,
                                     shuffle=False, drop_last=False, synthetic_size=synthetic_size,
                                     load_size=load_size)
        if cfg.view_distance:
            # NOTE: the pretraining's BYOL view pair and crop scale (the paper: "two random
            # data-augmented views"); a checkpoint without crop_min_scale (densesiam: SimSiam crops
            # 0.2-1) gets BYOL's 0.08.
            min_scale = cfg.view_crop_min_scale or saved.get("crop_min_scale", 0.08)
            recipes = [dataclasses.replace(recipe, crop_scale=(min_scale, 1.0))
                       for recipe in common.BYOL_VIEWS]
            features = two_view_features(backbone, val, recipes, image_size, cfg.stage, cfg.seed,
                                         dist.rank, autocast_dtype, memory_format)
            print0(f"{label}: two BYOL views of {len(features[cfg.stage[0]][0])} val images, "
                   f"{image_size} px, crop scale ({min_scale}, 1)")
            for stage in cfg.stage:
                result = rows[label][stage] = view_distance_stats(*features[stage])
                print0(f"{label} {stage}: two-view distance raw {format_cell(result['view_raw'])}, "
                       f"l2-normalised {format_cell(result['view_normalised'])}, "
                       f"ratio to different images {format_cell(result['view_ratio'])}")
            continue
        if image_level:
            bank = common.make_loader(data, "train", image_size, per_rank, dist, cfg.seed,
                                      cfg.workers, shuffle=False, drop_last=False,
                                      synthetic_size=synthetic_size, load_size=load_size)
        for stage in image_stages if image_level else ():
            train_x, train_y = common.extract_features(backbone, bank, image_size, stage,
                                                       autocast_dtype, memory_format,
                                                       show_progress=True)
            val_x, val_y = common.extract_features(backbone, val, image_size, stage,
                                                   autocast_dtype, memory_format,
                                                   show_progress=True)
            knn = common.knn_accuracy(train_x, train_y, val_x, val_y, cfg.knn_k, cfg.knn_t)
            result = dict(knn=knn)
            if cfg.protocol == "fast":
                result["linear"] = train_fast_probe(
                    train_x, train_y, val_x, val_y, protocol.epochs, protocol.lrs[0],
                    min(protocol.batch_size, train_x.shape[0]), cfg.seed)
            elif protocol is not None:
                train = common.make_loader(data, "train", image_size,
                                           protocol.batch_size // dist.world_size, dist, cfg.seed,
                                           cfg.workers, synthetic_size=synthetic_size,
                                           load_size=load_size)
                outcome = run_protocol(protocol, backbone, stage, train, val, image_size, dist,
                                       cfg.seed, autocast_dtype, memory_format)
                result.update(linear=outcome["top1"], linear_top5=outcome["top5"],
                              linear_lr=outcome["lr"])
            rows[label][stage] = result
            print0(f"{label} {stage}: kNN top-1 {knn:.2f}%"
                   + (f", linear top-1 {result['linear']:.2f}%" if "linear" in result else "")
                   + (f" (top-5 {result['linear_top5']:.2f}%, lr {result['linear_lr']:g})"
                      if "linear_top5" in result else ""))
        if cfg.dense:
            pyramid = load_pyramid(state, random_init)
            if pyramid is not None:
                pyramid = pyramid.to(dist.device, memory_format=memory_format)
            stages = dense_stages_of(label, cfg.stage, pyramid)
            key = (data, image_size, synthetic_size)
            if key not in dense_sets:  # classes, train and val loaders, shared by the rows
                dense_batch = cfg.dense_batch_size // dist.world_size
                dense_sets[key] = (
                    cfg.dense_classes or common.dense_num_classes(data),
                    common.make_dense_loader(data, "train", image_size, dense_batch, dist, cfg.seed,
                                             cfg.workers, synthetic_size=synthetic_size),
                    common.make_dense_loader(data, "val", image_size, per_rank, dist, cfg.seed,
                                             cfg.workers, shuffle=False, drop_last=False,
                                             synthetic_size=synthetic_size))
            num_classes, dense_train, dense_val = dense_sets[key]
            scores = train_dense_probe(backbone, pyramid, stages, dense_train, dense_val,
                                       num_classes, image_size, dist, cfg.dense_epochs,
                                       cfg.dense_lr, cfg.seed, autocast_dtype,
                                       memory_format) if stages else {}
            names = class_names(data, num_classes)
            for stage, score in scores.items():
                result = rows[label].setdefault(stage, {})
                result.update(dense_miou=100 * score["miou"],
                              dense_pixel_acc=100 * score["pixel_acc"],
                              dense_iou=dict(zip(names, (100 * iou for iou in score["iou"]))))
                per_class = ", ".join(f"{name} {iou:.1f}"
                                      for name, iou in result["dense_iou"].items())
                print0(f"{label} {stage}: dense mIoU {result['dense_miou']:.2f}%, pixel accuracy "
                       f"{result['dense_pixel_acc']:.2f}%; IoU per class (%): {per_class}")
    print_table(rows, cfg.stage)
    if cfg.report and dist.is_main:
        write_report(cfg, rows, protocol, dist, runs)
    return rows


METRICS = (("knn", "knn top-1 (%)"),
           ("linear", "linear top-1 (%)"),
           ("linear_top5", "linear top-5 (%)"),
           ("dense_miou", "dense mIoU (%), per-pixel linear probe"),
           ("dense_pixel_acc", "dense pixel accuracy (%), per-pixel linear probe"),
           ("view_raw", "two-view distance, raw GAP features (mean / p25-p75)"),
           ("view_normalised",
            "two-view distance, l2-normalised GAP features, range 0-2 (mean / p25-p75)"),
           ("view_ratio",
            "two-view distance / distance between different images (raw GAP features)"))


def format_cell(value):
    """A distance summary as "mean / p25-p75" (two significant decimals at least), any other
    number as %.2f."""
    if isinstance(value, dict):
        mean = value["mean"]
        decimals = max(2, 1 - math.floor(math.log10(mean))) if mean > 0 else 2
        return f"{mean:.{decimals}f} / {value['p25']:.{decimals}f}-{value['p75']:.{decimals}f}"
    return f"{value:.2f}"


def table_cells(rows, stages, metric):
    """One metric's table: (the stages some row has it for, {row label: [cell text per stage]}),
    "-" where a row lacks it (e.g. kNN of "pixels", p2 of a checkpoint without an FPN)."""
    columns = [stage for stage in stages
               if any(metric in row.get(stage, {}) for row in rows.values())]
    cells = {label: [format_cell(row[stage][metric]) if metric in row.get(stage, {}) else "-"
                     for stage in columns]
             for label, row in rows.items()}
    return columns, cells


def print_table(rows, stages):
    """Rows = checkpoints, columns = stages (the Ladder paper's Table 7 layout), one block per
    metric."""
    if not rows:
        return
    width = max(len(label) for label in list(rows) + ["checkpoint"]) + 2
    for metric, title in METRICS:
        columns, cells = table_cells(rows, stages, metric)
        if not columns:
            continue
        texts = [*columns, *(text for line in cells.values() for text in line)]
        column = max(len(text) for text in texts) + 2
        print0(f"\n{title}")
        print0("checkpoint".ljust(width) + "".join(stage.rjust(column) for stage in columns))
        for label, line in cells.items():
            print0(label.ljust(width) + "".join(text.rjust(column) for text in line))


# --------------------------------------------------------------------------------------------------
# --report: every metric as Markdown tables, bar charts when matplotlib is installed
# --------------------------------------------------------------------------------------------------

def describe_dense(cfg):
    """One line: the dense probe's classifier and optimisation."""
    return (f"per-pixel linear classifier (1x1 conv on features standardised per channel, "
            f"logits upsampled bilinearly to the label size), SGD momentum 0.9, batch "
            f"{cfg.dense_batch_size}, {cfg.dense_epochs} epochs, lr {cfg.dense_lr:g} cosine per "
            f"step, no weight decay (this repo's probe, no paper's protocol)")


def class_names(data, num_classes):
    """Names of a dense set's classes: the built-in parts, Pascal VOC's classes, else the ids."""
    known = {"synthetic": common.SYNTHETIC_CLASSES, "voc": common.VOC_CLASS_NAMES}
    names = known.get(common.dense_layout(data), ())
    return [names[index] if index < len(names) else str(index) for index in range(num_classes)]


def command_line(cfg):
    """The command that reruns this evaluation: each field that differs from its default, a flag."""
    parts = ["python eval_linear.py"]
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if value == field.default:
            continue
        flag = "--" + field.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else f"--no-{flag[2:]}")
        else:
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            parts.append(f"{flag} {shlex.quote(text)}")
    return " ".join(parts)


def markdown_row(cells):
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


def chart_value(value):
    """A cell's bar height: a distance summary's mean; NaN (no bar) where the row lacks it."""
    if value is None:
        return math.nan
    return value["mean"] if isinstance(value, dict) else value


def write_charts(rows, stages, path):
    """A grouped bar chart per metric (x: stages, one bar per checkpoint), a PNG beside the report
    named <report stem>_<metric>.png: {metric: path}. matplotlib is an optional extra, imported
    here: without it, one printed line and no charts."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
    except ImportError:
        print0("matplotlib is not installed: the report has no charts (pip install matplotlib)")
        return {}
    charts = {}
    for metric, title in METRICS:
        columns, _ = table_cells(rows, stages, metric)
        if not columns:
            continue
        figure = Figure(figsize=(2 + 1.2 * len(columns), 3.5))
        axes = figure.add_subplot()
        width = 0.8 / len(rows)
        for index, (label, row) in enumerate(rows.items()):
            shift = (index - (len(rows) - 1) / 2) * width
            heights = [chart_value(row.get(stage, {}).get(metric)) for stage in columns]
            positions = [column + shift for column in range(len(columns))]
            axes.bar(positions, heights, width, label=label)
        axes.set_xticks(range(len(columns)), columns)
        axes.set_title(title, fontsize="medium")
        axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        charts[metric] = companion_path(path, metric).with_suffix(".png")
        figure.savefig(charts[metric], dpi=120, bbox_inches="tight")
    return charts


def run_key(state, random_init):
    """What makes two checkpoints seeds of one run: the method and its config, less the seed and
    the output folder (and the run state: resume, stop_after)."""
    config = {key: value for key, value in state["config"].items()
              if key not in ("seed", "out", "resume", "stop_after")}
    return json.dumps([state.get("method"), random_init, config], sort_keys=True, default=str)


def seed_groups(labels, runs):
    """{group label: [row labels]} of checkpoints that differ only in their seed, in first-seen
    order. A group's label is its rows' labels with the part they differ in braced:
    runs/byol_s0/last.pt, runs/byol_s1/last.pt -> runs/byol_s{0,1}/last.pt."""
    members = {}
    for label in labels:
        members.setdefault(runs[label], []).append(label)
    groups = {}
    for names in members.values():
        if len(names) == 1:
            groups[names[0]] = names
            continue
        prefix = os.path.commonprefix(names)
        suffix = os.path.commonprefix([name[len(prefix):][::-1] for name in names])[::-1]
        middles = [name[len(prefix):len(name) - len(suffix)] for name in names]
        groups[f"{prefix}{{{','.join(middles)}}}{suffix}"] = names
    return groups


def seed_table(rows, stages, metric, groups):
    """One metric over seeds: (stages, {group label: ["mean +- std (n)" per stage]}); a group of
    one checkpoint shows its value alone. The std is the sample standard deviation (n - 1)."""
    columns, _ = table_cells(rows, stages, metric)
    cells = {}
    for group, names in groups.items():
        line = []
        for stage in columns:
            values = [rows[name][stage][metric] for name in names
                      if metric in rows[name].get(stage, {})]
            if not values:
                line.append("-")
            elif len(values) == 1:
                line.append(f"{values[0]:.2f}")
            else:
                line.append(f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f} "
                            f"({len(values)})")
        cells[group] = line
    return columns, cells


def write_report(cfg, rows, protocol, dist, runs=None):
    """--report: the command, then every metric of the run as a Markdown table (rows = checkpoints,
    columns = stages, the cells as print_table prints them), the dense probe's IoU per class, and
    a chart per metric. When some checkpoints differ only in their seed (run_key), each number
    metric also gets a table over seeds: mean +- standard deviation (number of seeds)."""
    path = Path(cfg.report)
    path.parent.mkdir(parents=True, exist_ok=True)
    charts = write_charts(rows, cfg.stage, path)
    lines = ["# eval_linear.py report", "", f"    {command_line(cfg)}", "",
             f"{datetime.date.today()}, torch {torch.__version__}, device {dist.device}, "
             f"world size {dist.world_size}."]
    if protocol is not None and not cfg.view_distance:
        lines.append(f"Linear probe: {describe_protocol(cfg.protocol, protocol)}.")
    if cfg.dense:
        lines.append(f"Dense probe: {describe_dense(cfg)}.")
    for metric, title in METRICS:
        columns, cells = table_cells(rows, cfg.stage, metric)
        if not columns:
            continue
        lines += ["", f"## {title}", "", markdown_row(["checkpoint", *columns]),
                  markdown_row(["---", *["---:"] * len(columns)])]
        lines += [markdown_row([label, *line]) for label, line in cells.items()]
        if metric in charts:
            lines += ["", f"![{title}]({charts[metric].name})"]
    groups = seed_groups(list(rows), runs) if runs else {}
    if any(len(names) > 1 for names in groups.values()):
        for metric, title in METRICS:
            if metric.startswith("view_"):  # distance summaries: per checkpoint only
                continue
            columns, cells = seed_table(rows, cfg.stage, metric, groups)
            if not columns:
                continue
            lines += ["", f"## {title}, over seeds: mean +- std (seeds)", "",
                      markdown_row(["run", *columns]),
                      markdown_row(["---", *["---:"] * len(columns)])]
            lines += [markdown_row([group, *line]) for group, line in cells.items()]
    per_class = [(label, stage, row[stage]["dense_iou"]) for label, row in rows.items()
                 for stage in cfg.stage if "dense_iou" in row.get(stage, {})]
    if per_class:
        names = list(per_class[0][2])
        lines += ["", "## dense IoU per class (%; -: in neither labels nor predictions)", "",
                  markdown_row(["checkpoint", "stage", *names]),
                  markdown_row(["---", "---", *["---:"] * len(names)])]
        for label, stage, ious in per_class:
            texts = ["-" if math.isnan(iou) else f"{iou:.2f}" for iou in ious.values()]
            lines.append(markdown_row([label, stage, *texts]))
    path.write_text("\n".join(lines) + "\n")
    print0(f"report: {path}" + (f" (+ {len(charts)} charts beside it)" if charts else ""))


def main(argv=None):
    with common.main_errors():  # bad input: one line, exit 2; training failure: exit 3
        cfg = common.parse_config(Config, {}, argv)
        dist = common.setup_distributed(cfg.device or None)
        return evaluate(cfg, dist)


if __name__ == "__main__":
    main()
