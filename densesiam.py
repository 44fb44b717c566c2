"""DenseSiam: Dense Siamese Network for Dense Unsupervised Learning (Zhang et al., ECCV 2022,
arXiv:2203.11075).

SimSiam made dense. Two augmented views go through one encoder f (no momentum encoder, no negative
pixels). A global SimSiam branch matches pooled embeddings; PixSim matches the dense
projector/predictor outputs at the SAME points of the original image: a K x K grid inside the
intersection of the two crops, read out of both views with grid_sample. RegionSim turns the dense
prediction into soft region masks (softmax over its N channels), pools the encoder features inside
the intersection with them, and contrasts region n of one view against the N regions of the other
view of the same image. With a cross-entropy distance and N = number of classes the same network
segments images without labels (--task seg, Sec. 4).

    z = g(f(x)), p = h(z) dense (1x1 convs); z', p' = grid_sample(z), grid_sample(p)   Sec. 3.2
    L_dense = 1/2 D(p1', sg z2') + 1/2 D(p2', sg z1')                                  Eq. 1
    D = -cos(p, z) (Eq. 2)   or   D = -softmax(z) . log softmax(p) (Eq. 3, "ce")
    e1[n] = sum_ij softmax_n(z1')[ij] * grid_sample(f(x1))[ij]                         Eq. 4
    u = h'(g'(e)), v = g'(e); L_region = 1/2 Lc(u1, v2) + 1/2 Lc(u2, v1), Lc: InfoNCE  Eq. 5, 6
    pretraining: L = L_sim + lambda1 L_dense + lambda2 L_region (1; 0.1 from 50 %)      Eq. 7
    seg: L = lambda1 L_dense + lambda2 L_region + lambda3 L_seg + lambda4 L_aux         Eq. 8
         lambda1 = log N_aux / (log N + log N_aux), lambda4 = log N / (...), lambda3 = 1

The official code (ZwwWayne/DenseSiam) released only the segmentation mode; the ImageNet
pretraining mode here is re-implemented from the paper (Sec. 3, 5.1, Table 4). Both live in this
file and share the losses and the train loop; --task seg starts from the values of PRESETS["seg"].

NOTE: the CPU default views are 64 px (paper: 224), which keeps a 2 x 2 res5 map for PixSim, and
the CPU default base_lr is 0.3 (paper: 0.05), a larger step for a run of 60 steps: the SimSiam term
reaches -0.49 by step 40 of `python densesiam.py` (seed 0, one thread; -1 is its floor).

Commands:
    python densesiam.py                                   # pretraining, built-in data, CPU defaults
                                                          # (80 steps at 64 px: about the FLOPs of
                                                          # `python byol.py`)
    torchrun --standalone --nproc_per_node=2 densesiam.py # same run, 2 processes (CPU: gloo,
                                                          # GPU: nccl)
    torchrun --nproc_per_node=8 densesiam.py --data /path/to/imagenet --preset imagenet
    python eval_linear.py --ckpt runs/densesiam/last.pt   # kNN + linear probe of the frozen
                                                          # backbone
    python densesiam.py --task seg                        # unsupervised segmentation, built-in set
                                                          # (~1.5 CPU-minutes; mIoU at init vs after
                                                          # training)
    torchrun --nproc_per_node=4 densesiam.py --task seg --preset cocostuff27 \\
        --data /path/to/cocostuff27 --init resnet18_imagenet.pth  # paper setting (supervised
                                                          # ImageNet weights); without --init it
                                                          # stops, unless --no-require-init is given
"""

