"""`python <method>.py --show`: one PNG of what the method does on one batch, and no training; the
boxes and points it draws sit where the augmentation put them."""

import dataclasses

import numpy
import PIL.Image
import pytest
import torch

import byol
import common
import dense_byol
import densesiam
import ladder_byol
import lewel
import mcl

SMALL = ["--synthetic-size", "40", "--device", "cpu"]

# method, extra flags, (rows, columns) of panels. Every method draws 4 images, a row each (LEWEL:
# a row per view; MCL: 2 more rows of montages): the image with the crop boxes, the views, and
# the method's own panels.
LAYOUTS = [
    (byol, [], (4, 3)),
    (dense_byol, ["--hidden-dim", "64", "--dense-hidden-dim", "64"], (4, 4)),  # + res5 matches
    (ladder_byol, ["--dense-stages", "res2,res3", "--hidden-dim", "64"], (4, 5)),  # + 2 rungs
    (densesiam, [], (4, 3)),                                          # grids drawn on the views
    (lewel, ["--hidden-dim", "64"], (8, 6)),                          # view + 4 group maps
    (mcl, [], (6, 4)),                                                # q boxes, k boxes, q0, k0
]


@pytest.mark.parametrize("method, extra, layout", LAYOUTS, ids=[m.__name__ for m, _, _ in LAYOUTS])
def test_show_writes_one_png_and_trains_nothing(tmp_path, capsys, method, extra, layout):
    path = method.main(["--show", "--out", str(tmp_path)] + SMALL + extra)
    assert path == str(tmp_path / "show.png")
    assert f"wrote {path}" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["show.png"]  # no checkpoint, no metrics
    with PIL.Image.open(path) as png:
        assert png.format == "PNG"
        pixels = torch.from_numpy(numpy.array(png.convert("RGB"))).float()
        rows, columns = layout
        # panels of PANEL px, 4 px of padding between and around them
        assert png.size == (columns * (common.PANEL + 4) + 4, rows * (common.PANEL + 4) + 4)
    assert pixels.std() > 10  # not blank


def test_drawn_crop_box_is_the_augmented_box():
    """The box outlined for a view covers exactly the picture pixels whose centres lie in the crop
    that augment returned (on a blank picture, pixel by pixel)."""
    images = torch.zeros(6, 3, 40, 40, dtype=torch.uint8)
    recipe = dataclasses.replace(common.GEOMETRY_ONLY, crop_scale=(0.1, 0.6))
    _, boxes, _ = common.augment(images, recipe, 32, torch.Generator().manual_seed(0))
    size = common.PANEL
    for x0, y0, x1, y1 in boxes.tolist():
        blank = torch.zeros(3, size, size, dtype=torch.uint8)
        box = torch.tensor([[x0, y0, x1, y1]])
        drawn = common.draw_boxes(blank, box, colours=("white",), width=1)[0] > 0
        columns = [c for c in range(size) if x0 * size <= c + 0.5 <= x1 * size]
        rows = [r for r in range(size) if y0 * size <= r + 0.5 <= y1 * size]
        lit_columns = drawn.any(dim=0).nonzero().flatten().tolist()
        lit_rows = drawn.any(dim=1).nonzero().flatten().tolist()
        assert (lit_columns[0], lit_columns[-1]) == (columns[0], columns[-1])
        assert (lit_rows[0], lit_rows[-1]) == (rows[0], rows[-1])
        # an outline: the edges are lit from corner to corner, the inside is not
        assert drawn[rows[0], columns[0]:columns[-1] + 1].all()
        assert drawn[rows[0]:rows[-1] + 1, columns[-1]].all()
        assert not drawn[rows[0] + 1:rows[-1], columns[0] + 1:columns[-1]].any()


def test_view_points_map_back_onto_the_image():
    """DenseBYOL's matches are drawn on the image: a point of a view goes to the image point it
    was sampled from. Box x 0.2..0.6, y 0.4..1.0. Unflipped, view point (0.25, 0.5) is image
    (0.2 + 0.25 * 0.4, 0.4 + 0.5 * 0.6) = (0.3, 0.7); mirrored, view column 0.25 shows image
    column 0.2 + 0.75 * 0.4 = 0.5."""
    boxes = torch.tensor([[0.2, 0.4, 0.6, 1.0]] * 2)
    flips = torch.tensor([False, True])
    points = torch.tensor([[[0.25, 0.5]], [[0.25, 0.5]]])
    mapped = common.view_to_image(points, boxes, flips).flatten().tolist()
    assert mapped == pytest.approx([0.3, 0.7, 0.5, 0.7])
    # a 2 x 2 map: cell centres at 1/4 and 3/4 of the view, row-major
    centres = [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]
    assert common.cell_centres(2, 2).tolist() == centres
