"""Side by side: this repo's BYOL against a peer BYOL built from lightly's modules, same data, same
budget.

Both train a ResNet-18 at 32 px with global batch 128 for the same epochs on the same image folder,
and both are scored by the same kNN monitor (common.knn_monitor: res5 features, k=200, T=0.1,
bank = train/, queries = val/), at random init and every --knn-every epochs. One table comes out:
mean and spread over the seeds.

    ours:  python byol.py --data FOLDER ... (its CPU defaults; extra flags after `--` go to byol.py)
    peer:  lightly.models.modules.BYOLProjectionHead / BYOLPredictionHead,
           lightly.loss.NegativeCosineSimilarity, lightly.models.utils.update_momentum,
           lightly.transforms.BYOLTransform at 32 px (min crop scale 0.25), torchvision resnet18,
           plain SGD at lr 0.06, target momentum cosine 0.996 -> 1 per epoch; the recipe of
           lightly's own BYOL example (examples/pytorch/byol.py in lightly-ai/lightly).

lightly is a benchmark-only extra: `pip install -r requirements-peer.txt`. Nothing else in the repo
imports it.

Commands:
    python compare_lightly.py --make-digits data/digits   # 1,797 real digit scans (scikit-learn)
    python compare_lightly.py --data data/digits --epochs 10 --knn-every 5   # seeds 0,1,2
    python compare_lightly.py --data synthetic --epochs 6 --knn-every 3
    python compare_lightly.py --data data/digits --epochs 10 --knn-every 5 -- --preset lars
                                                   # flags after -- go to byol.py (ours only)
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

import byol
import common


def make_digits(root, val_count=400, seed=0):
    """scikit-learn's handwritten digits (1,797 scans, 8x8, 17 grey levels, 10 classes) as an
    ImageNet-layout folder of 32-px RGB PNGs: val_count images in val/, the rest in train/, split by
    a seeded permutation."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits  # optional: pip install scikit-learn

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    for split, indices in (("val", order[:val_count]), ("train", order[val_count:])):
        for i in indices:
            folder = Path(root) / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
            picture = Image.fromarray(pixels).resize((32, 32), Image.BICUBIC).convert("RGB")
            picture.save(folder / f"{i}.png")
    print(f"{root}: {len(order) - val_count} train and {val_count} val images, 10 classes")


# --------------------------------------------------------------------------------------------------
# Ours: byol.py as a user runs it
# --------------------------------------------------------------------------------------------------

def run_ours(data, epochs, knn_every, seed, extra, synthetic_size=2560):
    with tempfile.TemporaryDirectory() as out:
        byol.main(["--data", data, "--epochs", str(epochs), "--knn-every", str(knn_every),
                   "--seed", str(seed), "--synthetic-size", str(synthetic_size), "--workers", "0",
                   "--out", out, "--device", "cpu"]
                  + extra)
        rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    return {row["epoch"]: row["knn_top1"] for row in rows if "knn_top1" in row}


# --------------------------------------------------------------------------------------------------
# Peer: lightly's BYOL modules in the loop of lightly's example
# --------------------------------------------------------------------------------------------------

class PeerBackbone(nn.Module):
    """torchvision resnet18 up to res5, answering like common.ResNetTrunk so common.knn_monitor can
    score it."""

    def __init__(self):
        super().__init__()
        import torchvision

        net = torchvision.models.resnet18()
        self.trunk = nn.Sequential(*list(net.children())[:-2])  # up to layer4, no pooling or fc

    def forward(self, x, last_stage="res5"):
        return {"res5": self.trunk(x)}


class PeerBYOL(nn.Module):
    def __init__(self):
        super().__init__()
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead

        self.backbone = PeerBackbone()
        self.projection_head = BYOLProjectionHead(512, 4096, 256)
        self.prediction_head = BYOLPredictionHead(256, 4096, 256)

    def project(self, x):
        return self.projection_head(common.global_pool(self.backbone(x)["res5"]))

    def forward(self, x):
        return self.prediction_head(self.project(x))


