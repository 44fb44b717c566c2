"""DenseSiam (phase-1 draft: heads, losses, geometry, metrics; the training loop follows byol.py once it exists)."""
import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------------------------------
def simsiam_projector(in_dim, dim):
    """SimSiam projector: 3 x [Linear (no bias) -> BN], ReLU between, last BN without affine (SimSiam Sec. 4)."""
    return nn.Sequential(
        nn.Linear(in_dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
        nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
        nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim, affine=False))


def simsiam_predictor(dim, hidden_dim):
    """SimSiam predictor: bottleneck Linear (no bias) -> BN -> ReLU -> Linear (with bias)."""
    return nn.Sequential(nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, dim))


def dense_projector(in_dim, hidden_dim, out_dim, num_hidden=2):
    """Projector g of Sec. 3.1 as 1x1 convs: num_hidden x [Conv (no bias) -> BN -> ReLU], Conv -> BN(affine=False).

    The paper: "three 1x1 convolutional layers followed by BN and ReLU ... the last BN layer does not use learnable
    affine transformation". The final conv keeps its bias, as in the released seg code (harmless before BN)."""
    layers, width = [], in_dim
    for _ in range(num_hidden):
        layers += [nn.Conv2d(width, hidden_dim, 1, bias=False), nn.BatchNorm2d(hidden_dim), nn.ReLU(inplace=True)]
        width = hidden_dim
    layers += [nn.Conv2d(width, out_dim, 1), nn.BatchNorm2d(out_dim, affine=False)]
    return nn.Sequential(*layers)


def dense_predictor(dim, hidden_dim):
    """Predictor h as 1x1 convs: Conv (no bias) -> BN -> ReLU -> Conv (with bias)."""
    return nn.Sequential(nn.Conv2d(dim, hidden_dim, 1, bias=False), nn.BatchNorm2d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Conv2d(hidden_dim, dim, 1))


def region_projector(in_dim, dim):
    """g' of Sec. 3.3 ("a three-layer MLP head"), applied to every region embedding: like simsiam_projector."""
    return simsiam_projector(in_dim, dim)


def region_predictor(dim, hidden_dim):
    """h' of Sec. 3.3: same shape as the SimSiam predictor."""
    return simsiam_predictor(dim, hidden_dim)


class FPNDecoder(nn.Module):
    """PiCIE-style simplified FPN used by the seg mode (paper Sec. 4, released code's FPNDecoder).

    1x1 lateral convs (with bias) bring res5..res2 to `dim` channels; top-down: bilinear upsample (align_corners=False)
    and add. No 3x3 smoothing, no norm, no activation. Output: the res2-resolution map (stride 4)."""

    def __init__(self, in_channels, dim=128):
        super().__init__()
        self.laterals = nn.ModuleDict({name: nn.Conv2d(in_channels[name], dim, 1)
                                       for name in ("res2", "res3", "res4", "res5")})

    def forward(self, feats):
        out = self.laterals["res5"](feats["res5"])                      # B x D x H/32 x W/32
        for name in ("res4", "res3", "res2"):
            lateral = self.laterals[name](feats[name])
            out = F.interpolate(out, size=lateral.shape[-2:], mode="bilinear", align_corners=False) + lateral
        return out                                                       # B x D x H/4 x W/4


# ----------------------------------------------------------------------------------------------------------------------
# PixSim geometry: K x K grid inside the intersection of two crops (notes §5.3, cross-check D6)
# ----------------------------------------------------------------------------------------------------------------------
def box_intersection(boxes1, boxes2):
    """Intersection of two batches of edge-based normalised boxes (x0, y0, x1, y1) -> (B x 4, B bool: non-empty)."""
    inter = torch.cat([torch.maximum(boxes1[:, :2], boxes2[:, :2]), torch.minimum(boxes1[:, 2:], boxes2[:, 2:])], 1)
    valid = (inter[:, 2] > inter[:, 0]) & (inter[:, 3] > inter[:, 1])
    return inter, valid


