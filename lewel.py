"""LEWEL (phase 1: heads and losses only; the full file follows byol.py's skeleton)."""
import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------------------------------------------
# Model: coupled projection head, alignment maps, aligned pooling


def coupled_projection(projector: nn.Module, features: torch.Tensor):
    """Sec. 3.2: one projector g applied to [GAP(F), F_1, ..., F_HW] in ONE call.

    The global slot and every pixel go through the same BatchNorm, so its statistics are taken over
    batch x (1 + HW) positions (official `ObjectNeck`); projecting GAP(F) alone would give a different
    global embedding (cross-check C3).
    Returns the global embedding z (B x d) and the per-pixel heat-maps W~ (B x d x HW).
    """
    batch, channels, height, width = features.shape
    pixels = features.flatten(2)                                     # B x C x HW
    pooled = pixels.mean(dim=2, keepdim=True)                        # B x C x 1
    sequence = torch.cat([pooled, pixels], dim=2)                    # B x C x (1+HW)
    rows = sequence.transpose(1, 2).reshape(-1, channels)            # B(1+HW) x C, BN sees all rows at once
    projected = projector(rows).view(batch, 1 + height * width, -1)  # B x (1+HW) x d
    return projected[:, 0], projected[:, 1:].transpose(1, 2)         # B x d, B x d x HW


def alignment_maps(heatmaps: torch.Tensor, scale: float) -> torch.Tensor:
    """Sec. 3.2: l2-normalise each pixel's d-vector over channels, divide by `scale`, softmax over space.

    heatmaps B x d x HW -> maps B x d x HW, each of the d maps sums to 1 over the HW positions.
    """
    return F.softmax(F.normalize(heatmaps, dim=1) / scale, dim=2)


def aligned_pooling(pixels: torch.Tensor, maps: torch.Tensor, groups: int) -> torch.Tensor:
    """Eq. 1-2 with channel grouping: pool each channel group of F with its own map.

    pixels B x C x HW, maps B x d x HW -> aligned representations B x (d/G) x C.
    Aligned representation k is the concatenation over groups g of (map g*(d/G)+k) (x) (channels of group g).
    NOTE: the paper's Eq. 2 pairs group g of embedding k with map (k-1)*h+g (maps interleaved); the official
    code (`ObjectNeck.forward`) uses contiguous blocks of d/G maps per group, as here. The two differ only by a
    fixed permutation of the projector's output channels, so they are the same model; we follow the code so that
    cross-check C1 matches.
    """
    batch, channels, positions = pixels.shape
    num_maps = maps.shape[1]
    assert channels % groups == 0 and num_maps % groups == 0, (channels, num_maps, groups)
    grouped_pixels = pixels.view(batch, groups, channels // groups, positions)   # B x G x C/G x HW
    grouped_maps = maps.view(batch, groups, num_maps // groups, positions)       # B x G x d/G x HW
    pooled = torch.einsum("bgcn,bgkn->bkgc", grouped_pixels, grouped_maps)      # B x d/G x G x C/G
    return pooled.reshape(batch, num_maps // groups, channels)                  # B x d/G x C


def project_per_embedding(head: nn.Module, embeddings: torch.Tensor) -> torch.Tensor:
    """Apply an MLP to every aligned embedding; BatchNorm statistics over batch x (d/G) (official Conv1d+BN1d).

    embeddings B x K x C_in -> B x K x C_out.
    """
    batch, count, channels = embeddings.shape
    return head(embeddings.reshape(batch * count, channels)).view(batch, count, -1)


# ---------------------------------------------------------------------------------------------------------------------
# Loss


def regression_loss_per_row(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 5: mean over rows of 2 - 2 cos(prediction, sg(target)); rows along dim 0, features along dim 1."""
    return (2 - 2 * F.cosine_similarity(prediction, target.detach(), dim=1)).mean()


def lewel_b_loss(pred_global, target_global, pred_aligned, target_aligned, beta: float) -> torch.Tensor:
    """Eq. 3 for one direction of LEWEL_B: (1 - beta) L_g + beta L_a.

    pred_global, target_global: B x d; pred_aligned, target_aligned: B x K x c (embedding k <-> embedding k).
    NOTE: the official flag `--lewel-loss-weight` multiplies the *global* loss (w = 1 - beta); with the
    default 0.5 both conventions agree.
    """
    loss_global = regression_loss_per_row(pred_global, target_global)
    loss_aligned = regression_loss_per_row(pred_aligned.flatten(0, 1), target_aligned.flatten(0, 1))
    return (1 - beta) * loss_global + beta * loss_aligned


def info_nce(query: torch.Tensor, key: torch.Tensor, negatives: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 4 with a queue (MoCo): query, key B x c; negatives N x c (already l2-normalised, no grad)."""
    query = F.normalize(query, dim=1)
    key = F.normalize(key.detach(), dim=1)
    positive = (query * key).sum(dim=1, keepdim=True)                 # B x 1
    negative = query @ negatives.detach().t()                         # B x N
    logits = torch.cat([positive, negative], dim=1) / tau             # B x (1+N), the positive is column 0
    return F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long, device=query.device))


def aligned_info_nce(query: torch.Tensor, keys_all: torch.Tensor, first_index: int, tau: float) -> torch.Tensor:
    """Eq. 4 for the aligned embeddings of LEWEL_M with in-batch negatives (Sec. 3.3).

    query B x K x c (this rank's online embeddings); keys_all N x K x c (key-encoder embeddings of the whole
    global batch, all ranks concatenated); the positive of local sample i is global row first_index + i.
    Embedding k is contrasted only against embedding k of the other images.
    NOTE: the paper says negatives are "embeddings of different images in the current mini-batch" and does
    not say whether other indices k' != k count as negatives; we use the same index k (Eq. 5's pairing).
    """
    batch, count, _ = query.shape
    query = F.normalize(query, dim=2)
    keys_all = F.normalize(keys_all.detach(), dim=2)
    logits = torch.einsum("bkc,nkc->kbn", query, keys_all) / tau     # K x B x N
    labels = torch.arange(batch, device=query.device) + first_index  # B
    return F.cross_entropy(logits.reshape(count * batch, -1), labels.repeat(count))


class KeyQueue(nn.Module):
    """MoCo FIFO queue of l2-normalised keys (size x dim), written as a ring: the oldest rows are replaced first."""

    def __init__(self, size: int, dim: int, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)  # same initial negatives on every rank
        self.register_buffer("keys", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """keys n x dim (the global batch, identical on every rank); n may not exceed the queue size."""
        size = self.keys.shape[0]
        assert len(keys) <= size, (len(keys), size)
        rows = (self.pointer + torch.arange(len(keys), device=keys.device)) % size
        self.keys[rows] = F.normalize(keys, dim=1)
        self.pointer.copy_((self.pointer + len(keys)) % size)
