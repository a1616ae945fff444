"""Heatmap panels: colours, GT outline, scaling, file layout."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from genclip_jax import heatmaps


def test_colourize_ends_and_clipping():
    colours = heatmaps.colourize(np.array([[-1.0, 0.0, 1.0, 2.0, np.nan]]))
    assert colours.dtype == np.uint8 and colours.shape == (1, 5, 3)
    assert colours[0, 1].tolist() == [0, 0, 160] == colours[0, 0].tolist()  # blue, clipped
    assert colours[0, 2].tolist() == [200, 0, 0] == colours[0, 3].tolist()  # red, clipped
    assert colours[0, 4].tolist() == [0, 0, 160]  # NaN shows as the lowest value


def test_outline_is_the_inner_border_of_the_mask():
    mask = np.zeros((7, 7))
    mask[2:5, 2:5] = 1
    edge = heatmaps.outline(mask)
    assert edge.sum() == 8 and not edge[3, 3] and edge[2, 2]


def test_overlay_scales_by_the_given_range_and_draws_the_outline():
    image = np.full((8, 8, 3), 100, np.uint8)
    amap = np.zeros((8, 8))
    amap[0, 0] = 1.0
    mask = np.zeros((8, 8))
    mask[4:, 4:] = 1
    out = heatmaps.overlay(image, amap, mask, value_range=(0.0, 2.0))
    blend = lambda colour: np.round(0.5 * 100 + 0.5 * np.array(colour)).astype(np.uint8)
    np.testing.assert_array_equal(out[0, 0], blend(heatmaps.colourize(np.array(0.5))))
    np.testing.assert_array_equal(out[1, 1], blend([0, 0, 160]))
    assert tuple(out[4, 4]) == heatmaps.OUTLINE_RGB and tuple(out[6, 6]) != heatmaps.OUTLINE_RGB
    flat = heatmaps.overlay(image, np.full((8, 8), 3.0))  # constant map: no division by zero
    np.testing.assert_array_equal(flat[0, 0], blend([0, 0, 160]))
    with pytest.raises(ValueError, match=r"image \(8, 8\) and anomaly_map \(4, 4\) differ"):
        heatmaps.overlay(image, np.zeros((4, 4)))


def test_save_panel_writes_image_and_overlay_side_by_side(tmp_path):
    path = tmp_path / heatmaps.panel_names(["disc/test/spot/001.jpg"])[0]
    assert path == tmp_path / "disc" / "test" / "spot" / "001.png"
    image = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    assert heatmaps.save_panel(path, image, np.zeros((6, 6))) == path
    panel = np.asarray(Image.open(path))
    assert panel.shape == (6, 12, 3)
    np.testing.assert_array_equal(panel[:, :6], image)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_panel_names_mirror_the_inputs_and_never_collide():
    mvtec = ["bottle/test/broken_large/000.png", "bottle/test/good/000.png"]
    assert heatmaps.panel_names(mvtec) == mvtec
    others = ["x.jpg", "a/b.tiff", "./c//d.JPG"]
    assert heatmaps.panel_names(others) == ["x.png", "a/b.png", "c/d.png"]
    # Flattening gave these three inputs one file; same stem in one folder keeps the full name.
    assert heatmaps.panel_names(["a/b.png", "a/b.jpg", "a_b.png"]) == [
        "a/b.png.png", "a/b.jpg.png", "a_b.png"
    ]
    # An input literally named like a disambiguated name: later ones get ~k, in input order.
    inputs = ["a/b.jpg.png", "a/b.jpg", "a/b.png", "a/b.jpg~1.png", "c/d.png", "c/d.png"]
    names = heatmaps.panel_names(inputs)
    assert names == [
        "a/b.jpg.png", "a/b.jpg~2.png", "a/b.png.png", "a/b.jpg~1.png", "c/d.png.png",
        "c/d.png~1.png",
    ]
    assert len(set(names)) == len(names) and heatmaps.panel_names(inputs) == names
    # A file panel may not take the name of an output folder (a.jpg next to folder a.png/).
    assert heatmaps.panel_names(["a.jpg", "a.png/x.bmp"]) == ["a~1.png", "a.png/x.png"]
    for bad in ("/abs/x.png", "a/../x.png", "", "."):
        with pytest.raises(ValueError, match=rf"heatmap input path '{bad}': expected a relative"):
            heatmaps.panel_names(["ok.png", bad])