def view_grid(points, box, flip):
    """Map points of the original image (B x K x K x 2, normalised (x, y)) into one view's grid_sample coordinates.

    Edge-based boxes: column j of an unflipped view of size S samples x = x0 + (j + 0.5)/S * (x1 - x0), so a point x
    sits at s = (x - x0)/(x1 - x0) in [0, 1] of the view's width, and grid_sample(align_corners=False) takes 2s - 1
    (-1/+1 are the outer edges of the border pixels). A flipped view is the unflipped one mirrored: s -> 1 - s."""
    x0, y0, x1, y1 = (box[:, i].view(-1, 1, 1) for i in range(4))
    s = (points[..., 0] - x0) / (x1 - x0)
    t = (points[..., 1] - y0) / (y1 - y0)
    s = torch.where(flip.view(-1, 1, 1), 1.0 - s, s)
    return torch.stack([2.0 * s - 1.0, 2.0 * t - 1.0], dim=-1)          # B x K x K x 2, last dim (x, y)


def intersection_grids(boxes1, flips1, boxes2, flips2, grid_size):
    """K x K cell-centre points of each image's crop intersection, as grid_sample grids for view 1 and view 2.

    Returns grid1, grid2 (B x K x K x 2) and valid (B bool). Where the crops do not overlap the grids are
    meaningless and `valid` is False: the caller masks those images out of PixSim and RegionSim."""
    inter, valid = box_intersection(boxes1, boxes2)
    steps = (torch.arange(grid_size, device=boxes1.device, dtype=boxes1.dtype) + 0.5) / grid_size   # K
    xs = inter[:, 0:1] + steps * (inter[:, 2:3] - inter[:, 0:1])        # B x K
    ys = inter[:, 1:2] + steps * (inter[:, 3:4] - inter[:, 1:2])        # B x K
    points = torch.stack([xs[:, None, :].expand(-1, grid_size, -1),      # row i, column j -> (x_j, y_i)
                          ys[:, :, None].expand(-1, -1, grid_size)], dim=-1)    # B x K x K x 2
    return view_grid(points, boxes1, flips1), view_grid(points, boxes2, flips2), valid


def grid_sample_points(maps, grid):
    """Bilinear samples of B x C x H x W maps at B x K x K x 2 grid points -> B x C x K x K."""
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# ----------------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------------
def negative_cosine(p, z):
    """Eq. 2 per position: -cos(p, stopgrad(z)) along dim 1. B x C [x ...] -> B [x ...]."""
    return -F.cosine_similarity(p, z.detach(), dim=1)


def ce_similarity(p, z):
    """Eq. 3 per position: cross-entropy between class distributions along dim 1, target stop-gradded.

    NOTE: the paper writes -softmax(p) . log softmax(z); the released code (and cross-check D1) uses the target z as
    the distribution and p inside the log, -softmax(z) . log softmax(p), i.e. a proper cross-entropy of p against z.
    We follow the code."""
    return -(F.softmax(z.detach(), dim=1) * F.log_softmax(p, dim=1)).sum(dim=1)


DISTANCES = {"cosine": negative_cosine, "ce": ce_similarity}


def simsiam_loss(p1, z1, p2, z2):
    """SimSiam / Eq. 1 on global embeddings: 1/2 D(p1, sg z2) + 1/2 D(p2, sg z1), D = negative cosine."""
    return 0.5 * negative_cosine(p1, z2).mean() + 0.5 * negative_cosine(p2, z1).mean()


def masked_mean(per_image, valid):
    """Mean of per-image values over the images where valid is True (0 with grad if none)."""
    weights = valid.to(per_image.dtype)
    return (per_image * weights).sum() / weights.sum().clamp(min=1.0)


def pixsim_loss(p1, z1, p2, z2, valid, distance="cosine"):
    """Eq. 1 on K x K grid samples (B x C x K x K each): symmetric, stop-gradient, averaged over points then images.

    valid (B bool) masks out images whose two crops do not overlap."""
    dist = DISTANCES[distance]
    per_point = 0.5 * dist(p1, z2) + 0.5 * dist(p2, z1)                 # B x K x K
    return masked_mean(per_point.flatten(1).mean(1), valid)


