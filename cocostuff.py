"""Build the curated COCO-Stuff-27 folder that `densesiam.py --task seg` reads.

DenseSiam (Sec. 5.1) trains and evaluates unsupervised segmentation on "curated subsets [PiCIE,
IIC] of COCO train2017 and val2017 ... 49,629 images and 2,175 images", with the 80 thing and 91
stuff categories merged into 27 (12 things, 15 stuff). PiCIE (janghyuncho/PiCIE,
data/coco_eval_dataset.py and the README's "Preparing Dataset") takes both pieces from IIC
unchanged: the lists curated/{train2017,val2017}/Coco164kFull_Stuff_Coarse_7.txt and
fine_to_coarse_dict.pickle (byte-identical to IIC's). IIC defines them in xu-ji/IIC,
code/datasets/segmentation/util/:
  * cocostuff_fine_to_coarse.py: a fine label -> its supercategory in the COCO-Stuff hierarchy;
    the 27 supercategories in a fixed order, things first (0-11), then stuff (12-26).
    COARSE_CLASSES below is that table.
  * coco164k_prepare.py (version 7, "Coco164kFull_Stuff_Coarse"): keep an image when its label
    map is at least 360 px high and wide and at least 75 % of ALL its pixels (unlabelled ones
    count in the total) have a stuff label (coarse 12-26).

Input: the COCO images (train2017.zip and val2017.zip unpacked: IMAGES/train2017/NAME.jpg) and
the COCO-Stuff label maps (stuffthingmaps_trainval2017.zip unpacked: LABELS/train2017/NAME.png):
single-channel PNGs holding the fine class 0-181 (COCO-Stuff id - 1: 0-90 things, 91-181 stuff)
and 255 for unlabelled pixels.

Output, the layout common.DENSE_LAYOUTS["cocostuff"] that densesiam.py --task seg reads:
    OUT/images/{train,val}/NAME.jpg   symlinks to the COCO images (--copy: copies)
    OUT/labels/{train,val}/NAME.png   27-class label map, 0-26 and 255 = unlabelled (8-bit grey)

Commands:
    python cocostuff.py --images /data/coco --labels /data/stuffthingmaps --out /data/cocostuff27
    python cocostuff.py ... --curated /path/to/PiCIE/curated   # PiCIE's lists instead of the rule
    torchrun --nproc_per_node=4 densesiam.py --task seg --preset cocostuff27 \\
        --data /data/cocostuff27 --init resnet18_imagenet.pth

The rule reads every label map (a few minutes with --workers 8) and prints how many images it
kept next to the paper's counts; --curated reads PiCIE's list files and only converts labels.
"""

import argparse
import os
import shutil
import sys
from multiprocessing import get_context
from pathlib import Path

import numpy as np

# The 27 coarse classes in IIC's order (index = coarse label) and the fine labels each merges.
# Fine label = the value in the stuffthingmaps PNGs (COCO-Stuff's label list: 0 person, ...).
COARSE_CLASSES = (
    ("electronic-things", range(71, 77)),  # tv, laptop, mouse, remote, keyboard, cell phone
    ("appliance-things", range(77, 83)),   # microwave, oven, toaster, sink, refrigerator, blender
    ("food-things", range(51, 61)),        # banana, apple, sandwich, orange, ..., donut, cake
    ("furniture-things", range(61, 71)),   # chair, couch, potted plant, bed, mirror, ..., door
    ("indoor-things", range(83, 91)),      # book, clock, vase, scissors, ..., hair brush
    ("kitchen-things", range(43, 51)),     # bottle, plate, wine glass, cup, fork, ..., bowl
    ("accessory-things", range(25, 33)),   # hat, backpack, umbrella, shoe, ..., suitcase
    ("animal-things", range(15, 25)),      # bird, cat, dog, horse, sheep, ..., giraffe
    ("outdoor-things", range(9, 15)),      # traffic light, fire hydrant, ..., bench
    ("person-things", range(0, 1)),        # person
    ("sports-things", range(33, 43)),      # frisbee, skis, snowboard, ..., tennis racket
    ("vehicle-things", range(1, 9)),       # bicycle, car, motorcycle, airplane, ..., boat
    ("ceiling-stuff", (101, 102)),         # ceiling-other, ceiling-tile
    ("floor-stuff", (100, 113, 114, 115, 116, 117)),  # carpet, floor-marble, ..., floor-wood
    ("food-stuff", (120, 121, 152, 169)),  # food-other, fruit, salad, vegetable
    # cabinet, counter, cupboard, desk-stuff, door-stuff, furniture-other, light, mirror-stuff,
    # shelf, stairs, table
    ("furniture-stuff", (97, 106, 107, 109, 111, 122, 129, 132, 155, 160, 164)),
    ("rawmaterial-stuff", (99, 131, 138, 142)),  # cardboard, metal, paper, plastic
    # banner, blanket, cloth, clothes, curtain, mat, napkin, pillow, rug, textile-other, towel
    ("textile-stuff", (91, 92, 103, 104, 108, 130, 136, 140, 151, 166, 167)),
    ("wall-stuff", range(170, 177)),       # wall-brick, wall-concrete, ..., wall-wood
    ("window-stuff", (179, 180)),          # window-blind, window-other
    # bridge, building-other, house, roof, skyscraper, tent
    ("building-stuff", (94, 95, 127, 150, 157, 165)),
    # dirt, gravel, ground-other, mud, pavement, platform, playingfield, railroad, road, sand, snow
    ("ground-stuff", (110, 124, 125, 135, 139, 143, 144, 146, 148, 153, 158)),
    # branch, bush, flower, grass, leaves, moss, plant-other, straw, tree
    ("plant-stuff", (93, 96, 118, 123, 128, 133, 141, 162, 168)),
    ("sky-stuff", (105, 156)),             # clouds, sky-other
    ("solid-stuff", (126, 134, 149, 159, 161, 181)),  # hill, mountain, rock, ..., stone, wood
    ("structural-stuff", (98, 112, 137, 145, 163)),   # cage, fence, net, railing, structural-other
    ("water-stuff", (119, 147, 154, 177, 178)),       # fog, river, sea, water-other, waterdrops
)
NUM_THINGS = 12        # coarse 0-11 are things, 12-26 stuff
IGNORE = 255           # unlabelled, in the input and in the output
MIN_SIDE = 360         # IIC coco164k_prepare.py: _size_thresh
MIN_STUFF = 0.75       # IIC coco164k_prepare.py: _class_thresh (a fraction of all pixels)
PAPER_COUNTS = {"train": 49_629, "val": 2_175}  # DenseSiam Sec. 5.1
SPLITS = {"train": "train2017", "val": "val2017"}
LIST_NAME = "Coco164kFull_Stuff_Coarse_7.txt"  # PiCIE's curated/<split>2017/ list files


