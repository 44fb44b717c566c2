"""LEWEL: Learning Where to Learn in Cross-View Self-Supervised Learning (Huang et al., CVPR 2022,
arXiv:2203.14898).

The projection head g of BYOL/MoCo is reread as a per-pixel classifier: applied to every pixel of
the backbone map F (as well as to its global average), its d outputs per pixel are d heat-maps.
Normalised over space they become alignment maps that pool F into "aligned" representations, one per
group of maps (Eq. 1-2). A separate projector p embeds them, and the aligned embeddings of two views
are matched index by index (embedding k <-> embedding k) next to the usual global loss. Because g
makes both the global embedding and the maps (the "coupled head"), learning where to pool and
learning the global embedding help each other (Table 5).

    F = f(v),  [z, W~] = g([GAP(F), F_1 .. F_HW])      one g call, BN over B x (1 + HW)   (Sec. 3.2)
    W_k = softmax_space( W~_k / ||W~_.||_2 / scale )   k = 1..d; each map sums to 1 over space
    y_k = [W_(g,k) (x) F^(g)]_(g=1..h),  z_k = p(y_k)  h channel groups, d/h embeddings    (Eq. 1-2)
    L   = (1 - beta) L_g + beta L_a,   L_a = h/d sum_k l(z'_k, z''_k)                        (Eq. 3)
    LEWEL_B (default): l = 2 - 2 cos(q(z'), sg z''), EMA target                              (Eq. 5)
        (predictor q on the global embedding, s on the aligned ones)
    LEWEL_M (--variant moco): l = InfoNCE, tau 0.2                                           (Eq. 4)
        (negatives: a queue for L_g, the other images of the batch for L_a)
    both directions (v1 -> v2 and v2 -> v1) are summed.

The method's defaults follow the paper and the released LEWEL_B code (LayneH/LEWEL: models/lewel.py,
main.py, scripts/srun_lewelb_eman.sh): h = 4 groups, scale 1, beta 0.5; the presets' EMAN target
(eval mode, EMA of parameters and BN buffers). LEWEL_M is not released; it is built from the paper
(Sec. 3.3) on MoCo v2. The CPU defaults shrink the heads (hidden 1024) and use 40-px views so that
res5 has 2x2 positions to align.
NOTE: two CPU-default departures, both for 60-step runs; every preset keeps the paper's recipe.
  - The target is a plain EMA network in train mode (--no-eman; the 400-epoch recipe's target), not
    EMAN. EMAN's target normalises with running statistics that are an EMA of the online's, which
    start at mean 0, variance 1; 60 steps are too few to forget them. Such a target maps different
    images to nearly one direction, so the predictors only have to output that direction, and the
    loss falls without the features learning (README, "Six default runs side by side").
  - As in byol.py --preset lars, the predictors q and s train at 10x the lr.
NOTE: h = 4 is the paper's value for LEWEL_B only (Sec. 4.4, Table 7: "when h = 4, LEWEL_B performs
consistently well regardless the value of d. Thus we simply use d [h] = 4 for LEWEL_B"; the released
scripts set LEWEL_NUM_HEADS=4, main.py's --lewel-num-heads defaults to 8). The paper gives no h for
LEWEL_M (Table 7 uses LEWEL_B "to exclude the influence of the negative sample size in LEWEL_M"); we
use 4 for both: 32 aligned embeddings at LEWEL_M's d = 128, 64 at LEWEL_B's d = 256.

Commands:
    python lewel.py                                   # LEWEL_B, built-in data, CPU-sized defaults
    python lewel.py --preset moco                     # LEWEL_M: --variant moco + MoCo v2's SGD,
                                                      # lr, wd, heads and queue
    torchrun --standalone --nproc_per_node=2 lewel.py # same run, 2 processes (CPU: gloo, GPU: nccl)
    # on 8 GPUs: LEWEL_B (EMAN, 200 ep), LEWEL_B (SyncBN, 400 ep), LEWEL_M (200 ep)
    torchrun --nproc_per_node=8 lewel.py --data /path/to/imagenet --preset imagenet
    torchrun --nproc_per_node=8 lewel.py --data /path/to/imagenet --preset imagenet-400ep
    torchrun --nproc_per_node=8 lewel.py --data /path/to/imagenet --preset imagenet-moco
    python eval_linear.py --ckpt runs/lewel/last.pt   # kNN + linear probe of the frozen backbone
"""

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import common
from common import augment, cosine_tau, ema_update, lr_at, mlp, print0, regression_loss


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Config:
    """LEWEL pretraining. Defaults: a 2-core CPU on the built-in data. --preset imagenet: paper."""
    # data
    data: str = "synthetic"          # "synthetic", "cifar10", ImageNet layout, or any image folder
    val_data: str = ""               # labelled set for the kNN monitor ("" = --data if labelled)
    synthetic_size: int = 2560       # images in the built-in training set (val: as many again)
    image_size: int = 40             # px of each augmented view; paper: 224.
                                     # NOTE: not 32: res5 is 1x1 up to 32 px (no maps), 2x2 at 40
    load_size: int = 0               # px of the square decoded before cropping; 0 = image_size
                                     # (folders: 256/224 of it)
    workers: int = 8                 # DataLoader workers per process (folder data only)
    gpu_decode: bool = False         # folder data: workers read JPEG bytes, the GPU decodes them
    crop_min_scale: float = 0.25     # smallest random-resized-crop area; LEWEL code, MoCo v2: 0.2
                                     # (BYOL: 0.08)
    # model
    arch: str = "resnet18"           # resnet18 | resnet50 (paper)
    stem: str = "imagenet"           # imagenet (7x7/2 + max-pool) | cifar (3x3/1, no pool)
    hidden_dim: int = 1024           # width of g, p, q, s; paper: 4096 (B), 2048 (M).
                                     # NOTE: CPU-sized, p and s see 64 rows/image
    proj_dim: int = 256              # d = g's outputs = alignment maps = c; paper: 256 (B), 128 (M)
    sync_bn: bool = False            # SyncBatchNorm across processes (CUDA only); official: off
                                     # (EMAN runs), on (400 ep)
    # method
    variant: str = "byol"            # byol = LEWEL_B (Eq. 5, EMA target) |
                                     # moco = LEWEL_M (Eq. 4, queue, key encoder)
    groups: int = 4                  # h groups -> d/h embeddings; paper: 4 (B, Table 7); M: NOTE
    scale: float = 1.0               # alignment-softmax temperature; released scripts: 1.0
    beta: float = 0.5                # weight of the aligned loss L_a in Eq. 3; paper: 0.5 (Fig. 3a)
    eman: bool = False               # EMAN target (eval mode, EMA of params + BN buffers);
                                     # paper: on (100/200 ep), off (400 ep). See NOTE
    temperature: float = 0.2         # LEWEL_M InfoNCE tau; paper: 0.2
    queue_size: int = 4096           # LEWEL_M negatives for L_g (FIFO of global keys); MoCo: 65536
    # optimisation
    epochs: int = 3                  # paper: 100/200/400; 3: a CPU run under 5 minutes
    batch_size: int = 128            # GLOBAL batch over all processes; paper: 512 (B), 256 (M)
    base_lr: float = 1.0             # peak lr = base_lr * batch_size / 256;
                                     # paper: 0.9 (B: 1.8 at 512), 0.06 (M: at 256)
    weight_decay: float = 1.5e-6     # LARS (B) or SGD (M) weight decay; paper: 1e-6 (B), 1e-4 (M)
                                     # (LARS: not on biases/BN; SGD: every parameter)
    lars_form: str = "openselfsup"   # LARS update rule: openselfsup = official code | optax (BYOL);
                                     # openselfsup keeps the lr inside the momentum buffer
    warmup_epochs: float = 1.0       # linear lr warmup; released scripts (B): 10; MoCo v2 (M): none
    tau_base: float = 0.99           # B: target momentum, cosine to 1 (paper 0.98);
                                     # M: fixed key momentum (paper 0.999)
    predictor_lr_mult: float = 10.0  # B: lr of the predictors q and s = this x the lr; paper: 1
                                     # (presets). See NOTE
    # run
    seed: int = 0
    out: str = "runs/lewel"          # checkpoints, metrics.jsonl
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