def run_peer(data, epochs, knn_every, seed, batch_size=128, lr=0.06, min_scale=0.25,
             synthetic_size=2560):
    import copy

    import torchvision
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms.byol_transform import (BYOLTransform, BYOLView1Transform,
                                                   BYOLView2Transform)
    from lightly.utils.scheduler import cosine_schedule

    torch.manual_seed(seed)
    dist = common.setup_distributed("cpu")
    transform = BYOLTransform(
        view_1_transform=BYOLView1Transform(input_size=32, min_scale=min_scale),
        view_2_transform=BYOLView2Transform(input_size=32, min_scale=min_scale))
    if data == "synthetic":  # byol.py's training split of the built-in data, as PIL images
        _, images, _ = common.load_dataset("synthetic", 32, "train", synthetic_size)
        dataset = _TransformedList([torchvision.transforms.functional.to_pil_image(image)
                                    for image in images], transform)
    else:
        dataset = torchvision.datasets.ImageFolder(f"{data}/train", transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         drop_last=True,
                                         generator=torch.Generator().manual_seed(seed))
    load_size = 32 if data == "synthetic" else 32 * 256 // 224
    bank, val = (common.make_loader(data, split, 32, 256, dist, seed, 0, shuffle=False,
                                    drop_last=False, synthetic_size=synthetic_size,
                                    load_size=load_size)
                 for split in ("train", "val"))

    model = PeerBYOL()
    target = copy.deepcopy(model)
    deactivate_requires_grad(target)
    criterion = NegativeCosineSimilarity()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    curve = {0: common.knn_monitor(model.backbone, bank, val, 32)}
    for epoch in range(epochs):
        momentum = cosine_schedule(epoch, epochs, 0.996, 1)
        for (view_1, view_2), _ in loader:
            update_momentum(model.backbone, target.backbone, m=momentum)
            update_momentum(model.projection_head, target.projection_head, m=momentum)
            p1, p2 = model(view_1), model(view_2)
            with torch.no_grad():
                z1, z2 = target.project(view_1), target.project(view_2)
            loss = 0.5 * (criterion(p1, z2) + criterion(p2, z1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if (epoch + 1) % knn_every == 0 or epoch + 1 == epochs:
            curve[epoch + 1] = common.knn_monitor(model.backbone, bank, val, 32)
            print(f"peer seed {seed} epoch {epoch + 1}: kNN top-1 {curve[epoch + 1]:.2f}%",
                  flush=True)
    return curve


class _TransformedList(torch.utils.data.Dataset):
    def __init__(self, pictures, transform):
        self.pictures, self.transform = pictures, transform

    def __len__(self):
        return len(self.pictures)

    def __getitem__(self, index):
        return self.transform(self.pictures[index]), 0


# --------------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------------

def spread(values):
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} +- {std:.1f}"


def table(curves, seconds):
    """curves: {"ours": [ {epoch: knn} per seed ], "peer": [...]}. Markdown, one row per epoch."""
    epochs = sorted(set().union(*(curve.keys() for runs in curves.values() for curve in runs)))
    lines = ["| epoch | " + " | ".join(f"{name} kNN top-1 (%)" for name in curves) + " |",
             "|---:|" + "---:|" * len(curves)]
    for epoch in epochs:
        cells = [spread([curve[epoch] for curve in runs if epoch in curve])
                 for runs in curves.values()]
        lines.append(f"| {epoch}{' (random init)' if epoch == 0 else ''} | "
                     + " | ".join(cells) + " |")
    gains = [spread([curve[max(curve)] - curve[0] for curve in runs]) for runs in curves.values()]
    lines.append("| gain over init | " + " | ".join(gains) + " |")
    lines.append("| wall time per run (s) | "
                 + " | ".join(f"{seconds[name]:.0f}" for name in curves) + " |")
    return "\n".join(lines)


def main(argv=None):
    command = sys.argv[1:] if argv is None else argv  # the whole line, for the table's header
    own = command[:command.index("--")] if "--" in command else command
    extra = command[command.index("--") + 1:] if "--" in command else []  # byol.py's flags
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synthetic",
                        help="image folder with train/ and val/ class folders, "
                             "or 'synthetic' (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=30,
                        help="epochs for both (default: %(default)s)")
    parser.add_argument("--knn-every", type=int, default=10,
                        help="epochs between kNN scores (default: %(default)s)")
    parser.add_argument("--synthetic-size", type=int, default=2560,
                        help="training images of the built-in data, both sides "
                             "(default: %(default)s)")
    parser.add_argument("--seeds", default="0,1,2",
                        help="comma-separated seeds (default: %(default)s)")
    parser.add_argument("--only", choices=("ours", "peer"), help="run one side only")
    parser.add_argument("--report", help="also write the table to this Markdown file")
    parser.add_argument("--make-digits", metavar="DIR",
                        help="write the digits image folder to DIR and exit")
    args = parser.parse_args(own)
    if args.make_digits:
        return make_digits(args.make_digits)
    size = args.synthetic_size
    runners = {"ours": lambda seed: run_ours(args.data, args.epochs, args.knn_every, seed, extra,
                                             size),
               "peer": lambda seed: run_peer(args.data, args.epochs, args.knn_every, seed,
                                             synthetic_size=size)}
    curves, seconds = {}, {}
    for name, runner in runners.items():
        if args.only and name != args.only:
            continue
        start = time.time()
        curves[name] = [runner(int(seed)) for seed in args.seeds.split(",")]
        seconds[name] = (time.time() - start) / len(curves[name])
    text = (f"`python compare_lightly.py {' '.join(command)}`: "
            f"data {args.data}, {args.epochs} epochs, seeds {args.seeds}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads\n\n"
            + table(curves, seconds))
    print(text)
    if args.report:
        Path(args.report).write_text(text + "\n")
    return curves


if __name__ == "__main__":
    main()
