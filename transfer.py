"""Transfer a checkpoint's backbone beyond a linear probe: semi-supervised fine-tuning on a labelled
subset of the train set (LEWEL Table 2), and export into a torchvision Faster / Mask R-CNN R50-FPN
(the COCO detection transfer of the Ladder, LEWEL, DenseSiam and MCL papers).

Reads checkpoints through eval_linear.py (backbone under `backbone.`, MCL's FPN and head under
`fpn.` / `head.`), never the method files.

    python transfer.py --task semi --ckpt runs/byol/last.pt --subset subset.txt --epochs 2
    torchrun --nproc_per_node=8 transfer.py --task semi --ckpt last.pt --data /path/to/imagenet \\
             --subset 1percent.txt --label-fraction 1percent        # LEWEL Table 2, 1 % labels
    python transfer.py --task detection --ckpt last.pt --out maskrcnn.pth
    python transfer.py --task detection --ckpt runs/mcl/last.pt \\
             --detector maskrcnn_resnet50_fpn_v2 --out mcl_v2.pth   # + MCL's FPN and box-head convs

Semi-supervised fine-tuning (LEWEL Sec. 4.2): the backbone and a new linear classifier on its pooled
res5 features are both trained (backbone in train mode) for 50 epochs on the subset; classifier lr
1.0 and backbone lr 0.0001 for the 1 % subset, 0.1 and 0.01 for the 10 %, both divided by 10 at
epochs 30 and 40. Train view: RandomResizedCrop (0.08-1) + flip; val: resize 256 + centre crop 224
(at 224 px), top-1 and top-5 on the whole val split. --subset is a text file, one image per line:
the 1 % / 10 % ImageNet subsets of SimCLR (Chen et al. 2020, github.com/google-research/simclr
imagenet_subsets/1percent.txt and 10percent.txt: file names such as n01440764_10026.JPEG, matched
to the train folder's file names), or for the built-in data and CIFAR-10 image indices of the train
split. --out writes the fine-tuned network as a torchvision ResNet state_dict (fc included).
NOTE: LEWEL Sec. 4.2 gives epochs, lrs and milestones only. Optimiser SGD momentum 0.9, weight decay
1e-4, global batch 256, plain (per-GPU) BatchNorm in train mode and PyTorch's default classifier
init are the defaults of the official LayneH/LEWEL main_semi.py (scripts/srun_semi_1p.sh and
srun_semi_10p.sh set only the two lrs, 50 epochs and the milestones).

Detection export: builds torchvision's `--detector` (weights=None, weights_backbone=None: nothing is
downloaded, plain trainable BatchNorm), takes its full state_dict and fills in what the checkpoint
has, so that

    model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                               num_classes=91)
    model.load_state_dict(torch.load("maskrcnn.pth"), strict=True)

loads every key. From the checkpoint: backbone.body.* (the ResNet-50, every tensor), and for an MCL
checkpoint its FPN: on the v2 detectors (FPN and a 4conv1fc box head with BatchNorm, like the
detectron2 models the papers fine-tune) the FPN convs + BN as they are and MCL's 4 region-head
convs + BN as roi_heads.box_head.0-3; on the v1 detectors (FPN convs with a bias, no norm, no box
convs) the FPN with each BN folded into its conv (the same function as MCL's FPN in eval mode), the
head not at all. Everything else keeps torchvision's fresh initialisation (seeded by --seed) and is
listed when written: backbone.fpn.* (non-MCL), rpn.*, roi_heads.box_head.* (v1; v2: the fc),
roi_heads.box_predictor.*, and for Mask R-CNN roi_heads.mask_head.* and mask_predictor.*.
The papers fine-tune Mask R-CNN R50-FPN on COCO train2017 with detectron2's 1x schedule: 90k
iterations at batch 16, lr / 10 at 60k and 80k (LEWEL Sec. 4.3 states these numbers; Ladder Sec.
4.2, DenseSiam Sec. 5.1 and MCL Sec. 4.2 name the 1x schedule), SyncBN in backbone, FPN and heads
(DenseSiam Sec. 5.1). This file only prepares the weights: train them with torchvision's detection
reference scripts (references/detection) or your own loop, converting BatchNorm with
torch.nn.SyncBatchNorm.convert_sync_batchnorm for multi-GPU runs.
"""

