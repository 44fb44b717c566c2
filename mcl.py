"""MCL: Multi-Level Contrastive Learning for Dense Prediction Task (Guo et al., arXiv:2304.02010;
ICLR 2023 submission).

Each level s = 0..S-1 of an image batch gets its own augmented view, downsampled by 2^s and shuffled
into montages of 2^s x 2^s tiles the size of the original image (Sec. 3.1, Alg. 1). Backbone + FPN
run on the full images and the montages together; tiles of level s are read from pyramid level
P(5-s), where every tile covers the same number of cells (Sec. 3.2). A region head (4 convs,
pooling, MLP) embeds each tile; a per-level predictor maps it to u. The target network (EMA of
backbone + FPN + head) embeds the other branch's views as v. Every tile is a singleton class:
InfoNCE pulls u towards v of the same source image and pushes it from v of every other image in the
global batch.

    u_s = h_s(g(f(I_s))),  v_t = g'(f'(I'_t))                                                (Eq. 1)
    L_u = -log exp(u.v+/T) / sum_v exp(u.v/T)      v over every image's target of level t    (Eq. 2)
    L   = sum over (s, t) in mode of  (w_s / n_s) * 2T * mean L_u(s -> t)  +  branches swapped
          (L = L_u + L_v; n_s = number of target levels t of s: 1 in modes a, b; 1-2 in c; S in d)
    modes (Sec. 3.3, Fig. 3): a = every level -> level 0 (the official code), b = s -> s,
          c = s -> s +- 1, d = all
    xi <- tau xi + (1 - tau) theta,  tau(k) = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2

Official code: github.com/GuoQiushan/MCL @ 1912aa9 (the paths below are in that repository).
Defaults follow its configs/selfsup/MCL/MCL.py: 4 levels (downsample ratios 1, 2, 4, 8), head MLP
2048 -> 256 wide; --preset imagenet adds the paper's recipe (ResNet-50, 224 px, FPN 256 channels,
LARS lr 16 at batch 4096, wd 1e-5, 100 epochs). The CPU defaults use 32-px images and an FPN of 128
channels (at 256 the FPN alone costs more than the ResNet-18 at 32 px).
NOTE: from the official code, not the paper:
  - tiles per image 1, 1, 1, 2: the last level holds each image twice (MCL.py batch_sizes 128/32/8/4
    montages for 128 images); the paper's Alg. 1 makes B / ratio^2 montages: one tile per image.
  - one predictor h_s per level (openselfsup/models/heads/latent_pred_head.py,
    LatentMultiPredictContrastHead with head_num = 4); the paper's Eq. 1 has a single h.
  - level weights w_s = 1/2, 1/4, 1/8, 1/8 and T = 1 with the x2T factor (MCL.py loss_weight and T;
    latent_pred_head.py multiplies the loss by 2T * w_s); the paper gives neither weights nor T.
NOTE: the official code has mode a only (openselfsup/models/mcl.py, forward_train), where n_s = 1.
Dividing w_s by n_s in modes c and d is ours: each level keeps its total weight w_s in every mode
(the paper gives no weights for those modes).
Where else this file departs from the paper or the official code it says so in a NOTE.

Commands:
    python mcl.py                                    # built-in data, CPU-sized, ~5 min on 2 cores
    python mcl.py --mode c                           # matching mode (a|b|c|d)
    torchrun --standalone --nproc_per_node=2 mcl.py  # same run, 2 processes (CPU: gloo, GPU: nccl)
    torchrun --nproc_per_node=8 mcl.py --data /path/to/imagenet --preset imagenet
    python eval_linear.py --ckpt runs/mcl/last.pt    # kNN + linear probe of the frozen backbone
"""

import dataclasses
from collections import Counter, OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torchvision.ops import roi_align