def fine_to_coarse_table():
    """uint8 lookup table of 256 entries: fine label -> coarse label 0-26, any other -> 255."""
    table = np.full(256, IGNORE, dtype=np.uint8)
    for coarse, (_, fine_labels) in enumerate(COARSE_CLASSES):
        for fine in fine_labels:
            assert table[fine] == IGNORE, f"fine label {fine} listed twice"
            table[fine] = coarse
    return table


FINE_TO_COARSE = fine_to_coarse_table()


def keep_image(coarse):
    """The curation rule on a coarse label map (H x W): both sides >= 360, >= 75 % stuff pixels."""
    height, width = coarse.shape
    if height < MIN_SIDE or width < MIN_SIDE:
        return False
    stuff = np.count_nonzero((coarse >= NUM_THINGS) & (coarse != IGNORE))
    return stuff >= MIN_STUFF * height * width


def read_label(path):
    """A stuffthingmaps PNG as a uint8 H x W array of fine labels."""
    from PIL import Image

    with Image.open(path) as image:
        if image.mode not in ("L", "P"):
            raise ValueError(f"{path}: expected a single-channel label PNG, got mode {image.mode}")
        return np.array(image, dtype=np.uint8)


def _convert_one(job):
    """Map one label file; if kept, write it and link (or copy) its image. Returns name or None."""
    label_path, image_path, out_label, out_image, apply_rule, copy = job
    from PIL import Image

    coarse = FINE_TO_COARSE[read_label(label_path)]
    if apply_rule and not keep_image(coarse):
        return None
    if not os.path.isfile(image_path):
        raise FileNotFoundError(f"{image_path}: the image of {label_path} is missing")
    Image.fromarray(coarse).save(out_label)  # uint8 H x W: an 8-bit grey PNG
    if os.path.lexists(out_image):
        os.remove(out_image)
    if copy:
        shutil.copyfile(image_path, out_image)
    else:
        os.symlink(os.path.abspath(image_path), out_image)
    return Path(label_path).stem


def convert(images, labels, out, curated="", copy=False, workers=8, log=print):
    """Write OUT/images/<split>/ and OUT/labels/<split>/ for train and val; returns {split: names}.

    curated: a folder with PiCIE's <split>2017/Coco164kFull_Stuff_Coarse_7.txt; "" = the rule.
    """
    kept = {}
    for split, coco_split in SPLITS.items():
        label_dir = Path(labels) / coco_split
        if not label_dir.is_dir():
            raise FileNotFoundError(f"--labels {labels}: no folder {label_dir} (stuffthingmaps)")
        if curated:
            with open(Path(curated) / coco_split / LIST_NAME) as handle:
                names = [line.strip() for line in handle if line.strip()]
        else:
            names = sorted(path.stem for path in label_dir.glob("*.png"))
        for kind in ("images", "labels"):
            (Path(out) / kind / split).mkdir(parents=True, exist_ok=True)
        jobs = [(label_dir / f"{name}.png", Path(images) / coco_split / f"{name}.jpg",
                 Path(out) / "labels" / split / f"{name}.png",
                 Path(out) / "images" / split / f"{name}.jpg", not curated, copy) for name in names]
        if workers > 1:  # spawn: fresh processes, safe even when the caller has threads (torch)
            with get_context("spawn").Pool(workers) as pool:
                results = pool.map(_convert_one, jobs, chunksize=64)
        else:
            results = [_convert_one(job) for job in jobs]
        kept[split] = [name for name in results if name is not None]
        source = f"the lists in {curated}" if curated else "the rule"
        log(f"{split}: {len(kept[split])} of {len(names)} images kept by {source} "
            f"(the paper: {PAPER_COUNTS[split]:,})")
    return kept


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True, help="folder with COCO's train2017/, val2017/")
    parser.add_argument("--labels", required=True,
                        help="folder with the stuffthingmaps train2017/, val2017/")
    parser.add_argument("--out", required=True, help="output: densesiam.py --task seg --data OUT")
    parser.add_argument("--curated", default="",
                        help="PiCIE's curated/ folder: take its image lists, skip the rule")
    parser.add_argument("--copy", action="store_true", help="copy the images (default: symlinks)")
    parser.add_argument("--workers", type=int, default=8, help="processes reading label maps")
    args = parser.parse_args(argv)
    try:
        return convert(args.images, args.labels, args.out, args.curated, args.copy, args.workers)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