import dataclasses
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common
import eval_linear
from common import InputError, TrainingError, print0


@dataclasses.dataclass(frozen=True)
class Config:
    """Semi-supervised fine-tuning on a labelled subset, or export into a torchvision detector."""
    task: str = "semi"                # semi | detection
    ckpt: str = ""                    # a checkpoint of any method file
    out: str = ""                     # semi: fine-tuned ResNet (optional); detection: required
    # semi-supervised fine-tuning (LEWEL Sec. 4.2)
    data: str = ""                    # "" = the data the checkpoint was trained on
    subset: str = ""                  # labelled train images, one a line ("" = whole train split)
    label_fraction: str = "1percent"  # 1percent | 10percent: picks the paper's two lrs
    epochs: int = 50                  # paper: 50 (lr / 10 at 3/5 and 4/5 of them: epochs 30 and 40)
    backbone_lr: float = 0.0          # 0 = the paper's: 0.0001 (1 %) / 0.01 (10 %)
    classifier_lr: float = 0.0        # 0 = the paper's: 1.0 (1 %) / 0.1 (10 %)
    batch_size: int = 256             # global; official main_semi.py default (paper silent)
    weight_decay: float = 1e-4        # official main_semi.py default (paper silent)
    image_size: int = 0               # 0 = the checkpoint's image size
    # detection export
    detector: str = "maskrcnn_resnet50_fpn"  # one of DETECTORS
    num_classes: int = 91             # including background; torchvision's COCO models use 91
    seed: int = 0
    workers: int = 8                  # DataLoader workers per process (folder data only)
    device: str = ""                  # "" = cuda if available else cpu
    precision: str = "auto"           # auto | bf16 | fp32; auto = bf16 on CUDA and on CPUs with
                                      # native bf16 (avx512_bf16/AMX), fp32 elsewhere


# --------------------------------------------------------------------------------------------------
# Semi-supervised fine-tuning (LEWEL Sec. 4.2, Table 2)
# --------------------------------------------------------------------------------------------------

SEMI_LRS = {"1percent": (1e-4, 1.0), "10percent": (1e-2, 0.1)}  # (backbone, classifier), Sec. 4.2
SEMI_EPOCHS, SEMI_MILESTONES = 50, (30, 40)                      # lr / 10 at epochs 30 and 40 of 50


def semi_lr(base_lr, epoch, epochs=SEMI_EPOCHS):
    """lr of 0-based `epoch`: base_lr / 10 from epoch 30 and again from 40 of 50 (LEWEL Sec. 4.2;
    official main_semi.py: lr *= 0.1 for every milestone <= epoch). Other `epochs` scale the
    milestones (3 and 4 of 5). Pure function."""
    milestones = [round(milestone * epochs / SEMI_EPOCHS) for milestone in SEMI_MILESTONES]
    return base_lr * 0.1 ** sum(epoch >= milestone for milestone in milestones)


def read_subset(path):
    """The non-empty lines of a subset file, stripped, repeats dropped, in file order."""
    try:
        with open(path) as handle:
            lines = [line.strip() for line in handle]
    except OSError as error:
        raise InputError(f"cannot read --subset {path}: {error.strerror}") from None
    names = list(dict.fromkeys(line for line in lines if line))
    common.check(len(names) > 0, f"--subset {path} lists no images")
    return names


def subset_indices(loader, names, path="--subset"):
    """Indices into the loader's train images of the subset's lines: file names (folder data) or
    image indices (built-in data, CIFAR-10). One unknown line is an error naming it."""
    if isinstance(loader, common.TensorLoader):
        size = len(loader.images)
        indices = []
        for name in names:
            common.check(name.isdigit() and int(name) < size,
                         f"{path}: {name!r} is no image index of this train split (0-{size - 1})")
            indices.append(int(name))
        return indices
    samples = loader.dataset.samples
    by_name = {os.path.basename(file): index for index, (file, _) in enumerate(samples)}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise InputError(f"{path}: {len(missing)} of {len(names)} names are no train image of "
                         f"--data, e.g. {missing[0]!r}")
    return [by_name[name] for name in names]