import dataclasses
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import common
from common import augment, crop_resize, global_pool, lr_at, print0


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Config:
    """DenseSiam pretraining. Defaults: a 2-core CPU, built-in data. --preset imagenet: paper."""
    task: str = "pretrain"           # pretrain | seg: unsupervised segmentation (Sec. 4), starting
                                     # from the SEG values; fields marked "seg:" serve seg only
    # data
    data: str = "synthetic"          # "synthetic", "cifar10", ImageNet layout, or any image folder
                                     # (seg: "synthetic" or a COCO-Stuff-27 folder, cocostuff.py)
    val_data: str = ""               # labelled set for the kNN monitor ("" = --data if labelled)
    synthetic_size: int = 2560       # images in the built-in training set (val: as many again)
                                     # (seg: a quarter)
    image_size: int = 64             # px of each augmented view; paper: 224. NOTE in the docstring
    load_size: int = 0               # px of the square decoded before cropping; 0 = image_size
                                     # (folders: 256/224 of it; seg: 2 x image_size)
    eval_size: int = 0               # seg: px the val set is scored at; 0 = image_size (paper: 320)
    workers: int = 8                 # DataLoader workers per process (folder data only)
    gpu_decode: bool = False         # folder data: workers read JPEG bytes, the GPU decodes them
    num_classes: int = 6             # seg: N = head channels = classes of the data; paper: 27
    num_things: int = 3              # seg: classes 0..num_things-1 are things; COCO-Stuff-27: 12
    # model
    arch: str = "resnet18"           # resnet18 | resnet50 (paper)
                                     # (seg paper: resnet18)
    stem: str = "imagenet"           # imagenet (7x7/2 + max-pool) | cifar (3x3/1, no pool)
    init: str = ""                   # torchvision ResNet state_dict to start from; seg paper:
                                     # supervised ImageNet weights
    require_init: bool = False       # stop when --init is missing; --preset cocostuff27 sets it
    proj_dim: int = 2048             # SimSiam projector width (3 layers); paper: 2048
    pred_hidden: int = 512           # SimSiam predictor bottleneck; paper: 512
    dense_dim: int = 64              # PixSim projector g width and outputs = regions N; paper: 512
    dense_pred_hidden: int = 64      # PixSim predictor h width; paper: 512 ("channels ... 512")
    region_dim: int = 64             # RegionSim projector g' / predictor h' width; paper: 512
    grid_size: int = 7               # K: K x K points in the crop intersection; paper: 7 (Table 4a)
    fpn_dim: int = 128               # seg: FPN decoder / head hidden width; released code: 128
    num_aux_classes: int = 24        # seg: N_aux of the over-clustering head; paper: 128
    dense_loss: str = "cosine"       # PixSim distance D: cosine (Eq. 2) | ce (Eq. 3)
    dense_weight: float = 1.0        # lambda1 (Eq. 7); paper: 1 (Table 4b); seg: Eq. 8's log-N
    seg_weight: float = 1.0          # seg: lambda3 (self-labelling cross-entropy); released: 1.0
    rebalance: bool = True           # seg: weight L_seg by batch class frequency (released code)
    region_weight: float = 0.1       # lambda2 (Eq. 7); paper: 0.1 (Table 4c); 0 = no RegionSim
    region_start: float = 0.5        # fraction of training before RegionSim; paper: 0.5 (Table 4f)
    region_temperature: float = 0.1  # RegionSim InfoNCE temperature; released: 0.1 (paper: none)
    crop_scale: tuple = (0.5, 1.0)   # seg: side fraction of the shared square crop (as released)
    sync_bn: bool = True             # SyncBatchNorm across processes (CUDA only); SimSiam: SyncBN
    # optimisation
    epochs: int = 3                  # paper: 200 on ImageNet (800 on COCO); 3: a CPU run under
                                     # 5 minutes
    batch_size: int = 128            # GLOBAL batch over all processes; paper: 512
    base_lr: float = 0.3             # peak lr = base_lr * batch_size / 256;
                                     # paper: 0.05. SGD, cosine to 0 (seg: constant).
                                     # NOTE in the docstring
    weight_decay: float = 1e-4       # on every parameter, as SimSiam; paper: 1e-4
    momentum: float = 0.9            # SGD momentum; paper: 0.9
    warmup_epochs: float = 0.0       # linear lr warmup; paper/SimSiam: none
    # run
    seed: int = 0
    out: str = "runs/densesiam"      # checkpoints, metrics.jsonl
    resume: bool = False             # continue from <out>/last.pt
    knn_every: int = 3               # epochs between kNN monitors (0 = only at the end)
    eval_every: int = 1              # seg: epochs between mIoU evaluations (0 = only at the end;
                                     # always at step 0 as well)
    log_every: int = 10              # steps between logged metrics (and host syncs)
    ckpt_every_steps: int = 0        # also write last.pt every N steps (0 = at epoch ends only)
    keep_every: int = 0              # keep a copy ckpt_<epoch>.pt every N epochs (0 = never)
    stop_after: int = 0              # stop (with a checkpoint) after this many steps;
                                     # the schedule still spans all epochs
    device: str = ""                 # "" = cuda if available else cpu
    precision: str = "auto"          # auto | bf16 | fp32; auto = bf16 on CUDA and on CPUs with
                                     # native bf16 (avx512_bf16/AMX), fp32 elsewhere
    compile: bool = False            # torch.compile the model
    show: bool = False               # write <out>/show.png (the method on one batch), then exit


# Paper Sec. 5.1: SimSiam recipe, SGD lr 0.05 * B / 256, batch 512, wd 1e-4, momentum 0.9, cosine;
# PixSim/RegionSim widths 512 (Sec. 3.4); K = 7, lambda1 = 1, lambda2 = 0.1 from 50 % (Table 4).
# RegionSim runs g'/h' on B x N region vectors: with N = 512 it is the priciest head, which is why
# the CPU defaults use 64.
_PAPER = dict(arch="resnet50", stem="imagenet", image_size=224, batch_size=512, base_lr=0.05,
              weight_decay=1e-4, dense_dim=512, dense_pred_hidden=512, region_dim=512, grid_size=7,
              dense_weight=1.0, region_weight=0.1, region_start=0.5, workers=10)
# --task seg: the segmentation mode's CPU defaults (the built-in scenes), under every preset and
# flag. Its paper values (Sec. 5.1; the cocostuff27 preset): 320 px views (feature map: a quarter)
# of 640 px images, batch 256 (4 GPUs x 64), lr 0.05 at batch 256 (base_lr 0.4 gives that lr at our
# batch 32), 10 epochs with RegionSim from epoch 8 (released code), PixSim distance ce (Eq. 3).
SEG = dict(task="seg", synthetic_size=512, image_size=32, dense_loss="ce", region_start=0.8,
           epochs=6, batch_size=32, base_lr=0.4, out="runs/densesiam_seg")
PRESETS = {
    "imagenet": dict(_PAPER, epochs=200, knn_every=10),    # ImageNet-1k, 200 epochs: Table 2
    # COCO train2017 (--data the train2017 folder), 800 epochs: the Table 4 ablations. "coco" is the
    # full model (Table 4c/4f best row); "coco-pixsim" drops RegionSim (Table 4a, b, d, e and 4f
    # "never"); "coco-simsiam" also drops PixSim (the SimSiam baseline, first row of every part).
    "coco": dict(_PAPER, epochs=800, knn_every=50),
    "coco-pixsim": dict(_PAPER, epochs=800, knn_every=50, region_weight=0.0),
    "coco-simsiam": dict(_PAPER, epochs=800, knn_every=50, dense_weight=0.0, region_weight=0.0),
    "seg": SEG,
    # Tables 3 and 5; released config (ZwwWayne/DenseSiam) configs/densesiam/
    # densesiam_r18_fpn_aux_seg-rebalance_4x64_sgd-fix-10e_coco-curated.py. Data: cocostuff.py.
    "cocostuff27": dict(SEG, image_size=320, load_size=640, eval_size=320, num_classes=27,
                        num_things=12, num_aux_classes=128, batch_size=256, epochs=10,
                        base_lr=0.05, region_start=0.8, workers=4, require_init=True),
}