def region_embeddings(region_logits, feats):
    """Eq. 4: e[n] = sum over positions of softmax_n(logits)[pos] * feats[pos]. B x N x ... , B x C x ... -> B x N x C.

    NOTE: the masks are the softmax over the N channels of the projector output z (released code; Eq. 4 writes z).
    It is a sum, not a mean (Eq. 4 and the code), and gradients flow through the masks as in the code."""
    masks = F.softmax(region_logits.flatten(2), dim=1)                  # B x N x P
    return torch.einsum("bnp,bcp->bnc", masks, feats.flatten(2))         # B x N x C


def region_contrast(u, v, temperature):
    """Eq. 6 per image: InfoNCE of region n of u against all regions of v of the SAME image, positive = region n.

    u, v: B x N x D. Returns B values (mean over regions).
    NOTE: Eq. 6 has raw dot products and a sum over regions; the released code l2-normalises u and v
    (kernel_norm=True), divides by T = 0.1 and averages over regions. We follow the code. v is NOT stop-gradded
    (neither the paper's Eq. 5 nor the code detaches it)."""
    u, v = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
    logits = torch.einsum("bnd,bmd->bnm", u, v) / temperature           # B x N x N
    return -torch.diagonal(F.log_softmax(logits, dim=-1), dim1=1, dim2=2).mean(1)


def regionsim_loss(u1, v1, u2, v2, temperature, valid=None):
    """Eq. 5: 1/2 Lc(u1, v2) + 1/2 Lc(u2, v1), averaged over (valid) images."""
    per_image = 0.5 * region_contrast(u1, v2, temperature) + 0.5 * region_contrast(u2, v1, temperature)
    if valid is None:
        return per_image.mean()
    return masked_mean(per_image, valid)


def self_label_loss(logits, target_logits, rebalance):
    """L_seg of Sec. 4: cross-entropy of logits against the pseudo-labels argmax(stopgrad(target_logits)) (dim 1).

    With rebalance the per-pixel losses are multiplied by the batch frequency of their pseudo-class.
    NOTE: this is what the released code does (`rebalance_seg=True`, F.cross_entropy(weight=freq, reduction='none')):
    the weights are raw frequencies, not renormalised, so frequent classes weigh MORE and the term is ~1/N of the
    unweighted one. The paper calls it "class-balanced"; we keep the code's behaviour because its numbers are the
    published ones (cross-check D2)."""
    labels = target_logits.detach().argmax(dim=1)                        # B x H x W
    weight = None
    if rebalance:
        counts = torch.bincount(labels.flatten(), minlength=logits.shape[1]).to(logits.dtype)
        weight = counts / counts.sum()
    return F.cross_entropy(logits, labels, weight=weight, reduction="none").mean()


def auto_loss_weights(num_classes, num_aux_classes):
    """Sec. 4: lambda_1 = log N_aux / (log N + log N_aux) for the main head, lambda_4 = log N / (...) for aux."""
    denominator = math.log(num_classes) + math.log(num_aux_classes)
    return math.log(num_aux_classes) / denominator, math.log(num_classes) / denominator


def region_weight_at(step, total_steps, start_fraction, weight):
    """RegionSim weight at a step: 0 before start_fraction of training, `weight` from then on (Table 4f)."""
    return weight if step >= int(start_fraction * total_steps) else 0.0


# ----------------------------------------------------------------------------------------------------------------------
# Seg mode: shared geometric transform (crop + flip) as in the released code, cross-check D5
# ----------------------------------------------------------------------------------------------------------------------
def replay_crop(side_fraction, top_fraction, left_fraction, size):
    """Square crop of a size x size map from fractions, the way the released code does it -> (side, top, left).

    side = int(s * size); top = round((size - side) * a); left = round((size - side) * b) (Python round)."""
    side = int(side_fraction * size)
    return side, round((size - side) * top_fraction), round((size - side) * left_fraction)