class FineTuneNet(nn.Module):
    """Backbone + linear classifier on its pooled res5 features (torchvision ResNet names)."""

    def __init__(self, backbone, num_classes):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.channels["res5"], num_classes)  # PyTorch default init

    def forward(self, x):
        return self.fc(common.global_pool(self.backbone(x)["res5"]))   # B x num_classes


def semi_optimizer(model, backbone_lr, classifier_lr, weight_decay):
    """SGD momentum 0.9, two groups (backbone, classifier); "base_lr" is each one's epoch-0 lr."""
    groups = [dict(params=list(model.backbone.parameters()), base_lr=backbone_lr, name="backbone"),
              dict(params=list(model.fc.parameters()), base_lr=classifier_lr, name="classifier")]
    return torch.optim.SGD(groups, lr=backbone_lr, momentum=0.9, weight_decay=weight_decay)


def set_semi_lrs(optimizer, epoch, epochs=SEMI_EPOCHS):
    """Set each group's lr for 0-based `epoch` from its base_lr; returns them
    (backbone, classifier)."""
    for group in optimizer.param_groups:
        group["lr"] = semi_lr(group["base_lr"], epoch, epochs)
    return tuple(group["lr"] for group in optimizer.param_groups)


@torch.no_grad()
def top_accuracy(model, loader, image_size, dist, autocast_dtype=None,
                 memory_format=torch.contiguous_format):
    """Top-1 and top-5 (%) of `model` on the loader's centre views (eval mode)."""
    model.eval()
    correct = torch.zeros(2, device=dist.device)
    count = torch.zeros((), device=dist.device)
    for images, labels in loader:
        x = eval_linear.center_crop_view(images, image_size).contiguous(memory_format=memory_format)
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            logits = model(x).float()
        hits = logits.topk(min(5, logits.shape[-1]), dim=1).indices == labels[:, None]
        correct += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])
        count += labels.numel()
    if dist.world_size > 1:
        torch.distributed.all_reduce(correct)
        torch.distributed.all_reduce(count)
    top1, top5 = (correct / count * 100).tolist()
    return top1, top5