def check_config(cfg, world_size):
    """What main() checks before any data or model is built: the common checks and DenseSiam's
    (both tasks)."""
    common.check_common_config(cfg, world_size)
    common.check(cfg.task in ("pretrain", "seg"),
                 f"--task must be pretrain or seg, got {cfg.task!r}")
    common.check(cfg.dense_loss in DISTANCES,
                 f"--dense-loss must be one of {sorted(DISTANCES)}, got {cfg.dense_loss!r}")
    common.check(0.0 <= cfg.region_start <= 1.0,
                 f"--region-start is a fraction of training, got {cfg.region_start}")
    common.check(cfg.region_weight >= 0, f"--region-weight must be >= 0, got {cfg.region_weight}")
    common.check(cfg.region_temperature > 0,
                 f"--region-temperature must be positive, got {cfg.region_temperature}")
    common.check(not cfg.init or Path(cfg.init).is_file(), f"--init {cfg.init}: no such file")
    common.check(cfg.init or not cfg.require_init,
                 "--init is required (--require-init, on in --preset cocostuff27): the paper "
                 "starts from a supervised ImageNet ResNet-18 (Sec. 5.1); give --init "
                 "resnet18_imagenet.pth, or --no-require-init to train from random weights")
    if cfg.task == "pretrain":
        common.check(cfg.grid_size >= 1, f"--grid-size must be >= 1, got {cfg.grid_size}")
        return
    common.check(cfg.num_classes >= 2 and 0 <= cfg.num_things < cfg.num_classes,
                 f"need --num-classes >= 2 and 0 <= --num-things < --num-classes, got "
                 f"{cfg.num_classes} and {cfg.num_things}")
    common.check(cfg.num_aux_classes >= 2,
                 f"--num-aux-classes must be >= 2, got {cfg.num_aux_classes}")
    common.check(len(cfg.crop_scale) == 2 and 0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1,
                 f"--crop-scale must be two fractions 0 < lo <= hi <= 1, got {cfg.crop_scale}")
    common.check(cfg.image_size % 32 == 0,
                 f"--image-size must be a multiple of 32 (FPN), got {cfg.image_size}")
    common.check(not cfg.show, "--show draws the pretraining views (not with --task seg)")