import common
from common import augment, cosine_tau, ema_update, lr_at, mlp, print0


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Config:
    """MCL pretraining. Defaults: a 2-core CPU on the built-in data. --preset imagenet: paper."""
    # data
    data: str = "synthetic"          # "synthetic", "cifar10", ImageNet layout, or any image folder
    val_data: str = ""               # labelled set for the kNN monitor ("" = --data if labelled)
    synthetic_size: int = 2560       # images in the built-in training set (val: as many again)
    image_size: int = 32             # px of each augmented view and montage; paper: 224
    load_size: int = 0               # px of the square decoded before cropping; 0 = image_size
                                     # (folders: 256/224 of it)
    workers: int = 8                 # DataLoader workers per process (folder data only)
    gpu_decode: bool = False         # folder data: workers read JPEG bytes, the GPU decodes them
    crop_min_scale: float = 0.25     # smallest random-resized-crop area; paper/official: 0.2
                                     # (byol.py's 32-px default kept)
    # model
    arch: str = "resnet18"           # resnet18 | resnet50 (paper)
    stem: str = "imagenet"           # imagenet (7x7/2 + max-pool) | cifar (3x3/1, no pool)
    fpn_dim: int = 128               # FPN and head conv channels; paper: 256
    head_convs: int = 4              # 3x3 conv + BN + ReLU layers of the region head; paper: 4
    hidden_dim: int = 2048           # hidden width of the head MLP and the predictors; paper: 2048
    proj_dim: int = 256              # embedding width; paper: 256
    sync_bn: bool = True             # SyncBatchNorm across processes (CUDA only); paper: yes
    # method
    mode: str = "a"                  # matching mode a|b|c|d (Sec. 3.3); paper/official default: a
    level_weights: tuple = (0.5, 0.25, 0.125, 0.125)  # w_s; length = levels (<= 4); paper: none
    level_copies: tuple = (1, 1, 1, 2)                 # tiles per image; paper Alg. 1: all 1
    temperature: float = 1.0         # InfoNCE T, loss x 2T; official: 1.0; paper: none
    # optimisation
    epochs: int = 4                  # paper: 100; 4: a CPU run under 5 minutes
    batch_size: int = 128            # GLOBAL batch over all processes; paper: 4096
    base_lr: float = 1.0             # peak lr = base_lr * batch_size / 256;
                                     # paper: 1.0
    final_lr: float = 1e-4           # lr at the end of the cosine; official config: 1e-4 (absolute)
    weight_decay: float = 1e-5       # LARS weight decay (not on biases/BN);
                                     # paper: 1e-5
    lars_form: str = "openselfsup"   # LARS update rule: openselfsup = official code | optax (BYOL);
                                     # openselfsup keeps the lr inside the momentum buffer
    warmup_epochs: float = 1.0       # linear lr warmup; paper: 10
    tau_base: float = 0.99           # initial target momentum, cosine to 1;
                                     # paper: 0.99
    grad_clip: float = 500.0         # clip the global gradient norm to this (0 = off); official
                                     # config: 500 (the paper does not say)
    # run
    seed: int = 0
    out: str = "runs/mcl"            # checkpoints, metrics.jsonl
    resume: bool = False             # continue from <out>/last.pt
    knn_every: int = 4               # epochs between kNN monitors (0 = only at the end)
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


# Paper Sec. 4.1 + official configs/selfsup/MCL/MCL.py: LARS, 4096 global batch (32 x 128),
# lr 1.0 * B / 256 = 16, wd 1e-5, 10-epoch warmup, cosine to 1e-4, EMA 0.99 -> 1.
_PAPER = dict(crop_min_scale=0.2, arch="resnet50", stem="imagenet", image_size=224, batch_size=4096,
              base_lr=1.0, final_lr=1e-4, weight_decay=1e-5, warmup_epochs=10.0, tau_base=0.99,
              fpn_dim=256, hidden_dim=2048, proj_dim=256, knn_every=10, workers=10)
PRESETS = {
    "imagenet": dict(_PAPER, epochs=100),        # Sec. 4.1 default: Tables 2-6, 9, 10a-e
    "imagenet-200ep": dict(_PAPER, epochs=200),  # Table 10f (RetinaNet after 200 / 400 epochs)
    "imagenet-400ep": dict(_PAPER, epochs=400),
    # Sec. 4.1, Table 1: COCO train2017 + unlabeled2017 (~241k images; --data one folder holding
    # both), 530 epochs "to match the training iteration on ImageNet", the rest unchanged. NOTE:
    # warmup is "the first 10 epochs" in the paper; the official config counts it in iterations
    # (3127 = 10 ImageNet epochs = ~53 COCO epochs at batch 4096). We follow the paper's text.
    "coco": dict(_PAPER, epochs=530, knn_every=50),
    # CIFAR-10 with the usual small-image changes (3x3 stem, 32 px); not a paper recipe.
    # At 32 px P5 is 4x4, every tile 4x4 cells.
    "cifar10": dict(data="cifar10", arch="resnet18", stem="cifar", image_size=32,
                    batch_size=512, epochs=200, base_lr=1.0, weight_decay=1e-5,
                    warmup_epochs=10.0, tau_base=0.99, fpn_dim=256, knn_every=10),
}

P5_STRIDE = {"imagenet": 32, "cifar": 8}  # stride of res5 / P5 for each ResNetTrunk stem