def finetune(cfg, dist):
    """Fine-tune backbone + classifier on the subset; returns dict(top1, top5, images, lrs)."""
    autocast_dtype, memory_format = common.device_setup(dist, cfg.precision)
    common.check(cfg.label_fraction in SEMI_LRS,
                 f"--label-fraction must be one of {', '.join(SEMI_LRS)}, "
                 f"got {cfg.label_fraction!r}")
    common.check(cfg.epochs > 0, f"--epochs must be positive, got {cfg.epochs}")
    common.check(cfg.batch_size > 0 and cfg.batch_size % dist.world_size == 0,
                 f"--batch-size {cfg.batch_size} must be positive and divisible by the world size "
                 f"{dist.world_size}")
    torch.manual_seed(cfg.seed)
    backbone, state = eval_linear.load_backbone(cfg.ckpt)
    saved = state["config"]
    data = cfg.data or saved.get("data", "synthetic")
    image_size = cfg.image_size or saved["image_size"]
    load_size = image_size if data in ("synthetic", "cifar10") else image_size * 256 // 224
    loader_args = dict(synthetic_size=saved.get("synthetic_size", 2560), load_size=load_size)
    per_rank = cfg.batch_size // dist.world_size
    train = common.make_loader(data, "train", image_size, per_rank, dist, cfg.seed, cfg.workers,
                               **loader_args)
    val = common.make_loader(data, "val", image_size, per_rank, dist, cfg.seed, cfg.workers,
                             shuffle=False, drop_last=False, **loader_args)
    num_classes = eval_linear.num_classes_of(train)
    if cfg.subset:
        keep = subset_indices(train, read_subset(cfg.subset), f"--subset {cfg.subset}")
        train = eval_linear.subset_loader(train, keep)
    images = eval_linear.dataset_size(train)
    paper_backbone_lr, paper_classifier_lr = SEMI_LRS[cfg.label_fraction]
    backbone_lr = cfg.backbone_lr or paper_backbone_lr
    classifier_lr = cfg.classifier_lr or paper_classifier_lr
    print0(f"fine-tuning {cfg.ckpt} on {images} labelled images ({num_classes} classes), "
           f"{cfg.epochs} epochs, batch {cfg.batch_size}, lr backbone {backbone_lr:g} / classifier "
           f"{classifier_lr:g}, / 10 at epochs "
           f"{', '.join(str(round(m * cfg.epochs / SEMI_EPOCHS)) for m in SEMI_MILESTONES)}")

    model = FineTuneNet(backbone, num_classes).to(dist.device, memory_format=memory_format)
    network = torch.nn.parallel.DistributedDataParallel(model) if dist.world_size > 1 else model
    optimizer = semi_optimizer(model, backbone_lr, classifier_lr, cfg.weight_decay)
    recipe = eval_linear.train_view_recipe()
    steps_per_epoch = len(train)
    lrs = []
    for epoch in range(cfg.epochs):
        lrs.append(set_semi_lrs(optimizer, epoch, cfg.epochs))
        train.set_epoch(epoch)
        model.train()
        batches = common.progress(train, dist.is_main, leave=False,
                                  desc=f"fine-tune epoch {epoch + 1}/{cfg.epochs}")
        for index, (batch, labels) in enumerate(batches):
            draws = common.step_generator(dist.device, cfg.seed, dist.rank,
                                          epoch * steps_per_epoch + index)
            views = eval_linear.augment_views(batch, recipe, image_size, draws, memory_format)
            with torch.autocast(views.device.type, dtype=autocast_dtype or torch.bfloat16,
                                enabled=autocast_dtype is not None):
                loss = F.cross_entropy(network(views).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if not torch.isfinite(loss):  # one host sync per epoch
            raise TrainingError(f"non-finite fine-tuning loss in epoch {epoch + 1}: {loss.item()}")
    top1, top5 = top_accuracy(model, val, image_size, dist, autocast_dtype, memory_format)
    print0(f"{cfg.ckpt}: fine-tuned on {images} images, val top-1 {top1:.2f}%, top-5 {top5:.2f}%")
    if cfg.out and dist.is_main:
        weights = {**model.backbone.state_dict(),
                   **{f"fc.{key}": value for key, value in model.fc.state_dict().items()}}
        common.save_checkpoint(weights, cfg.out)
        print0(f"wrote the fine-tuned ResNet ({len(weights)} tensors, torchvision names) to "
               f"{cfg.out}")
    return dict(top1=top1, top5=top5, images=images, lrs=lrs)


# --------------------------------------------------------------------------------------------------
# Detection export: a full torchvision Faster / Mask R-CNN state_dict that loads with strict=True
# --------------------------------------------------------------------------------------------------

DETECTORS = ("fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn",  # FPN convs: bias, no norm
             "fasterrcnn_resnet50_fpn_v2",                        # FPN and 4conv1fc box head
             "maskrcnn_resnet50_fpn_v2")                          # with BN
NORM_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def build_detector(name, num_classes, **kwargs):
    """torchvision's detector with nothing downloaded (weights=None, weights_backbone=None), so the
    ResNet and the v2 FPN / heads use plain, trainable nn.BatchNorm2d. kwargs: e.g. min_size."""
    common.check(name in DETECTORS,
                 f"--detector must be one of {', '.join(DETECTORS)}, got {name!r}")
    builder = getattr(torchvision.models.detection, name)
    return builder(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)


def fold_norm(conv_weight, norm, eps=1e-5):
    """(weight, bias) of one conv equal to conv (no bias) followed by BatchNorm in eval mode:
    w * g / sqrt(v + eps), b - m * g / sqrt(v + eps) with norm = {weight g, bias b, running_mean m,
    running_var v}.
    eps: nn.BatchNorm2d's default, which MCL's FPN uses."""
    scale = norm["weight"] / torch.sqrt(norm["running_var"] + eps)            # C_out
    return conv_weight * scale[:, None, None, None], norm["bias"] - norm["running_mean"] * scale


def detector_weights(model_state, v2):
    """{torchvision detector key: tensor} of what a checkpoint holds: the ResNet, and MCL's FPN
    (+ its region-head convs for the v2 detectors, whose box head has 4 convs + BN)."""
    taken = {f"backbone.body.{key}": value
             for key, value in eval_linear.backbone_weights(model_state).items()}
    levels = sorted({key.split(".")[2] for key in model_state if key.startswith("fpn.lateral.")})
    for level in levels:                       # p2..p5 -> FPN block 0..3 (on layer1..layer4)
        block = int(level[1:]) - 2
        for part, target in (("lateral", "inner_blocks"), ("output", "layer_blocks")):
            source, prefix = f"fpn.{part}.{level}.", f"backbone.fpn.{target}.{block}.0."
            norm = {tensor: model_state[f"{source}norm.{tensor}"] for tensor in NORM_TENSORS}
            if v2:                              # Conv2dNormActivation: .0 conv (no bias), .1 BN
                taken[prefix + "weight"] = model_state[source + "conv.weight"]
                taken.update({f"backbone.fpn.{target}.{block}.1.{tensor}": value
                              for tensor, value in norm.items()})
            else:
                taken[prefix + "weight"], taken[prefix + "bias"] = fold_norm(
                    model_state[source + "conv.weight"], norm)
    if v2:
        convs = sorted({int(key.split(".")[2]) for key in model_state
                        if key.startswith("head.convs.")})
        for index in convs:                     # MCL head.convs.I (3x3 conv + BN + ReLU)
            source, target = f"head.convs.{index}.", f"roi_heads.box_head.{index}."
            taken[target + "0.weight"] = model_state[source + "conv.weight"]
            taken.update({f"{target}1.{tensor}": model_state[f"{source}norm.{tensor}"]
                          for tensor in NORM_TENSORS})
    return taken


def export_detector(ckpt, detector, num_classes, path=None, seed=0):
    """Write (when `path` is given) the full state_dict of torchvision's `detector` with the
    checkpoint's weights in place. Returns (state_dict, keys from the checkpoint, fresh keys)."""
    state = common.load_checkpoint(ckpt)
    saved = state["config"]
    common.check(saved.get("arch") == "resnet50" and saved.get("stem") == "imagenet",
                 f"torchvision's R50-FPN detectors need a resnet50 with the imagenet stem; "
                 f"{ckpt} has {saved.get('arch')}/{saved.get('stem')}")
    torch.manual_seed(seed)
    detector_state = build_detector(detector, num_classes).state_dict()
    taken = detector_weights(state["model"], v2=detector.endswith("_v2"))
    for key, value in taken.items():
        common.check(key in detector_state, f"{ckpt}: {key} has no place in {detector}")
        common.check(value.shape == detector_state[key].shape,
                     f"{ckpt}: {key} is {tuple(value.shape)}, {detector} wants "
                     f"{tuple(detector_state[key].shape)} (torchvision's FPN has 256 channels: "
                     f"pretrain MCL with --fpn-dim 256)")
        detector_state[key] = value.to(detector_state[key].dtype)
    fresh = [key for key in detector_state if key not in taken]
    if path:
        common.save_checkpoint(detector_state, path)
        modules = sorted({key.rsplit(".", 1)[0] for key in fresh})
        print0(f"wrote {detector} ({len(detector_state)} tensors) to {path}: {len(taken)} from "
               f"{ckpt}, {len(fresh)} freshly initialised in {len(modules)} modules: "
               + ", ".join(modules))
    return detector_state, sorted(taken), fresh


def main(argv=None):
    with common.main_errors():  # bad input: one line, exit 2; training failure: exit 3
        cfg = common.parse_config(Config, {}, argv)
        common.check(cfg.ckpt, "--ckpt is required")
        dist = common.setup_distributed(cfg.device or None)
        if cfg.task == "semi":
            return finetune(cfg, dist)
        common.check(cfg.task == "detection", f"--task must be semi or detection, got {cfg.task!r}")
        common.check(cfg.out, "--task detection needs --out (the detector state_dict to write)")
        if dist.is_main:
            return export_detector(cfg.ckpt, cfg.detector, cfg.num_classes, cfg.out, cfg.seed)
        return None


if __name__ == "__main__":
    main()