# LEWEL_M recipe (Sec. 3.3): MoCo v2 with SGD (momentum 0.9) lr 0.06 at batch 256, wd 1e-4, 2048/128
# heads, fixed key momentum 0.999, no warmup. NOTE: with both InfoNCE directions summed
# (lewel_m_loss) a step at lr 0.06 is ~4x MoCo v2's one-direction step at 0.03 (weight decay 2x);
# --base-lr 0.03 halves both.
# The defaults are CPU-sized LEWEL_B; --preset moco is LEWEL_M on the CPU. --variant picks the
# losses only; the recipe (optimiser settings, heads, momentum) comes from the fields, so LEWEL_M
# runs use a moco preset, which sets variant=moco together with MoCo v2's numbers.
MOCO = dict(variant="moco", hidden_dim=2048, proj_dim=128, base_lr=0.06, weight_decay=1e-4,
            warmup_epochs=0.0, tau_base=0.999)

# LEWEL_B's ImageNet recipe (Sec. 3.3; official scripts): ResNet-50 at 224 px, batch 1024, LARS,
# wd 1.5e-6, 10 warmup epochs, EMAN target at tau 0.98. The presets below add epochs and lr.
LEWEL_B = dict(arch="resnet50", stem="imagenet", image_size=224, crop_min_scale=0.2,
               hidden_dim=4096, batch_size=1024, weight_decay=1.5e-6, warmup_epochs=10.0,
               tau_base=0.98, eman=True, knn_every=10, workers=10, predictor_lr_mult=1.0)