def check_config(cfg, world_size):
    """What main() checks before any data or model is built: the common checks and MCL's."""
    common.check_common_config(cfg, world_size)
    levels = len(cfg.level_weights)
    common.check(cfg.mode in ("a", "b", "c", "d"), f"--mode must be a, b, c or d, got {cfg.mode!r}")
    common.check(cfg.grad_clip >= 0, f"--grad-clip must be >= 0 (0 = off), got {cfg.grad_clip}")
    common.check(1 <= levels <= 4, f"--level-weights: 1 to 4 levels (P5..P2), got {levels}")
    common.check(len(cfg.level_copies) == levels,
                 f"--level-copies has {len(cfg.level_copies)} entries "
                 f"but --level-weights has {levels}")
    common.check(cfg.level_copies[0] == 1 and all(int(c) == c and c >= 1 for c in cfg.level_copies),
                 "--level-copies must be positive integers starting with 1 "
                 f"(level 0 = full images), got {cfg.level_copies}")
    common.check(cfg.mode != "c" or levels >= 2,
                 "--mode c (adjacent levels) needs at least 2 levels")
    common.check(cfg.image_size % 2 ** (levels - 1) == 0,
                 f"--image-size {cfg.image_size} must be divisible by {2 ** (levels - 1)} "
                 "(the smallest tile ratio)")
    common.check(cfg.temperature > 0, f"--temperature must be positive, got {cfg.temperature}")
    common.check(cfg.batch_size >= 2, "--batch-size must be at least 2 (InfoNCE needs negatives)")


# --------------------------------------------------------------------------------------------------
# Montage assembly (Sec. 3.1, Alg. 1)
# --------------------------------------------------------------------------------------------------