def parse_config(argv=None):
    """common.parse_config; when the task is seg, again with --preset seg in front and the seg
    presets only, so that SEG's values lie under the preset and the flags given."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = common.parse_config(Config, PRESETS, argv)
    if cfg.task != "seg":
        return cfg
    seg_presets = {name: values for name, values in PRESETS.items() if values.get("task") == "seg"}
    return common.parse_config(Config, seg_presets, ["--preset", "seg"] + argv)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------

def simsiam_projector(in_dim, dim):
    """SimSiam projector: 3 x [Linear (no bias) -> BN], ReLU between, last BN without affine
    (SimSiam Sec. 4)."""
    return nn.Sequential(
        nn.Linear(in_dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
        nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
        nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim, affine=False))


def simsiam_predictor(dim, hidden_dim):
    """SimSiam predictor: bottleneck Linear (no bias) -> BN -> ReLU -> Linear (with bias)."""
    return nn.Sequential(nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, dim))


def dense_projector(in_dim, hidden_dim, out_dim, num_hidden=2):
    """Projector g of Sec. 3.1 as 1x1 convs: num_hidden x [Conv (no bias) -> BN -> ReLU], then
    Conv -> BN(affine=False).

    Paper: "three 1x1 convolutional layers followed by BN and ReLU ... the last BN layer does not
    use learnable affine transformation". The last conv keeps its bias, as in the released seg
    code (harmless before the BN)."""
    layers, width = [], in_dim
    for _ in range(num_hidden):
        layers += [nn.Conv2d(width, hidden_dim, 1, bias=False), nn.BatchNorm2d(hidden_dim),
                   nn.ReLU(inplace=True)]
        width = hidden_dim
    layers += [nn.Conv2d(width, out_dim, 1), nn.BatchNorm2d(out_dim, affine=False)]
    return nn.Sequential(*layers)


def dense_predictor(dim, hidden_dim):
    """Predictor h as 1x1 convs: Conv (no bias) -> BN -> ReLU -> Conv (with bias)."""
    return nn.Sequential(nn.Conv2d(dim, hidden_dim, 1, bias=False), nn.BatchNorm2d(hidden_dim),
                         nn.ReLU(inplace=True), nn.Conv2d(hidden_dim, dim, 1))


class DenseSiam(nn.Module):
    """Pretraining mode: encoder f (ResNet, res5 map) with a global SimSiam branch, PixSim heads
    g/h on the dense map and RegionSim heads g'/h' on region embeddings. One network, no target
    copy (SimSiam)."""

    def __init__(self, cfg):
        super().__init__()
        self.backbone = common.ResNetTrunk(cfg.arch, cfg.stem)
        width = self.backbone.channels["res5"]
        self.projector = simsiam_projector(width, cfg.proj_dim)
        self.predictor = simsiam_predictor(cfg.proj_dim, cfg.pred_hidden)
        self.dense_projector = dense_projector(width, cfg.dense_dim, cfg.dense_dim)
        self.dense_predictor = dense_predictor(cfg.dense_dim, cfg.dense_pred_hidden)
        # g' is "a three-layer MLP head" (Sec. 3.3) as the SimSiam projector; h' as its predictor
        self.region_projector = simsiam_projector(width, cfg.region_dim)
        self.region_predictor = simsiam_predictor(cfg.region_dim, cfg.region_dim)

    def forward(self, views, grids, with_region):
        """views: two B x 3 x S x S; grids: two B x K x K x 2 (grid_sample coords of the shared
        points). Returns one dict per view (BN statistics per view, as SimSiam): global z/p
        (B x proj_dim), dense z/p at the grid points (B x dense_dim x K x K) and, when with_region,
        region u/v (B x N x region_dim)."""
        outputs = []
        for view, grid in zip(views, grids):
            feature_map = self.backbone(view)["res5"]                    # B x C x h x w
            z = self.projector(global_pool(feature_map))                # B x proj_dim
            dense_z = self.dense_projector(feature_map)                  # B x N x h x w
            dense_p = self.dense_predictor(dense_z)
            # Table 4d: grid sampling after projector AND predictor (both run on the whole map)
            out = dict(z=z, p=self.predictor(z), dense_z=grid_sample_points(dense_z, grid),
                       dense_p=grid_sample_points(dense_p, grid))       # B x N x K x K
            if with_region:
                # Eq. 4 inside the intersection: masks from the sampled z, features sampled at the
                # same points
                regions = region_embeddings(out["dense_z"],
                                            grid_sample_points(feature_map, grid))  # B x N x C
                v = self.region_projector(regions.flatten(0, 1))         # (B N) x region_dim
                out.update(v=v.view(regions.shape[0], regions.shape[1], -1),
                           u=self.region_predictor(v).view(regions.shape[0], regions.shape[1], -1))
            outputs.append(out)
        return outputs


class FPNDecoder(nn.Module):
    """PiCIE's simplified FPN, as in the seg mode (Sec. 4; released models/architectures/picie.py).

    1x1 lateral convs (with bias) bring res5..res2 to `dim` channels; top-down: bilinear upsample
    (align_corners=False) and add. No 3x3 smoothing, no norm, no activation. Output: the
    res2-resolution map (stride 4)."""

    def __init__(self, in_channels, dim=128):
        super().__init__()
        self.laterals = nn.ModuleDict({name: nn.Conv2d(in_channels[name], dim, 1)
                                       for name in common.STAGES})

    def forward(self, feats):
        out = self.laterals["res5"](feats["res5"])                       # B x D x H/32 x W/32
        for name in ("res4", "res3", "res2"):
            lateral = self.laterals[name](feats[name])
            out = F.interpolate(out, size=lateral.shape[-2:], mode="bilinear",
                                align_corners=False) + lateral
        return out                                                        # B x D x H/4 x W/4


class SegDenseSiam(nn.Module):
    """Seg mode (released code's DenseSimSiam config): ResNet + FPN encoder, N-class head g/h (the
    segmenter), N_aux-class over-clustering head, RegionSim heads on FPN features. No global
    branch in this mode."""

    def __init__(self, cfg):
        super().__init__()
        self.backbone = common.ResNetTrunk(cfg.arch, cfg.stem)
        self.decoder = FPNDecoder(self.backbone.channels, cfg.fpn_dim)
        self.projector = dense_projector(cfg.fpn_dim, cfg.fpn_dim, cfg.num_classes)
        self.predictor = dense_predictor(cfg.num_classes, cfg.fpn_dim)
        self.aux_projector = dense_projector(cfg.fpn_dim, cfg.fpn_dim, cfg.num_aux_classes)
        self.aux_predictor = dense_predictor(cfg.num_aux_classes, cfg.fpn_dim)
        self.region_projector = simsiam_projector(cfg.fpn_dim, cfg.fpn_dim)
        self.region_predictor = simsiam_predictor(cfg.fpn_dim, cfg.fpn_dim)

    def encode(self, images):
        return self.decoder(self.backbone(images))                        # B x D x S/4 x S/4

    def segment(self, images):
        """Inference: class logits B x N x S/4 x S/4 = g(f(x)) (no predictor, as the released
        evaluator)."""
        return self.projector(self.encode(images))

    def forward(self, views, crop, with_region):
        """views: view 1 = the image's crop = (boxes, flips) resized to S, view 2 = the whole
        image resized to S. View 2's feature map is cropped with the same boxes/flips, so
        both maps cover the same pixels and PixSim compares them position by position (released
        code: view 1 cropped on the image, view 2 on the features)."""
        feats1 = self.encode(views[0])                                   # B x D x s x s
        feats2 = crop_resize(self.encode(views[1]), *crop, feats1.shape[-1])  # aligned with feats1
        outputs = []
        for feats in (feats1, feats2):
            z, aux_z = self.projector(feats), self.aux_projector(feats)  # B x N (N_aux) x s x s
            out = dict(z=z, p=self.predictor(z), aux_z=aux_z, aux_p=self.aux_predictor(aux_z))
            if with_region:
                regions = region_embeddings(z, feats)     # B x N x D, over the whole aligned map
                v = self.region_projector(regions.flatten(0, 1))
                out.update(v=v.view(regions.shape), u=self.region_predictor(v).view(regions.shape))
            outputs.append(out)
        return outputs


# --------------------------------------------------------------------------------------------------
# PixSim geometry: K x K grid inside the intersection of two crops (Sec. 3.2; test_d6_grid_recipe)
# --------------------------------------------------------------------------------------------------

def box_intersection(boxes1, boxes2):
    """Intersection of two batches of edge-based normalised boxes (x0, y0, x1, y1) -> (B x 4,
    B bool: non-empty)."""
    inter = torch.cat([torch.maximum(boxes1[:, :2], boxes2[:, :2]),
                       torch.minimum(boxes1[:, 2:], boxes2[:, 2:])], 1)
    valid = (inter[:, 2] > inter[:, 0]) & (inter[:, 3] > inter[:, 1])
    return inter, valid


def view_grid(points, box, flip):
    """Map points of the original image (B x K x K x 2, normalised (x, y)) to one view's
    grid_sample coordinates.

    common.augment's boxes are edge-based: column j of an unflipped view of size S samples
    x = x0 + (j + 0.5)/S * (x1 - x0), so x sits at s = (x - x0)/(x1 - x0) of the view's width, and
    grid_sample(align_corners=False) takes 2s - 1 (-1/+1 are the outer edges of the border pixels).
    A flipped view is the unflipped one mirrored: s -> 1 - s. The view's feature map covers the
    view edge to edge, so the same grid reads any stage of it."""
    x0, y0, x1, y1 = (box[:, i].view(-1, 1, 1) for i in range(4))
    s = (points[..., 0] - x0) / (x1 - x0)
    t = (points[..., 1] - y0) / (y1 - y0)
    s = torch.where(flip.view(-1, 1, 1), 1.0 - s, s)
    return torch.stack([2.0 * s - 1.0, 2.0 * t - 1.0], dim=-1)  # B x K x K x 2, last dim (x, y)


def intersection_grids(boxes1, flips1, boxes2, flips2, grid_size):
    """K x K cell-centre points of each image's crop intersection, as grid_sample grids of view 1
    and view 2.

    Returns grid1, grid2 (B x K x K x 2) and valid (B bool). Where the crops do not overlap
    (possible with crop scale 0.2) the grids are meaningless and valid is False: the losses mask
    those images out."""
    inter, valid = box_intersection(boxes1, boxes2)
    steps = (torch.arange(grid_size, device=boxes1.device, dtype=boxes1.dtype) + 0.5) / grid_size
    xs = inter[:, 0:1] + steps * (inter[:, 2:3] - inter[:, 0:1])         # B x K
    ys = inter[:, 1:2] + steps * (inter[:, 3:4] - inter[:, 1:2])         # B x K
    points = torch.stack([xs[:, None, :].expand(-1, grid_size, -1),      # row i, column j:
                          ys[:, :, None].expand(-1, -1, grid_size)], dim=-1)  # (x_j, y_i)
    return view_grid(points, boxes1, flips1), view_grid(points, boxes2, flips2), valid


def grid_sample_points(maps, grid):
    """Bilinear samples of B x C x H x W maps at B x K x K x 2 grid points -> B x C x K x K (fp32).

    One edge of the intersection lies on an edge of one of the views, so the outer points fall in
    the outer half cell of that view's map: padding_mode="border" reads them from the edge cells
    (zero padding would blend in zeros: 2.5 -> 0.78 on a 2 x 2 map). It is the rule of crop_resize
    and of F.interpolate, which crops the feature map in the released seg code (ZwwWayne/DenseSiam
    densesiam/datasets/pipelines/index_transforms.py, ReplayRandomResizedCrop); the released code
    has no grid sampling (its pretraining mode is not released).
    Float32 with autocast off: a bf16 grid would move the points by up to ~0.05 cells at 56 x 56."""
    with torch.autocast(maps.device.type, enabled=False):
        return F.grid_sample(maps.float(), grid.float(), mode="bilinear", padding_mode="border",
                             align_corners=False)


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------

def negative_cosine(p, z):
    """Eq. 2 per position: -cos(p, stopgrad(z)) along dim 1, float32. B x C [x ...] -> B [x ...]."""
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=1)


def ce_similarity(p, z):
    """Eq. 3 per position: cross-entropy between class distributions along dim 1, target
    stop-gradded.

    NOTE: the paper writes -softmax(p) . log softmax(z); the released code uses the target z as the
    distribution and p inside the log, -softmax(z) . log softmax(p), a proper cross-entropy of p
    against z (its value: test_d1_ce_similarity). We follow the code."""
    return -(F.softmax(z.detach().float(), dim=1) * F.log_softmax(p.float(), dim=1)).sum(dim=1)


DISTANCES = {"cosine": negative_cosine, "ce": ce_similarity}


def simsiam_loss(p1, z1, p2, z2):
    """SimSiam on global embeddings: 1/2 D(p1, sg z2) + 1/2 D(p2, sg z1), D = negative cosine.
    Range [-1, 1]."""
    return 0.5 * negative_cosine(p1, z2).mean() + 0.5 * negative_cosine(p2, z1).mean()


def masked_mean(per_image, valid):
    """Mean of per-image values over the images where valid is True (0, still in the graph, when
    there are none)."""
    weights = valid.to(per_image.dtype)
    return (per_image * weights).sum() / weights.sum().clamp(min=1.0)


def pixsim_loss(p1, z1, p2, z2, valid=None, distance="cosine"):
    """Eq. 1 on dense outputs (B x C x K x K, or whole aligned maps): symmetric, stop-gradient on
    z, mean over positions then over images; valid (B bool) masks out images whose two crops do
    not overlap."""
    dist = DISTANCES[distance]
    per_image = (0.5 * dist(p1, z2) + 0.5 * dist(p2, z1)).flatten(1).mean(1)   # B
    return per_image.mean() if valid is None else masked_mean(per_image, valid)


def region_embeddings(region_logits, feats):
    """Eq. 4: e[n] = sum over positions of softmax_n(logits) * feats. B x N x ..., B x C x ... ->
    B x N x C.

    NOTE: masks are the softmax over the N channels of z (released code; Eq. 4 writes z itself).
    A sum, not a mean (Eq. 4 and the code); gradients flow through the masks, as in the code."""
    masks = F.softmax(region_logits.float().flatten(2), dim=1)            # B x N x P
    return torch.einsum("bnp,bcp->bnc", masks, feats.float().flatten(2))  # B x N x C


def region_contrast(u, v, temperature):
    """Eq. 6 per image: InfoNCE of region n of u against every region of v of the SAME image;
    positive = region n. u, v: B x N x D -> B values (mean over regions).

    NOTE: Eq. 6 uses raw dot products and sums over regions; the released code l2-normalises u
    and v (kernel_norm=True), divides by T = 0.1 and averages over regions. We follow the code.
    v is NOT stop-gradded (neither Eq. 5 nor the code detaches it)."""
    u, v = F.normalize(u.float(), dim=-1), F.normalize(v.float(), dim=-1)
    logits = torch.einsum("bnd,bmd->bnm", u, v) / temperature            # B x N x N
    return -torch.diagonal(F.log_softmax(logits, dim=-1), dim1=1, dim2=2).mean(1)


def regionsim_loss(u1, v1, u2, v2, temperature, valid=None):
    """Eq. 5: 1/2 Lc(u1, v2) + 1/2 Lc(u2, v1), averaged over (valid) images."""
    per_image = (0.5 * region_contrast(u1, v2, temperature)
                 + 0.5 * region_contrast(u2, v1, temperature))
    return per_image.mean() if valid is None else masked_mean(per_image, valid)


def self_label_loss(logits, target_logits, rebalance):
    """L_seg of Sec. 4: cross-entropy of logits against the pseudo-labels
    argmax(stopgrad(target_logits)) (dim 1).

    NOTE: with rebalance each pixel loss is multiplied by the batch frequency of its pseudo-class,
    as the released code does (rebalance_seg=True: F.cross_entropy(weight=frequency,
    reduction='none')). The weights are raw frequencies, not renormalised, so frequent classes
    weigh MORE and the term is ~1/N of the unweighted one; the paper calls it "class-balanced". We
    keep the code's behaviour: its numbers are the published ones (test_d2_self_label_loss)."""
    labels = target_logits.detach().argmax(dim=1)                          # B x H x W
    weight = None
    if rebalance:
        pixels = labels.flatten()  # counted with index_add_: bincount reads its max on the host
        counts = torch.zeros(logits.shape[1], device=pixels.device).index_add_(
            0, pixels, torch.ones_like(pixels, dtype=torch.float))
        weight = counts / counts.sum()
    return F.cross_entropy(logits.float(), labels, weight=weight, reduction="none").mean()