PRESETS = {
    # NOTE: Sec. 3.3 says "SGD ... batch size 512, initial learning rate 1.8" for LEWEL_B, but the
    # released scripts train with LARS at 3.6 (batch 1024) / 7.2 (batch 4096). 1.8 at 512 is the
    # same lr per image as 3.6 at 1024, i.e. a LARS rate (LARS rescales every layer's step to
    # 1e-3 x ||w||, so its lr is not an SGD lr; SimSiam's SGD uses 0.05 per 256 images). We follow
    # the released scripts (LARS, base_lr 0.9 = 3.6 x 256 / 1024) and default to their EMAN recipe;
    # `--batch-size 512 --weight-decay 1e-6` gives the paper's numbers (lr 1.8) with LARS.
    # NOTE: the official code evaluates the cosine once per epoch (constant within an epoch);
    # common.lr_at steps it every iteration.
    "imagenet": dict(LEWEL_B, epochs=200, base_lr=0.9),
    # Tables 1 and 3, 100-epoch rows: the same EMAN recipe.
    "imagenet-100ep": dict(LEWEL_B, epochs=100, base_lr=0.9),
    # Sec. 3.3, ablations (Table 7): ImageNet-100 (a train/ and val/ folder of its 100 classes),
    # "double the initial learning rate ... 240 epochs ... keep the rest unchanged" (LARS lr 7.2 at
    # batch 1024).
    "imagenet100": dict(LEWEL_B, epochs=240, base_lr=1.8),
    # scripts/srun_lewelb.sh: SyncBN, plain EMA target in train mode, batch 4096, lr 7.2, wd 1e-6,
    # tau 0.996, 400 ep.
    "imagenet-400ep": dict(arch="resnet50", stem="imagenet", image_size=224, crop_min_scale=0.2,
                           hidden_dim=4096, batch_size=4096, epochs=400, base_lr=0.45,
                           weight_decay=1e-6, warmup_epochs=10.0, tau_base=0.996, eman=False,
                           sync_bn=True, knn_every=10, workers=10, predictor_lr_mult=1.0),
    # Sec. 3.3 (LEWEL_M is not released): batch 256, 200 epochs, MoCo's 65536-key queue.
    "imagenet-moco": dict(MOCO, arch="resnet50", stem="imagenet", image_size=224,
                          crop_min_scale=0.2, batch_size=256, epochs=200, queue_size=65536,
                          knn_every=10, workers=10),
    # Tables 1 and 3, LEWEL_M 100-epoch rows.
    "imagenet-moco-100ep": dict(MOCO, arch="resnet50", stem="imagenet", image_size=224,
                                crop_min_scale=0.2, batch_size=256, epochs=100,
                                queue_size=65536, knn_every=10, workers=10),
    # Sec. 3.3 and 4.4 (Tables 5-6, Fig. 3: LEWEL_M is the ablation default): ImageNet-100, lr
    # doubled to 0.12 at batch 256, 240 epochs, the rest unchanged.
    "imagenet100-moco": dict(MOCO, arch="resnet50", stem="imagenet", image_size=224,
                             crop_min_scale=0.2, batch_size=256, epochs=240, base_lr=0.12,
                             queue_size=65536, knn_every=10, workers=10),
    # CPU-sized LEWEL_M on the built-in data. NOTE: key momentum 0.99 instead of 0.999: the CPU run
    # has 60 steps and 0.999^60 = 0.94, so a 0.999 key encoder would still be 94 % its random
    # initialisation at the end.
    "moco": dict(MOCO, tau_base=0.99),
    # CIFAR-10 with the usual small-image changes (3x3 stem, 32 px); not a paper recipe.
    # At 32 px res5 is 4x4.
    "cifar10": dict(data="cifar10", arch="resnet18", stem="cifar", image_size=32,
                    batch_size=512, epochs=200, base_lr=1.0, weight_decay=1e-6,
                    warmup_epochs=10.0, tau_base=0.99, eman=True, knn_every=10,
                    predictor_lr_mult=1.0),
}