def montage_counts(batch, level_copies):
    """How many images each level feeds to the network, from a per-rank batch of `batch` images.

    Level 0 is the full images; level s > 0 tiles ratio x ratio sub-images (ratio = 2^s) into each
    montage and holds level_copies[s] tiles per image. The official config (N = 128 per GPU,
    batch_sizes 128/32/8/4) is level_copies (1, 1, 1, 2): 128, 128, 128 and 256 tiles, 172 network
    inputs per branch.
    The paper's Alg. 1 (B / ratio^2 montages) is level_copies (1, 1, 1, 1).
    NOTE: we round the montage count up so every image appears at least level_copies[s] times even
    when N * copies is not a multiple of ratio^2 (tiny CPU batches); the official code only runs
    with exact multiples.
    """
    counts = []
    for level, copies in enumerate(level_copies):
        tiles_per_montage = 4 ** level
        # ceil division
        counts.append(batch if level == 0 else -(-batch * int(copies) // tiles_per_montage))
    return counts


def assemble_montages(views, ratio, num_montages, generator=None, order=None):
    """Alg. 1: downsample by `ratio` (nearest), shuffle, tile ratio x ratio sub-images row-major
    into montages.

    views: B x C x H x W (one independently augmented view of every image of this rank).
    Returns montages M x C x (ratio*h) x (ratio*w) with h = H // ratio, and tile_ids (M*ratio^2,)
    long: tile (m, row, col) holds views[tile_ids[m*ratio^2 + row*ratio + col]].
    The shuffle is a random permutation of the M*ratio^2 slots taken modulo B (official
    `random_combine_img`), so image i appears ceil((M*ratio^2 - i) / B) times. `order` replaces the
    permutation (tests).
    NOTE: nearest-neighbour downsampling, as the official code (F.interpolate default in
    random_combine_img, openselfsup/models/mcl.py); it aliases, which the paper does not discuss.
    """
    batch, channels, height, width = views.shape
    slots = num_montages * ratio * ratio
    if order is None:
        order = torch.randperm(slots, generator=generator, device=views.device)
    tile_ids = order % batch                                                # slots
    small = F.interpolate(views, size=(height // ratio, width // ratio),
                          mode="nearest")                                   # B x C x h x w
    h, w = small.shape[-2:]
    tiles = small[tile_ids]                                                 # slots x C x h x w
    montages = tiles.view(num_montages, ratio, ratio, channels, h, w).permute(0, 3, 1, 4, 2, 5)
    return montages.reshape(num_montages, channels, ratio * h, ratio * w), tile_ids


def make_inputs(images, recipes, cfg, counts, generator, memory_format, crops=None):
    """Both branches' network inputs: per branch one stack [full views; level-1 montages; ...] and
    the tile ids.

    images: B x 3 x L x L uint8; recipes: one ViewRecipe per branch. Every level of every branch
    gets its own augmented view (same recipe within a branch, fresh randomness; Sec. 4.1 "augmented
    separately with different random seeds"; official: 8 pipelines, views 0-3 for branch "q" and 4-7
    for branch "k").
    Returns stacks [2 x (sum counts) x 3 x S x S] and
    tile_ids [2 x [level s: (counts[s] * 4^s,) long]].
    crops: a list that receives augment's (boxes, flips) of every view, branch by branch, level by
    level (for --show).
    """
    stacks, tile_ids = [], []
    for recipe in recipes:
        parts, ids = [], []
        for level, count in enumerate(counts):
            view, boxes, flips = augment(images, recipe, cfg.image_size, generator)  # B x 3 x S x S
            if crops is not None:
                crops.append((boxes, flips))
            if level == 0:
                parts.append(view)
                ids.append(torch.arange(images.shape[0], device=images.device))
            else:
                montages, level_ids = assemble_montages(view, 2 ** level, count, generator)
                parts.append(montages)
                ids.append(level_ids)
        stacks.append(torch.cat(parts).contiguous(memory_format=memory_format))
        tile_ids.append(ids)
    return stacks, tile_ids


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------

def conv_norm(in_dim, out_dim, kernel_size, relu=False):
    """Conv (no bias) + BatchNorm [+ ReLU], named `conv` / `norm` so checkpoint keys map 1:1 to a
    detector."""
    layers = [("conv", nn.Conv2d(in_dim, out_dim, kernel_size, padding=kernel_size // 2,
                                 bias=False)),
              ("norm", nn.BatchNorm2d(out_dim))]
    if relu:
        layers.append(("relu", nn.ReLU(inplace=True)))
    return nn.Sequential(OrderedDict(layers))


class FPN(nn.Module):
    """Feature pyramid from res(6-L)..res5 (official config: mmdet FPN with BN, 256 channels, no
    extra levels).

    P_k = output_k(top_k), top_k = lateral_k(res_k) + nearest_upsample(top_(k+1)). Lateral = 1x1
    conv + BN, output = 3x3 conv + BN, no activation (mmdet ConvModule with act_cfg=None). Only the
    levels MCL reads are built (4 levels: P2..P5), so every parameter receives a gradient (DDP needs
    that).
    Keys: lateral.p2.conv.weight, lateral.p2.norm.*, output.p2.conv.weight, ... (detectron2:
    fpn_lateral2, fpn_lateral2.norm, fpn_output2, ...).
    NOTE: PyTorch default conv init; the official code uses xavier-uniform for the FPN convs.
    """

    def __init__(self, in_channels, dim=256, num_levels=4):
        super().__init__()
        self.levels = tuple(f"p{k}" for k in range(6 - num_levels, 6))  # p2..p5 for 4 levels
        self.stages = tuple(f"res{k}" for k in range(6 - num_levels, 6))
        self.lateral = nn.ModuleDict({p: conv_norm(in_channels[s], dim, 1)
                                      for p, s in zip(self.levels, self.stages)})
        self.output = nn.ModuleDict({p: conv_norm(dim, dim, 3) for p in self.levels})

    def forward(self, maps):
        """maps: {"res2": B x C2 x H/4 x W/4, ...}
        -> {"p2": B x dim x H/4 x W/4, ..., "p5": B x dim x H/32 x W/32}."""
        outputs, top_down = {}, None
        for level, stage in zip(reversed(self.levels), reversed(self.stages)):   # p5 first
            lateral = self.lateral[level](maps[stage])
            if top_down is not None:
                lateral = lateral + F.interpolate(top_down, size=lateral.shape[-2:], mode="nearest")
            top_down = lateral
            outputs[level] = self.output[level](top_down)
        return outputs


def tile_windows(feature, ratio):
    """Exact region features: cut each montage's map into its ratio x ratio tile windows, row-major.

    feature: M x C x (ratio*k) x (ratio*k) -> (M*ratio^2) x C x k x k;
    window m*ratio^2 + row*ratio + col is tile (m, row, col), the same order as assemble_montages'
    tile_ids.
    """
    montages, channels, height, width = feature.shape
    k_h, k_w = height // ratio, width // ratio
    windows = feature.view(montages, channels, ratio, k_h, ratio, k_w).permute(0, 2, 4, 1, 3, 5)
    return windows.reshape(montages * ratio * ratio, channels, k_h, k_w)


def tile_windows_roi(feature, ratio, tile_pixels, stride, cells):
    """RoIAlign region features, for tiles that do not sit on the feature lattice.

    Boxes are the tiles' pixel boxes in the montage; spatial_scale = 1 / stride of this pyramid
    level; output cells x cells per tile, in the same row-major order as tile_windows, in the
    feature's dtype.
    The RoIs (batch index and box) stay float32 and RoIAlign runs in float32: bf16 rounds integers
    above 256 (257 -> 256), so a bf16 batch index would make a tile read another montage's features.
    """
    montages, device = feature.shape[0], feature.device
    row, col = torch.meshgrid(torch.arange(ratio, device=device),
                              torch.arange(ratio, device=device), indexing="ij")
    x0, y0 = (col.reshape(-1) * tile_pixels).float(), (row.reshape(-1) * tile_pixels).float()
    boxes = torch.stack([x0, y0, x0 + tile_pixels, y0 + tile_pixels], dim=1)  # r^2 x 4
    index = torch.arange(montages, device=device).repeat_interleave(ratio * ratio).float()
    rois = torch.cat([index[:, None], boxes.repeat(montages, 1)], dim=1)     # (M*r^2) x 5, float32
    windows = roi_align(feature.float(), rois, output_size=cells, spatial_scale=1.0 / stride,
                        sampling_ratio=2, aligned=True)
    return windows.to(feature.dtype)


def region_windows(feature, ratio, tile_pixels, stride):
    """Region features of every tile of one level: exact slicing when tiles sit on the lattice,
    RoIAlign otherwise.

    NOTE: the official code always slices exact 7x7 windows (tiles are lattice-aligned at 224 px);
    the paper speaks of RoI pooling. We slice exactly whenever tile_pixels is a multiple of the
    level's stride, i.e. whenever the image size is divisible by the P5 stride (32 with the imagenet
    stem, 8 with the cifar stem), which covers every preset; otherwise RoIAlign (aligned=True,
    sampling_ratio=2), which bilinearly mixes neighbouring cells.
    """
    cells = tile_pixels // stride
    if (tile_pixels % stride == 0 and cells >= 1
            and feature.shape[-2:] == (ratio * cells, ratio * cells)):
        return tile_windows(feature, ratio)
    return tile_windows_roi(feature, ratio, tile_pixels, stride,
                            max(1, round(tile_pixels / stride)))


class RegionHead(nn.Module):
    """Official `DetConvGpNonLinearHead` (openselfsup/models/necks.py), shared by all levels.

    4 x [3x3 conv (no bias) + BN + ReLU] on the window (zero padding at the window border: windows
    are cut before the convs) -> average pool -> Linear -> BN1d -> ReLU -> Linear ->
    BN1d(affine=False).
    The convs are what a Mask R-CNN "4conv1fc" box head takes over (detectron2 box_head.conv1..4).
    NOTE: PyTorch default init; the official code uses kaiming init for the Linear layers.
    """

    def __init__(self, dim=256, hidden_dim=2048, out_dim=256, num_convs=4):
        super().__init__()
        self.convs = nn.Sequential(*[conv_norm(dim, dim, 3, relu=True) for _ in range(num_convs)])
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                                 nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim),
                                 nn.BatchNorm1d(out_dim, affine=False))

    def forward(self, windows):
        """windows: K x dim x k x k -> K x out_dim."""
        return self.mlp(self.convs(windows).mean(dim=(2, 3)))


class MCL(nn.Module):
    """Online network: backbone -> FPN -> region head (shared by levels) -> one predictor per level.

    The target copies backbone + FPN + head. Attribute names are the checkpoint key prefixes a
    detector export selects (backbone., fpn., head.: eval_linear.py --export / --export-detectron2;
    the paper transfers all three, Tab. 10e).
    """

    def __init__(self, cfg):
        super().__init__()
        num_levels = len(cfg.level_weights)
        self.backbone = common.ResNetTrunk(cfg.arch, cfg.stem)
        self.fpn = FPN(self.backbone.channels, cfg.fpn_dim, num_levels)
        self.head = RegionHead(cfg.fpn_dim, cfg.hidden_dim, cfg.proj_dim, cfg.head_convs)
        # NOTE: one predictor per level, as the official LatentMultiPredictContrastHead (head_num
        # = 4, openselfsup/models/heads/latent_pred_head.py); the paper's Eq. 1 has a single h.
        # NOTE: PyTorch default init; the official predictors use normal(0, 0.01) weights.
        self.predictors = nn.ModuleList([mlp(cfg.proj_dim, cfg.hidden_dim, cfg.proj_dim)
                                         for _ in range(num_levels)])

    def forward(self, stacks, counts, geometry):
        """stacks: per branch (sum counts) x 3 x S x S. Returns predictions[branch][level]:
        K_s x proj_dim."""
        levels = range(len(counts))
        return [[self.predictors[s](z)
                 for s, z in enumerate(embed(self, stack, counts, geometry, levels))]
                for stack in stacks]


def embed(net, stack, counts, geometry, levels):
    """Tile embeddings g(f(I_s)) of a network holding .backbone, .fpn and .head (the online model or
    its target).

    One backbone + FPN pass over the whole stack (full images and every level's montages together,
    as the official code: BN statistics mix all of them); level s reads its rows from P(5-s) and the
    head embeds its tile windows, one head call per level (BN statistics per level, as the official
    neck). Levels not in `levels` give None.
    geometry = (image_size, P5 stride). Returns [level s: (counts[s] * 4^s) x proj_dim or None].
    NOTE: the official neck embeds every window of every image at every level and keeps the ones it
    needs (e.g. 64 P2 windows of each full image); we embed only the windows of the level's own
    tiles, so the head's BN statistics come from those windows alone (and the head costs ~4x less).
    """
    image_size, p5_stride = geometry
    pyramid = net.fpn(net.backbone(stack))
    embeddings, start = [], 0
    for s, count in enumerate(counts):
        rows = slice(start, start + count)
        start += count
        if s not in levels:
            embeddings.append(None)
            continue
        ratio = 2 ** s
        feature = pyramid[f"p{5 - s}"][rows]              # counts[s] x dim x (ratio*k) x (ratio*k)
        windows = region_windows(feature, ratio, image_size // ratio,
                                 p5_stride // ratio)      # tiles x dim x k x k
        embeddings.append(net.head(windows))              # tiles x proj_dim
    return embeddings


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------

def matching_pairs(mode, num_levels):
    """(online level, target level) pairs for each matching mode of Sec. 3.3 (Fig. 3).

    a: every level targets the largest view (level 0): the official code's only mode and the
       paper's best (Tab. 10b).
    b: each level targets its counterpart level.
    c: each level targets its adjacent levels (|s - t| = 1).
    d: dense connection: every level targets every level.
    NOTE: Fig. 3 is the only specification of (b)-(d); whether (c) also keeps s = t is not stated;
    we read "adjacent" strictly (|s - t| = 1).
    """
    levels = range(num_levels)
    pairs = {"a": [(s, 0) for s in levels],
             "b": [(s, s) for s in levels],
             "c": [(s, t) for s in levels for t in levels if abs(s - t) == 1],
             "d": [(s, t) for s in levels for t in levels]}
    if mode not in pairs:
        raise ValueError(f"unknown matching mode {mode!r}; choose a, b, c or d")
    return pairs[mode]


def per_image_keys(embeddings, image_ids, num_images):
    """One l2-normalised target key per image at one level: K x D tile embeddings -> num_images x D.

    Level 0 holds each image once (the key is its normalised embedding, as the official code). At
    montage levels an image can sit in several tiles (level_copies > 1, or rounding up); its key is
    the normalised mean of its tiles' normalised embeddings, so no copy of the positive is ever
    counted as a negative.
    NOTE: only modes (b)-(d) use montage-level targets; the paper does not say how repeated tiles
    are keyed.
    """
    z = F.normalize(embeddings.float(), dim=1)
    sums = torch.zeros(num_images, z.shape[1], device=z.device, dtype=z.dtype)
    sums.index_add_(0, image_ids, z)  # per image: the sum of its tiles' embeddings
    return F.normalize(sums, dim=1)


def info_nce(predictions, keys, labels, temperature):
    """Eq. 2 averaged over predictions, times 2T (the official scaling, latent_pred_head.py).

    predictions K x D (online, any norm), keys M x D (l2-normalised targets of every rank), labels
    K: index of the positive key. Negatives are all other keys. Computed in float32.
    """
    logits = F.normalize(predictions.float(), dim=1) @ keys.float().T  # K x M cosine similarities
    return F.cross_entropy(logits / temperature, labels) * (2 * temperature)


def mcl_loss(predictions, keys, tile_ids, pairs, level_weights, temperature, offset):
    """Symmetric multi-level loss L = L_u + L_v (Sec. 3.2-3.3).

    predictions[branch][s]: online predictor outputs of branch's level-s tiles, K_s x D
    (branch 0 = "q", 1 = "k").
    keys[branch][t]: per-image target keys of branch at level t gathered over ranks, (N*world) x D
    (None if unused).
    tile_ids[branch][s]: local image id of every level-s tile (K_s,); offset = rank * N turns it
    into the global key index (official: gt + N * rank).
    Each online level s of one branch is matched to the other branch's keys at every target level t
    of `pairs`:
    loss_(s,t) = (w_s / n_s) * 2T * CE(cos / T), n_s = number of target levels of s in `pairs`.
    NOTE: splitting w_s over a level's targets keeps each level's total weight w_s in every mode
    (modes a and b have one target per level, so nothing changes there); neither the paper nor the
    official code (mode a only) gives weights for modes c and d.
    Returns (total loss, {"s->t": that pair's loss summed over both directions, detached}).
    """
    targets_of = Counter(s for s, _ in pairs)
    total, terms = 0.0, {}
    for branch in (0, 1):
        other = 1 - branch
        for s, t in pairs:
            weight = level_weights[s] / targets_of[s]
            loss = weight * info_nce(predictions[branch][s], keys[other][t],
                                     tile_ids[branch][s] + offset, temperature)
            total = total + loss
            terms[f"{s}->{t}"] = terms.get(f"{s}->{t}", 0.0) + loss.detach()
    return total, terms


def target_keys(target_embeddings, tile_ids, batch):
    """keys[branch][t] = per-image keys of every rank, (N*world) x D, for the levels the target
    embedded."""
    return [[None if z is None else common.all_gather_nograd(per_image_keys(z, ids, batch))
             for z, ids in zip(branch_embeddings, branch_ids)]
            for branch_embeddings, branch_ids in zip(target_embeddings, tile_ids)]


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
    # NOTE: official pipelines (configs/selfsup/MCL/MCL.py) = BYOL's recipes, bilinear, crop 0.2-1:
    # branch "q" (views 0-3: blur 1.0, solarize 0) and branch "k" (views 4-7: blur 0.1,
    # solarize 0.2), one per level.
    recipes = [dataclasses.replace(recipe, crop_scale=(cfg.crop_min_scale, 1.0),
                                   interpolation="bilinear")
               for recipe in common.BYOL_VIEWS]
    counts = montage_counts(batch_per_rank, cfg.level_copies)  # network inputs per level and branch
    geometry = (cfg.image_size, P5_STRIDE[cfg.stem])
    pairs = matching_pairs(cfg.mode, len(cfg.level_weights))
    target_levels = sorted({t for _, t in pairs})              # mode a: level 0 only

    model = MCL(cfg).to(dist.device, memory_format=memory_format)
    target = common.make_target({"backbone": model.backbone, "fpn": model.fpn, "head": model.head})
    if cfg.sync_bn and dist.device.type == "cuda" and dist.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        target = nn.SyncBatchNorm.convert_sync_batchnorm(target)
    ema_pairs = common.ema_pairs(target, model)
    # NOTE: the official code's LARS form (lr inside the momentum buffer), not byol.py's optax form
    # (--lars-form optax). NOTE: the official config excludes parameters from LARS and weight decay
    # by name (configs/selfsup/MCL/MCL.py: `(bn|gn)(\d+)?.(weight|bias)` and `bias`), which misses
    # the BN weights named `downsample.1.weight` and `mlp.1.weight` (neck and predictors); we
    # exclude every 1-D parameter.
    optimizer = common.LARS(
        common.lars_param_groups(model, cfg.weight_decay),
        lr=peak_lr, form=cfg.lars_form)

    step = 0
    if common.should_resume(cfg):  # --resume, or a torchrun --max-restarts restart with a last.pt
        state = common.load_checkpoint(f"{cfg.out}/last.pt", method="mcl")
        common.check_resume_compatible(state, cfg, keys=("arch", "stem", "image_size", "batch_size",
                                                         "epochs", "fpn_dim", "hidden_dim", "mode"))
        model.load_state_dict(state["model"])
        target.load_state_dict(state["target"])
        optimizer.load_state_dict(state["optimizer"])
        common.set_rng_state(state["rng"])
        step = state["step"]
        print0(f"resumed from {cfg.out}/last.pt at step {step}")

    ddp_model = DistributedDataParallel(model) if dist.world_size > 1 else model
    online_forward = ddp_model
    target_forward = (lambda stacks: [embed(target, stack, counts, geometry, target_levels)
                                      for stack in stacks])
    common.compile_colour_ops(cfg.compile)  # --compile also fuses the colour-jitter ops
    if cfg.compile:
        online_forward = torch.compile(online_forward)
        target_forward = torch.compile(target_forward)

    common.print_run_header("mcl", cfg, dist, dict(
        peak_lr=peak_lr, batch_per_rank=batch_per_rank, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, inputs_per_level=counts, pairs=pairs))
    log = common.MetricsLog(f"{cfg.out}/metrics.jsonl", dist.is_main)
    stop = common.StopSignal()

    def save(epoch, reason):
        if dist.is_main:
            state = dict(method="mcl", config=common.config_dict(cfg), step=step, epoch=epoch,
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
            # NOTE: the official schedule (mmcv) starts warmup at 1e-4 * peak and runs its cosine
            # over all steps (so it is already 0.976 * peak when warmup ends); ours starts at 0 and
            # runs the cosine after warmup.
            lr = lr_at(step, total_steps, warmup_steps, peak_lr, cfg.final_lr)
            tau = cosine_tau(step, total_steps, cfg.tau_base)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]

            generator = common.step_generator(dist.device, cfg.seed, dist.rank, step)
            stacks, tile_ids = make_inputs(images, recipes, cfg, counts, generator, memory_format)
            with torch.autocast(dist.device.type, dtype=autocast_dtype or torch.bfloat16,
                                enabled=autocast_dtype is not None):
                predictions = online_forward(stacks, counts, geometry)
                with torch.no_grad():
                    targets = target_forward(stacks)
            keys = target_keys(targets, tile_ids, batch_per_rank)
            loss, terms = mcl_loss(predictions, keys, tile_ids, pairs, cfg.level_weights,
                                   cfg.temperature, offset=dist.rank * batch_per_rank)

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:  # on the device, no host sync
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=True)
            optimizer.step()
            ema_update(ema_pairs, tau)  # target <- tau * target + (1 - tau) * online
            step += 1
            timer.add(images.shape[0] * dist.world_size)

            at_epoch_end = step % steps_per_epoch == 0
            stopping = step == cfg.stop_after or (step % cfg.log_every == 0 and stop.agreed())
            checkpoint_now = (stopping or at_epoch_end
                              or (cfg.ckpt_every_steps and step % cfg.ckpt_every_steps == 0))
            if step % cfg.log_every == 0 or checkpoint_now:  # the only host syncs of the loop
                # "loss_1->0": level 1 -> 0
                pair_losses = {f"loss_{pair}": value for pair, value in terms.items()}
                values = common.check_finite(step, dict(loss=loss, **pair_losses),
                                             f"{cfg.out}/last.pt")
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
    """--show: <out>/show.png, make_inputs on four images as train() calls it at step 0: per image
    the crops of the views of every level of both branches and the two level-0 views; then per
    branch the first montage of every level with its tile windows (the loss's tile_windows, cut
    from a map of pixel coordinates)."""
    images, generator = common.show_batch(cfg, dist)
    recipes = [dataclasses.replace(recipe, crop_scale=(cfg.crop_min_scale, 1.0),
                                   interpolation="bilinear")
               for recipe in common.BYOL_VIEWS]
    counts, crops = montage_counts(len(images), cfg.level_copies), []
    stacks, tile_ids = make_inputs(images, recipes, cfg, counts, generator,
                                   torch.contiguous_format, crops)
    levels, colours, whole = len(counts), common.COLOURS, torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    rows = [[] for _ in images]  # image i, its views and its tiles are framed in colours[i]
    for branch, name in enumerate("qk"):
        boxes, flips = zip(*crops[branch * levels:(branch + 1) * levels])  # per level: B x 4, B
        views = common.enlarge(common.to_uint8(stacks[branch][:len(images)]))  # level 0
        for i, (picture, row) in enumerate(zip(common.enlarge(images, brightness=0.7), rows)):
            labels = [f"{name}{s}" + ("*" if flips[s][i] else "") for s in range(levels)]
            picture = common.draw_boxes(picture, whole, colours=colours[i:], width=4)
            crop_boxes = torch.stack([box[i] for box in boxes])
            row.insert(branch, common.draw_boxes(picture, crop_boxes, labels, ("white",), width=1))
            row.append(common.draw_boxes(views[i], whole, [f"{name}0"], colours[i:], width=4))
    size = cfg.image_size
    pixels = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="xy"))
    for branch in range(2):  # one row per branch: the first montage of every level s > 0
        rows.append([])
        for s in range(1, levels):
            windows = tile_windows(pixels[None].float(), 2 ** s)  # 4^s x 2 x t x t: (x, y)
            tiles = torch.cat([windows.amin((2, 3)), windows.amax((2, 3)) + 1], dim=1) / size
            montage = common.enlarge(common.to_uint8(stacks[branch][sum(counts[:s]):][:1]))[0]
            ids = tile_ids[branch][s][:4 ** s].tolist()
            labels = [str(i) for i in ids] if common.PANEL >> s >= 24 else None  # where they fit
            rows[-1].append(common.draw_boxes(montage, tiles, labels, [colours[i] for i in ids], 1))
    return common.save_picture(
        rows, f"{cfg.out}/show.png",
        "rows 1-4, per image (frame colour = image): the crops of branch q's views of levels "
        "0..S-1 (q0.., * = mirrored), the same for branch k, then the level-0 views q0, k0. "
        "Last two rows, branch q then k: the first montage of levels 1..S-1, every tile window "
        "outlined in the colour (and, where it fits, the number) of its source image")


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