def auto_loss_weights(num_classes, num_aux_classes):
    """Sec. 4: lambda1 = log N_aux / (log N + log N_aux) (main head), lambda4 = log N / (...)
    (aux head)."""
    denominator = math.log(num_classes) + math.log(num_aux_classes)
    return math.log(num_aux_classes) / denominator, math.log(num_classes) / denominator


def region_weight_at(step, total_steps, start_fraction, weight):
    """RegionSim weight at a step: 0 before start_fraction of training, `weight` from then on
    (Table 4f)."""
    return weight if step >= int(start_fraction * total_steps) else 0.0


def densesiam_loss(outputs, valid, dense_weight, region_weight, cfg):
    """Eq. 7: L_sim + lambda1 L_dense + lambda2 L_region. Returns (total, the terms detached)."""
    first, second = outputs
    terms = dict(sim=simsiam_loss(first["p"], first["z"], second["p"], second["z"]),
                 dense=pixsim_loss(first["dense_p"], first["dense_z"], second["dense_p"],
                                   second["dense_z"], valid, cfg.dense_loss))
    total = terms["sim"] + dense_weight * terms["dense"]
    if region_weight > 0:
        terms["region"] = regionsim_loss(first["u"], first["v"], second["u"], second["v"],
                                         cfg.region_temperature, valid)
        total = total + region_weight * terms["region"]
    return total, {f"loss_{name}": value.detach() for name, value in terms.items()}