# NOTE: LEWEL's augmentations are BYOL's asymmetric pair with bilinear resizing and crop scale 0.2-1
# (official data/transforms.py; --crop-min-scale); LEWEL_M uses MoCo v2's symmetric views
# (Sec. 3.3: no solarisation).
LEWEL_VIEWS = tuple(dataclasses.replace(recipe, interpolation="bilinear")
                    for recipe in common.BYOL_VIEWS)
MOCO_VIEWS = (common.MOCO_V2_VIEW, common.MOCO_V2_VIEW)


def check_config(cfg, world_size):
    """What main() checks before any data or model is built: the common checks and LEWEL's."""
    common.check_common_config(cfg, world_size)
    common.check(cfg.variant in ("byol", "moco"),
                 f"--variant must be byol or moco, got {cfg.variant!r}")
    channels = 2048 if cfg.arch == "resnet50" else 512
    common.check(cfg.groups > 0 and cfg.proj_dim % cfg.groups == 0 and channels % cfg.groups == 0,
                 f"--groups {cfg.groups} must divide --proj-dim {cfg.proj_dim} "
                 f"and the {channels} backbone channels")
    common.check(cfg.scale > 0, f"--scale must be positive, got {cfg.scale}")
    common.check(0 <= cfg.beta <= 1, f"--beta must lie in [0, 1], got {cfg.beta}")
    common.check(0 <= cfg.tau_base <= 1, f"--tau-base must lie in [0, 1], got {cfg.tau_base}")
    if cfg.variant == "moco":
        common.check(cfg.queue_size >= 2 * cfg.batch_size,
                     f"--queue-size {cfg.queue_size} must hold at least one step of keys "
                     f"(2 x --batch-size {cfg.batch_size})")
        common.check(not cfg.sync_bn,
                     "--sync-bn contradicts LEWEL_M's shuffle-BN key encoder; use --no-sync-bn")
        common.check(cfg.temperature > 0,
                     f"--temperature must be positive, got {cfg.temperature}")


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------

def coupled_projection(projector, features):
    """Sec. 3.2: one projector g applied to [GAP(F), F_1, ..., F_HW] in ONE call.

    The global slot and every pixel go through the same BatchNorm, so its statistics are taken over
    batch x (1 + HW) positions (official `ObjectNeck`); projecting GAP(F) alone gives a different
    global embedding (tests/test_lewel.py, test_c3_...). Returns the global embedding z (B x d) and
    the heat-maps W~ (B x d x HW).
    """
    batch, channels, height, width = features.shape
    pixels = features.flatten(2)                                     # B x C x HW
    pooled = pixels.mean(dim=2, keepdim=True)                        # B x C x 1
    sequence = torch.cat([pooled, pixels], dim=2)                    # B x C x (1+HW)
    rows = sequence.transpose(1, 2).reshape(-1, channels)            # B(1+HW) x C: one BN batch
    projected = projector(rows).view(batch, 1 + height * width, -1)  # B x (1+HW) x d
    return projected[:, 0], projected[:, 1:].transpose(1, 2)         # B x d, B x d x HW


def alignment_maps(heatmaps, scale):
    """Sec. 3.2: l2-normalise each pixel's d-vector over channels, divide by `scale`, softmax over
    space.

    heatmaps B x d x HW -> maps B x d x HW; each of the d maps sums to 1 over the HW positions.
    The logits lie in [-1/scale, 1/scale], so at scale 1 no position can hold more than
    e / (e + (HW - 1) / e) of a map: 0.71 at 2x2, 0.13 at 7x7 (224 px). Maps are soft by
    construction; at initialisation (entries of a normalised d-vector ~ 1/sqrt(d)) they are close to
    uniform, i.e. close to global average pooling.
    """
    return F.softmax(F.normalize(heatmaps.float(), dim=1) / scale, dim=2)