def crop_resize(maps, boxes, flips, out_size):
    """Crop each map to its edge-based normalised box (x0, y0, x1, y1), resize bilinearly to out_size, flip.

    Output pixel (i, j) samples x = x0 + (j + 0.5)/S * (x1 - x0) (same convention as common.augment), so the SAME
    box applied to an image and to its feature map gives pixel-aligned results."""
    batch = maps.shape[0]
    steps = (torch.arange(out_size, device=maps.device, dtype=maps.dtype) + 0.5) / out_size
    xs = boxes[:, 0:1] + steps * (boxes[:, 2:3] - boxes[:, 0:1])        # B x S
    ys = boxes[:, 1:2] + steps * (boxes[:, 3:4] - boxes[:, 1:2])        # B x S
    xs = torch.where(flips.view(-1, 1), xs.flip(1), xs)
    grid = torch.stack([xs[:, None, :].expand(batch, out_size, out_size),
                        ys[:, :, None].expand(batch, out_size, out_size)], dim=-1) * 2.0 - 1.0
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ----------------------------------------------------------------------------------------------------------------------
# Seg mode data: built-in synthetic segmentation set (images + per-pixel labels, generated on the fly)
# ----------------------------------------------------------------------------------------------------------------------
def _class_appearance(num_classes, device=None):
    """Fixed per-class colour (evenly spaced hues) and stripe texture (angle, frequency), shared by every split."""
    classes = torch.arange(num_classes, dtype=torch.float32, device=device)
    hue = classes / num_classes
    phases = torch.tensor([0.0, 1 / 3, 2 / 3], device=device)
    colour = 0.5 + 0.35 * torch.cos(2 * math.pi * (hue[:, None] + phases))        # C x 3 in [0.15, 0.85]
    angle = math.pi * ((classes * 0.37) % 1.0)
    frequency = 3.0 + 2.0 * (classes % 3)                                          # cycles per image width
    return colour, angle, frequency


def make_synthetic_segmentation(num_images, image_size=64, seed=0, num_things=3, num_stuff=3):
    """Built-in segmentation set: blobby "stuff" regions covering the image plus one or two "thing" shapes on top.

    Every class has a fixed appearance (its own hue and stripe orientation/frequency, see _class_appearance), so
    classes are recognisable from local colour and texture, which is what unsupervised segmentation can discover;
    per-image nuisances (brightness, colour shift, stripe phase, noise, layout) vary. Classes 0..num_things-1 are
    things, the rest stuff (COCO-Stuff-27 also lists its 12 things first). Deterministic from `seed`.
    Returns (images N x 3 x S x S uint8, labels N x S x S int64 in [0, num_things + num_stuff)).
    """
    generator = torch.Generator().manual_seed(seed)
    g = dict(generator=generator)
    n, s, num_classes = num_images, image_size, num_things + num_stuff
    coords = (torch.arange(s, dtype=torch.float32) + 0.5) / s * 2 - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")                       # S x S
    # stuff: each stuff class gets a smooth random field; the pixel takes the class with the largest field
    fields = F.interpolate(torch.rand(n, num_stuff, 3, 3, **g), size=(s, s), mode="bicubic", align_corners=False)
    labels = num_things + fields.argmax(dim=1)                                   # N x S x S
    # things: one or two shapes (disc, square, diamond) of random thing classes
    for index in range(2):
        present = (torch.rand(n, 1, 1, **g) < (1.0 if index == 0 else 0.5))
        thing = torch.randint(0, num_things, (n, 1, 1), **g)
        kind = torch.randint(0, 3, (n, 1, 1), **g)
        radius = 0.2 + 0.2 * torch.rand(n, 1, 1, **g)
        cx, cy = (torch.rand(n, 1, 1, **g) * 2 - 1) * 0.7, (torch.rand(n, 1, 1, **g) * 2 - 1) * 0.7
        dx, dy = (xx - cx).abs(), (yy - cy).abs()
        inside = torch.where(kind == 0, dx ** 2 + dy ** 2 < radius ** 2,
                             torch.where(kind == 1, torch.maximum(dx, dy) < radius * 0.85, dx + dy < radius * 1.2))
        labels = torch.where(present & inside, thing, labels)
    # appearance: class colour (shifted per image) + class stripes (random phase per image) + noise
    colour, angle, frequency = _class_appearance(num_classes)
    shift = 0.08 * (torch.rand(n, num_classes, 3, **g) * 2 - 1)                   # N x C x 3
    phase = 2 * math.pi * torch.rand(n, num_classes, **g)                         # N x C
    rows = torch.arange(n)[:, None, None]
    pixel_colour = (colour[labels] + shift[rows, labels]).permute(0, 3, 1, 2)     # N x 3 x S x S
    direction = xx * torch.cos(angle[labels]) + yy * torch.sin(angle[labels])     # N x S x S
    stripes = torch.sin(math.pi * frequency[labels] * direction + phase[rows, labels])
    brightness = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, **g)
    images = (pixel_colour + 0.12 * stripes.unsqueeze(1)) * brightness + 0.03 * torch.randn(n, 3, s, s, **g)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels


# ----------------------------------------------------------------------------------------------------------------------
# Seg mode evaluation: confusion matrix, Hungarian matching, mIoU
# ----------------------------------------------------------------------------------------------------------------------
def _hungarian_python(cost):
    """Minimum-cost perfect assignment of a square cost matrix (list of lists), O(n^3) shortest augmenting paths
    with row/column potentials (Kuhn-Munkres). Returns col[i] for every row i. Fine for n up to a few hundred."""
    n = len(cost)
    inf = float("inf")
    row_pot, col_pot = [0.0] * (n + 1), [0.0] * (n + 1)
    row_of_col, prev_col = [0] * (n + 1), [0] * (n + 1)                # 1-based; column 0 is a virtual start
    for row in range(1, n + 1):
        row_of_col[0] = row
        col = 0
        min_slack, used = [inf] * (n + 1), [False] * (n + 1)
        while True:                                                      # grow a shortest-path tree until a free column
            used[col] = True
            current_row, delta, next_col = row_of_col[col], inf, 0
            for j in range(1, n + 1):
                if used[j]:
                    continue
                slack = cost[current_row - 1][j - 1] - row_pot[current_row] - col_pot[j]
                if slack < min_slack[j]:
                    min_slack[j], prev_col[j] = slack, col
                if min_slack[j] < delta:
                    delta, next_col = min_slack[j], j
            for j in range(n + 1):
                if used[j]:
                    row_pot[row_of_col[j]] += delta
                    col_pot[j] -= delta
                else:
                    min_slack[j] -= delta
            col = next_col
            if row_of_col[col] == 0:
                break
        while col:                                                       # flip the augmenting path
            previous = prev_col[col]
            row_of_col[col] = row_of_col[previous]
            col = previous
    assignment = [0] * n
    for j in range(1, n + 1):
        assignment[row_of_col[j] - 1] = j - 1
    return assignment


def linear_assignment(cost):
    """Row -> column minimum-cost assignment of a square matrix. scipy when installed (optional extra), else a pure
    Python Kuhn-Munkres (exact, fast enough for the 27 or 128 classes used here)."""
    cost = torch.as_tensor(cost, dtype=torch.float64).cpu()
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        return torch.tensor(_hungarian_python(cost.tolist()))
    rows, cols = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(cols)[torch.as_tensor(rows).argsort()]


def confusion_matrix(pred, target, num_classes, ignore_index=255):
    """num_classes x num_classes counts, rows = ground-truth class, columns = predicted cluster."""
    keep = target != ignore_index
    index = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def segmentation_scores(confusion, thing_classes=()):
    """Hungarian-match clusters to classes (maximising matched pixels), then mIoU and pixel accuracy.

    Returns dict(miou, pixel_acc, and miou_things / miou_stuff when thing_classes is given) plus the matching
    cluster_to_class (cluster k is read as class cluster_to_class[k])."""
    confusion = confusion.double()
    cluster_to_class = linear_assignment(confusion.max() - confusion.t())    # rows: clusters, cols: classes
    matched = torch.zeros_like(confusion)
    matched[:, cluster_to_class] = confusion                             # column k of confusion -> class column
    true_pos = matched.diag()
    union = matched.sum(0) + matched.sum(1) - true_pos
    iou = true_pos / union.clamp(min=1)
    present = union > 0
    scores = {"miou": iou[present].mean().item(), "pixel_acc": (true_pos.sum() / matched.sum().clamp(min=1)).item(),
              "cluster_to_class": cluster_to_class}
    if len(thing_classes):
        is_thing = torch.zeros(len(iou), dtype=torch.bool)
        is_thing[list(thing_classes)] = True
        scores["miou_things"] = iou[present & is_thing].mean().item()
        scores["miou_stuff"] = iou[present & ~is_thing].mean().item()
    return scores