def seg_loss(outputs, region_weight, cfg):
    """Eq. 8: lambda1 L_dense + lambda4 L_aux (log-N weights) + lambda3 L_seg + lambda2 L_region."""
    first, second = outputs
    w_dense, w_aux = auto_loss_weights(cfg.num_classes, cfg.num_aux_classes)
    terms = dict(dense=pixsim_loss(first["p"], first["z"], second["p"], second["z"],
                                   distance=cfg.dense_loss),
                 aux=pixsim_loss(first["aux_p"], first["aux_z"], second["aux_p"], second["aux_z"],
                                 distance=cfg.dense_loss),
                 seg=0.5 * (self_label_loss(first["z"], first["z"], cfg.rebalance)
                            + self_label_loss(second["z"], second["z"], cfg.rebalance)))
    total = w_dense * terms["dense"] + w_aux * terms["aux"] + cfg.seg_weight * terms["seg"]
    if region_weight > 0:
        terms["region"] = regionsim_loss(first["u"], first["v"], second["u"], second["v"],
                                         cfg.region_temperature)
        total = total + region_weight * terms["region"]
    return total, {f"loss_{name}": value.detach() for name, value in terms.items()}


# --------------------------------------------------------------------------------------------------
# Train loop
# --------------------------------------------------------------------------------------------------