def aligned_pooling(pixels, maps, groups):
    """Eq. 1-2 with channel grouping: pool each channel group of F with its own alignment map.

    pixels B x C x HW, maps B x d x HW -> aligned representations B x (d/h) x C.
    Aligned representation k concatenates, over groups g, (map g * d/h + k) (x) (channels of
    group g).
    NOTE: Eq. 2 pairs group g of embedding k with map (k-1)h + g (maps interleaved); the official
    code (`ObjectNeck.forward`) gives each group a contiguous block of d/h maps, as here. The two
    differ by a fixed permutation of g's output channels, i.e. they are the same model; we follow
    the code, so the official function's numbers hold (tests/test_lewel.py, test_c1_...).
    """
    batch, channels, positions = pixels.shape
    num_maps = maps.shape[1]
    grouped_pixels = pixels.view(batch, groups, channels // groups, positions)    # B x h x C/h x HW
    # B x h x d/h x HW
    grouped_maps = maps.to(pixels.dtype).view(batch, groups, num_maps // groups, positions)
    pooled = torch.einsum("bgcn,bgkn->bkgc", grouped_pixels, grouped_maps)       # B x d/h x h x C/h
    return pooled.reshape(batch, num_maps // groups, channels)                   # B x d/h x C


def per_embedding(head, embeddings):
    """An MLP on every aligned embedding; BN statistics over batch x d/h (official Conv1d + BN1d).

    embeddings B x K x C_in -> B x K x C_out.
    """
    batch, count, channels = embeddings.shape
    return head(embeddings.reshape(batch * count, channels)).view(batch, count, -1)


class LEWEL(nn.Module):
    """Online network: backbone f, coupled projector g, semantic projector p; LEWEL_B adds
    predictors q and s.

    The target (LEWEL_B) / key encoder (LEWEL_M) copies backbone + both projectors and computes its
    own maps.
    NOTE: common.mlp is Linear(+bias) -> BN -> ReLU -> Linear(+bias) with PyTorch's default init;
    the official MLP1D uses bias-free 1x1 Conv1d with kaiming fan_out init (LayneH/LEWEL
    models/lewel.py, utils/init.py; the first bias is cancelled by BN).
    NOTE: Sec. 3.3 puts BN in the hidden layer of the LEWEL_M projectors too, unlike MoCo v2's
    BN-free head.
    """

    def __init__(self, cfg):
        super().__init__()
        self.backbone = common.ResNetTrunk(cfg.arch, cfg.stem)
        channels = self.backbone.channels["res5"]
        self.projector = mlp(channels, cfg.hidden_dim, cfg.proj_dim)          # g: z and W~
        self.aligned_projector = mlp(channels, cfg.hidden_dim, cfg.proj_dim)  # p, c = d (Sec. 3.3)
        self.predictor = self.aligned_predictor = None
        if cfg.variant == "byol":
            self.predictor = mlp(cfg.proj_dim, cfg.hidden_dim, cfg.proj_dim)          # q
            self.aligned_predictor = mlp(cfg.proj_dim, cfg.hidden_dim, cfg.proj_dim)  # s
        self.groups, self.scale = cfg.groups, cfg.scale

    def forward(self, views):
        """views: list of B x 3 x S x S. Per view: (global B x d, aligned B x d/h x d), the
        predictions q(z), s(z_k) for LEWEL_B or the embeddings z, z_k for LEWEL_M (BN statistics per
        view)."""
        outputs = [embed(self, view, self.groups, self.scale) for view in views]
        if self.predictor is None:
            return outputs
        return [(self.predictor(z), per_embedding(self.aligned_predictor, aligned))
                for z, aligned in outputs]


def embed(net, view, groups, scale):
    """Global embedding z (B x d) and aligned embeddings z_k (B x d/h x d) of a network with
    .backbone, .projector and .aligned_projector (the online model or its target / key encoder)."""
    features = net.backbone(view)["res5"]                                  # B x C x H x W
    z_global, heatmaps = coupled_projection(net.projector, features)      # B x d, B x d x HW
    maps = alignment_maps(heatmaps, scale)                                 # B x d x HW
    aligned = aligned_pooling(features.flatten(2), maps, groups)           # B x d/h x C
    return z_global, per_embedding(net.aligned_projector, aligned)         # B x d, B x d/h x d


@torch.no_grad()
def shuffled_key_forward(encode, views, dist, seed):
    """LEWEL_M key encoder with MoCo's shuffle-BN. encode: list of views -> list of (z, z_k) (the
    key encoder).

    Returns per view (z N x d, z_k N x d/h x d) for the GLOBAL batch of N images, in the original
    order. Under DDP each view's global batch is gathered and permuted (every rank draws the same
    permutation from `seed`), each rank encodes one slice, and the outputs are gathered and
    un-permuted: a key's BN batch then holds other images than its query's, which blocks the
    intra-batch shortcut through BN statistics (MoCo, Sec. 3.3 "Shuffling BN").
    NOTE: on one process there is nothing to shuffle across (BN sees the whole batch either way), so
    the keys come from the plain forward; nothing replaces shuffle-BN there.
    """
    if dist.world_size == 1:
        return encode(views)
    gathered = [common.all_gather_nograd(view) for view in views]  # per view N x 3 x S x S
    size = views[0].shape[0]
    permutation = torch.randperm(gathered[0].shape[0],
                                 generator=torch.Generator().manual_seed(seed))
    if views[0].device.type == "cuda":  # from pinned memory: the copy does not wait for the GPU
        permutation = permutation.pin_memory()
    permutation = permutation.to(views[0].device, non_blocking=True)
    outputs = encode([images[permutation[dist.rank * size:(dist.rank + 1) * size]]
                      for images in gathered])
    unshuffle = torch.argsort(permutation)  # global row m holds image permutation[m]
    return [(common.all_gather_nograd(z)[unshuffle], common.all_gather_nograd(z_k)[unshuffle])
            for z, z_k in outputs]


class KeyQueue(nn.Module):
    """MoCo's FIFO queue of l2-normalised keys (size x dim), written as a ring: the oldest rows are
    replaced first."""

    def __init__(self, size, dim, seed=0):
        super().__init__()
        # the same initial (random) negatives on every rank
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer(
            "keys", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys):
        """keys n x dim: the global batch's keys, identical on every rank (n <= size)."""
        size = self.keys.shape[0]
        rows = (self.pointer + torch.arange(len(keys), device=keys.device)) % size
        self.keys[rows] = F.normalize(keys.float(), dim=1)
        self.pointer.copy_((self.pointer + len(keys)) % size)


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------

def lewel_b_direction(pred_global, target_global, pred_aligned, target_aligned, beta):
    """Eq. 3 + Eq. 5, one direction: (1 - beta) l(q(z'), sg z'') + beta mean_k l(s(z'_k), sg z''_k).

    pred/target global: B x d; pred/target aligned: B x K x c, embedding k of one view against
    embedding k of the other.
    NOTE: the official flag --lewel-loss-weight multiplies the *global* loss (it is 1 - beta); equal
    at 0.5.
    """
    loss_global = regression_loss(pred_global, target_global)
    loss_aligned = regression_loss(pred_aligned.flatten(0, 1), target_aligned.flatten(0, 1))
    return (1 - beta) * loss_global + beta * loss_aligned


def lewel_b_loss(predictions, targets, beta):
    """Symmetric LEWEL_B loss: v1 predicts v2's target and vice versa (summed, as the official
    code). Range [0, 8]."""
    (p1, s1), (p2, s2) = predictions
    (z1, a1), (z2, a2) = targets
    return lewel_b_direction(p1, z2, s1, a2, beta) + lewel_b_direction(p2, z1, s2, a1, beta)


def info_nce(query, key, negatives, tau):
    """Eq. 4 with a queue: query, key B x c (key = positive); negatives N x c, l2-normalised, no
    gradient."""
    query = F.normalize(query.float(), dim=1)
    key = F.normalize(key.detach().float(), dim=1)
    positive = (query * key).sum(dim=1, keepdim=True)                    # B x 1
    negative = query @ negatives.detach().float().t()                    # B x N
    logits = torch.cat([positive, negative], dim=1) / tau                # B x (1+N), positive first
    return F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long, device=query.device))


def aligned_info_nce(query, keys_all, first_index, tau):
    """Eq. 4 for the aligned embeddings with in-batch negatives (Sec. 3.3).

    query B x K x c: this rank's online embeddings; keys_all N x K x c: key embeddings of the whole
    global batch; the positive of local sample i is global row first_index + i, every other image is
    a negative.
    NOTE: the paper's negatives are "embeddings of different images in the current mini-batch"; it
    does not say whether indices k' != k count. We contrast embedding k only with embedding k of
    other images (Eq. 5's pairing).
    """
    batch, count, _ = query.shape
    query = F.normalize(query.float(), dim=2)
    keys_all = F.normalize(keys_all.detach().float(), dim=2)
    logits = torch.einsum("bkc,nkc->kbn", query, keys_all) / tau        # K x B x N
    labels = torch.arange(batch, device=query.device) + first_index     # B
    return F.cross_entropy(logits.reshape(count * batch, -1), labels.repeat(count))


def lewel_m_loss(embeddings, keys, negatives, first_index, beta, tau):
    """Symmetric LEWEL_M loss (Eq. 3 with Eq. 4): view 1 queries view 2's keys and vice versa,
    summed.

    embeddings: per view (z B x d, z_k B x K x d) online, this rank; keys: per view
    (N x d, N x K x d), global batch; negatives: the queue *before* this step's keys are added, so
    no key is ever its own negative.
    NOTE: the paper does not say whether L_g and L_a are symmetrised. MoCo v2, whose settings
    LEWEL_M follows, trains one direction (facebookresearch/moco moco/builder.py: q from view 1
    against k from view 2; enqueues k) at lr 0.03 per 256 images (main_moco.py). We sum both
    directions and enqueue both views' keys, as the only released LEWEL loss sums its two directions
    (LayneH/LEWEL models/lewel.py, LEWELB_EMAN.forward: loss_func(v1, target v2) + loss_func(v2,
    target v1)), and keep the paper's lr 0.06 (Sec. 3.3). Effective lr relative to MoCo v2: each
    direction steps at 2x its lr, so the summed pair moves ~4x as far per step as MoCo v2's
    one-direction loss at 0.03, while the weight-decay step (lr x wd) is 2x: weight decay is
    relatively half of MoCo v2's. `--base-lr 0.03` gives MoCo v2's per-direction step and weight
    decay (the pair still 2x).
    """
    loss = 0.0
    for (query, query_aligned), (key_all, key_aligned_all) in zip(embeddings, reversed(keys)):
        key = key_all[first_index:first_index + query.shape[0]]  # B x d, this rank's positives
        loss = loss + (1 - beta) * info_nce(query, key, negatives, tau) \
            + beta * aligned_info_nce(query_aligned, key_aligned_all, first_index, tau)
    return loss


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
    moco = cfg.variant == "moco"
    recipes = [dataclasses.replace(recipe, crop_scale=(cfg.crop_min_scale, 1.0))
               for recipe in (MOCO_VIEWS if moco else LEWEL_VIEWS)]

    model = LEWEL(cfg).to(dist.device, memory_format=memory_format)
    target = common.make_target({"backbone": model.backbone, "projector": model.projector,
                                 "aligned_projector": model.aligned_projector})
    if cfg.sync_bn and dist.device.type == "cuda" and dist.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        target = nn.SyncBatchNorm.convert_sync_batchnorm(target)
    eman = cfg.eman and not moco
    target.train(not eman)  # EMAN: the target normalises with its (EMA) running statistics
    ema_pairs = common.ema_pairs(target, model, buffers=eman)
    queue = KeyQueue(cfg.queue_size, cfg.proj_dim, cfg.seed).to(dist.device) if moco else None
    if moco:  # NOTE: MoCo v2: plain SGD, weight decay on every parameter
        optimizer = torch.optim.SGD([dict(params=list(model.parameters()), lr_mult=1.0)],
                                    lr=peak_lr, momentum=0.9, weight_decay=cfg.weight_decay)
    else:  # LEWEL's code puts lr inside the momentum buffer (--lars-form openselfsup, default);
        # byol.py's optax form keeps it outside, which differs while the lr changes: two steps at
        # lr 1.8 then 3.6 move 23 % further there (tests/test_lewel.py, C5). NOTE: the official
        # 400-ep run (LEWELB, SyncBN) also applies LARS + wd to the heads' BN weights (LayneH/LEWEL
        # main.py `collect_params` excludes `mlp.1` only for EMAN); we never do.
        predictor_lr_mults = {"predictor": cfg.predictor_lr_mult,
                              "aligned_predictor": cfg.predictor_lr_mult}
        optimizer = common.LARS(
            common.lars_param_groups(model, cfg.weight_decay, predictor_lr_mults), lr=peak_lr,
            form=cfg.lars_form)

    step = 0
    if common.should_resume(cfg):  # --resume, or a torchrun --max-restarts restart with a last.pt
        state = common.load_checkpoint(f"{cfg.out}/last.pt", method="lewel")
        common.check_resume_compatible(state, cfg, keys=("arch", "stem", "image_size", "batch_size",
                                                         "epochs", "variant"))
        model.load_state_dict(state["model"])
        target.load_state_dict(state["target"])
        optimizer.load_state_dict(state["optimizer"])
        if moco:
            queue.load_state_dict(state["queue"])
        common.set_rng_state(state["rng"])
        step = state["step"]
        print0(f"resumed from {cfg.out}/last.pt at step {step}")

    ddp_model = DistributedDataParallel(model) if dist.world_size > 1 else model
    online_forward = ddp_model
    target_forward = (lambda views: [embed(target, view, cfg.groups, cfg.scale) for view in views])
    common.compile_colour_ops(cfg.compile)  # --compile also fuses the colour-jitter ops
    if cfg.compile:
        online_forward = torch.compile(online_forward)
        target_forward = torch.compile(target_forward)

    common.print_run_header("lewel", cfg, dist, dict(
        peak_lr=peak_lr, batch_per_rank=batch_per_rank, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, aligned_embeddings=cfg.proj_dim // cfg.groups))
    log = common.MetricsLog(f"{cfg.out}/metrics.jsonl", dist.is_main)
    stop = common.StopSignal()

    def save(epoch, reason):
        if dist.is_main:
            state = dict(method="lewel", config=common.config_dict(cfg), step=step, epoch=epoch,
                         model=model.state_dict(), target=target.state_dict(),
                         optimizer=optimizer.state_dict(),
                         queue=queue.state_dict() if moco else None, rng=common.rng_state(),
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
            # NOTE: LEWEL_M keeps MoCo's fixed key momentum; LEWEL_B anneals tau_base -> 1 (cosine,
            # per step).
            tau = cfg.tau_base if moco else cosine_tau(step, total_steps, cfg.tau_base)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]

            generator = common.step_generator(dist.device, cfg.seed, dist.rank, step)
            views = [augment(images, recipe, cfg.image_size, generator)[0]
                     .contiguous(memory_format=memory_format) for recipe in recipes]
            with torch.autocast(dist.device.type, dtype=autocast_dtype or torch.bfloat16,
                                enabled=autocast_dtype is not None):
                predictions = online_forward(views)
                with torch.no_grad():
                    targets = (shuffled_key_forward(target_forward, views, dist,
                                                    cfg.seed * 1_000_003 + step)
                               if moco else target_forward(views))
            if moco:
                loss = lewel_m_loss(predictions, targets, queue.keys.clone(),
                                    dist.rank * batch_per_rank, cfg.beta, cfg.temperature)
            else:
                loss = lewel_b_loss(predictions, targets, cfg.beta)

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ema_update(ema_pairs, tau)  # target <- tau * target + (1 - tau) * online
            if moco:
                # after the loss: FIFO of 2N keys
                queue.enqueue(torch.cat([key_global for key_global, _ in targets]))
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
    """--show: <out>/show.png, the two views of four images as train() makes them at step 0, and
    on each view the alignment maps (one per channel group) that pool aligned embedding 0, for
    the untrained online network."""
    torch.manual_seed(cfg.seed)
    images, generator = common.show_batch(cfg, dist)
    recipes = [dataclasses.replace(recipe, crop_scale=(cfg.crop_min_scale, 1.0))
               for recipe in (MOCO_VIEWS if cfg.variant == "moco" else LEWEL_VIEWS)]
    views, boxes, flips = zip(*(augment(images, recipe, cfg.image_size, generator)
                                for recipe in recipes))
    model = LEWEL(cfg).to(dist.device)  # train mode (batch statistics), as the loss sees it
    rows = []
    for original, view1, view2 in common.view_rows(images, views, boxes, flips):
        rows += [[original, view1], [None, view2]]  # one row per view: the view, then its maps
    peaks = []
    with torch.no_grad():
        for v, view in enumerate(views):
            features = model.backbone(view)["res5"]                                  # B x C x h x w
            heatmaps = coupled_projection(model.projector, features)[1]              # B x d x hw
            height, width = features.shape[-2:]
            maps = alignment_maps(heatmaps, cfg.scale)                               # B x d x hw
            maps = maps.view(len(view), cfg.groups, -1, height, width)[:, :, 0]  # embedding 0's
            peaks.append(maps.flatten(2).amax(2) / maps.flatten(2).amin(2))
            for i in range(len(view)):
                row = rows[2 * i + v]
                row += [common.spotlight(row[1], group_map) for group_map in maps[i]]
    return common.save_picture(
        rows, f"{cfg.out}/show.png",
        "per image, two rows: the crops of view 1 (yellow) and view 2 (cyan); view 1 ('flip' = "
        f"mirrored) and the {cfg.groups} alignment maps (one per channel group) that pool its "
        "aligned embedding 0; the same for view 2 (embedding 0 of one view is matched to "
        "embedding 0 of the other). Each map stretched from its smallest weight (dark) to its "
        "largest (bright). "
        "UNTRAINED network: the largest weight is only "
        f"{torch.cat(peaks).mean():.2f}x the smallest")


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