def train(cfg, dist):
    seg = cfg.task == "seg"  # Sec. 4: the FPN segmenter, its views and loss, an mIoU monitor
    method = "densesiam-seg" if seg else "densesiam"
    torch.manual_seed(cfg.seed)
    out = common.prepare_output_dir(cfg.out) if dist.is_main else None
    autocast_dtype, memory_format = common.device_setup(dist, cfg.precision)
    world_batch = cfg.batch_size
    batch_per_rank = world_batch // dist.world_size
    if seg:
        load_size = cfg.load_size or 2 * cfg.image_size
        eval_size = cfg.eval_size or cfg.image_size
        train_loader, val_loader = common.make_seg_loaders(cfg, dist, batch_per_rank, load_size,
                                                           eval_size)
    else:
        train_loader, bank_loader, val_loader = common.make_loaders(cfg, dist)  # uint8, on device
    steps_per_epoch = len(train_loader)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    peak_lr = cfg.base_lr * world_batch / 256

    model = (SegDenseSiam if seg else DenseSiam)(cfg).to(dist.device, memory_format=memory_format)
    if cfg.init:
        common.load_torchvision_weights(model.backbone, cfg.init)
    if cfg.sync_bn and dist.device.type == "cuda" and dist.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # NOTE: SimSiam's SGD decays every parameter (BN and biases included); no LARS. SimSiam's
    # optional fixed predictor lr is not used (the DenseSiam paper does not mention it).
    optimizer = torch.optim.SGD([dict(params=list(model.parameters()), lr_mult=1.0)], lr=peak_lr,
                                momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    step = 0
    if common.should_resume(cfg):  # --resume, or a torchrun --max-restarts restart with a last.pt
        state = common.load_checkpoint(f"{cfg.out}/last.pt", method=method)
        common.check_resume_compatible(state, cfg, keys=("arch", "stem", "image_size", "epochs",
                                                         "batch_size", "num_classes",
                                                         "num_aux_classes"))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        common.set_rng_state(state["rng"])
        step = state["step"]
        print0(f"resumed from {cfg.out}/last.pt at step {step}")

    # The RegionSim heads get no gradient before region_start: DDP must be told that some
    # parameters may be unused.
    region_switches_on = cfg.region_weight > 0 and cfg.region_start > 0
    ddp_model = (DistributedDataParallel(model, find_unused_parameters=region_switches_on)
                 if dist.world_size > 1 else model)
    online_forward = ddp_model
    common.compile_colour_ops(cfg.compile)  # --compile also fuses the colour-jitter ops
    if cfg.compile:
        online_forward = torch.compile(online_forward)

    derived = dict(
        peak_lr=peak_lr, batch_per_rank=batch_per_rank, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, region_start_step=int(cfg.region_start * total_steps))
    if seg:
        w_dense, w_aux = auto_loss_weights(cfg.num_classes, cfg.num_aux_classes)
        derived.update(load_size=load_size, eval_size=eval_size, dense_weight=round(w_dense, 6),
                       aux_weight=round(w_aux, 6))
    common.print_run_header(method, cfg, dist, derived)
    log = common.MetricsLog(f"{cfg.out}/metrics.jsonl", dist.is_main)
    stop = common.StopSignal()

    def save(epoch, reason):
        if dist.is_main:
            state = dict(method=method, config=common.config_dict(cfg), step=step, epoch=epoch,
                         model=model.state_dict(),
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

    def miou(epoch):  # seg: Hungarian-matched mIoU of the segmenter on val
        scores = common.evaluate_segmentation(model, val_loader, cfg.num_classes, cfg.num_things,
                                              eval_size, autocast_dtype)
        scores.pop("cluster_to_class")
        print0(f"epoch {epoch}: mIoU {100 * scores['miou']:.2f}%  pixel acc "
               f"{100 * scores['pixel_acc']:.2f}%  things {100 * scores['miou_things']:.2f}%  "
               f"stuff {100 * scores['miou_stuff']:.2f}%")
        log.write(epoch=epoch, step=step, **scores)
        return scores

    monitor, monitor_every = (miou, cfg.eval_every) if seg else (knn, cfg.knn_every)
    key = "scores" if seg else "knn"  # what train() returns the last monitor's result as
    if step == 0 and (seg or cfg.knn_every > 0):
        monitor(0)  # the random-init baseline every report compares against
    monitored = None
    empty_pairs = torch.zeros((), dtype=torch.long, device=dist.device)  # crops without overlap
    timer = common.Timer(dist.device)  # images/s and data-wait fraction between log points
    start_epoch = step // steps_per_epoch
    for epoch in range(start_epoch, cfg.epochs):
        train_loader.set_epoch(epoch, start_batch=step - epoch * steps_per_epoch)
        bar = common.progress(common.timed(train_loader, timer), dist.is_main,
                              desc=f"epoch {epoch + 1}/{cfg.epochs}",
                              initial=step - epoch * steps_per_epoch, total=steps_per_epoch)
        for images, _ in bar:  # seg: the labels are never used for training
            # NOTE: seg: constant lr (Sec. 5.1: "the constant learning schedule works better")
            lr = peak_lr if seg else lr_at(step, total_steps, warmup_steps, peak_lr)
            region_weight = region_weight_at(step, total_steps, cfg.region_start, cfg.region_weight)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]

            generator = common.step_generator(dist.device, cfg.seed, dist.rank, step)
            if seg:  # photometric copies of the whole image, then one crop and flip for both
                pixels = images.float().div_(255)
                colour1 = common.color_augment(pixels, common.SEG_PHOTOMETRIC, generator)
                colour2 = common.color_augment(pixels, common.SEG_PHOTOMETRIC, generator)
                geometry = common.seg_crop_boxes(len(images), load_size, cfg.crop_scale, generator,
                                                 images.device)
                views = common.seg_views(colour1, colour2, *geometry, cfg.image_size)
            else:  # SimSiam views, read by PixSim at the K x K points of their crops' intersection
                views, boxes, flips = zip(*(augment(images, common.SIMSIAM_VIEW, cfg.image_size,
                                                    generator) for _ in range(2)))
                *geometry, valid = intersection_grids(boxes[0], flips[0], boxes[1], flips[1],
                                                      cfg.grid_size)
                empty_pairs += (~valid).sum()
            views = [view.contiguous(memory_format=memory_format) for view in views]
            with torch.autocast(dist.device.type, dtype=autocast_dtype or torch.bfloat16,
                                enabled=autocast_dtype is not None):
                outputs = online_forward(views, geometry, region_weight > 0)
            if seg:
                loss, terms = seg_loss(outputs, region_weight, cfg)
            else:
                loss, terms = densesiam_loss(outputs, valid, cfg.dense_weight, region_weight, cfg)

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            timer.add(images.shape[0] * dist.world_size)

            at_epoch_end = step % steps_per_epoch == 0
            stopping = step == cfg.stop_after or (step % cfg.log_every == 0 and stop.agreed())
            checkpoint_now = (stopping or at_epoch_end
                              or (cfg.ckpt_every_steps and step % cfg.ckpt_every_steps == 0))
            if step % cfg.log_every == 0 or checkpoint_now:  # the only host syncs of the loop
                values = common.check_finite(step, dict(loss=loss, **terms), f"{cfg.out}/last.pt")
                empty = round(common.all_reduce_mean(empty_pairs.float()).item() * dist.world_size)
                empty_pairs.zero_()
                images_per_s, data_wait = timer.rate()
                bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.3g}", empty=empty,
                                img_s=f"{images_per_s:.0f}")
                log.write(step=step, epoch=epoch, **values, region_weight=region_weight,
                          empty_intersections=empty, lr=lr,
                          images_per_s=images_per_s, data_wait=data_wait)
            if checkpoint_now and (stopping or not at_epoch_end):  # else: the epoch-end save
                save(step // steps_per_epoch, "step")
            if stopping:
                print0(f"stopped at step {step} ({stop.received or 'stop_after'}); "
                       "resume with --resume")
                stop.exit_if_received()  # on a signal: exit 128 + signal number, checkpoint saved
                return dict(model=model, step=step, **{key: None})
        bar.close()
        last_epoch = epoch + 1 == cfg.epochs
        save(epoch + 1, "keep" if cfg.keep_every and (epoch + 1) % cfg.keep_every == 0 else "epoch")
        if last_epoch or (monitor_every and (epoch + 1) % monitor_every == 0):
            monitored = monitor(epoch + 1)
    final = "" if monitored is None else (f", final mIoU {100 * monitored['miou']:.2f}%"
                                          if seg else f", final kNN top-1 {monitored:.2f}%")
    print0(f"done: {cfg.out}/last.pt{final}")
    return dict(model=model, step=step, **{key: monitored})


# --------------------------------------------------------------------------------------------------
# Show
# --------------------------------------------------------------------------------------------------

def show(cfg, dist):
    """--show: <out>/show.png, the two views of four images as train() makes them at step 0, with
    the PixSim grid: the K x K points of the crop intersection at which both views are read out."""
    images, generator = common.show_batch(cfg, dist)
    views, boxes, flips = zip(*(augment(images, common.SIMSIAM_VIEW, cfg.image_size, generator)
                                for _ in range(2)))
    grid1, grid2, valid = intersection_grids(boxes[0], flips[0], boxes[1], flips[1], cfg.grid_size)
    intersections = box_intersection(boxes[0], boxes[1])[0]
    k = cfg.grid_size
    lattice = ([(n, n + 1) for n in range(k * k) if n % k < k - 1]      # grid lines: along rows,
               + [(n, n + k) for n in range(k * k - k)])                 # and down columns
    rows = common.view_rows(images, views, boxes, flips)
    for i, row in enumerate(rows):
        if not valid[i]:  # the crops do not overlap: no grid (the losses mask this image out)
            continue
        row[0] = common.draw_boxes(row[0], intersections[i:i + 1], colours=("white",), fill=True)
        for v, grid in ((1, grid1), (2, grid2)):
            points = (grid[i].reshape(1, -1, 2) + 1) / 2  # grid_sample's [-1, 1] -> [0, 1]
            row[v] = common.draw_points(row[v], points, "white", radius=1, connectivity=lattice)
            row[v] = common.draw_points(row[v], points[:, :1], "red", radius=3)  # the first point
    return common.save_picture(
        rows, f"{cfg.out}/show.png",
        "per image: the crops of view 1 (yellow) and view 2 (cyan) and their intersection "
        f"(shaded), then each view ('flip' = mirrored) with the {k} x {k} PixSim points of "
        "intersection_grids (red: the first point, top left of the intersection): the same "
        "points of the image in both views")


def main(argv=None):
    with common.main_errors():  # bad input: one line, exit 2; training failure: exit 3
        cfg = parse_config(argv)
        dist = common.setup_distributed(cfg.device or None)
        check_config(cfg, dist.world_size)
        if cfg.show:
            return show(cfg, dist)
        return train(cfg, dist)


if __name__ == "__main__":
    main()
