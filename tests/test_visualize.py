"""Pictures: overlays keep the image's size and put each colour where its segment is, overlapping instances are all
drawn, the hierarchy picture has a panel per level, and scripts/segment.py writes the PNGs and the JSON."""

import json
import os
import runpy

import numpy as np
import pytest
import torch
from PIL import Image

import native_seg_hf as ns
from native_seg_hf.visualize import ALPHA, BOUNDARY_COLOR, GROUP_BOUNDARY_COLOR, hierarchy_picture, label_color
from native_seg_hf.visualize import segments_overlay, semantic_overlay

ROOT = os.path.join(os.path.dirname(__file__), "..")
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "camvid_0016E5_07959.jpg")
HEIGHT, WIDTH = 120, 160


def photo():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))


def tinted(image, color, row, col):
    """The overlay colour expected at a pixel of the image covered by a segment of the given colour."""
    return tuple(np.round((1 - ALPHA) * np.asarray(image)[row, col] + ALPHA * np.asarray(color)).astype(int))


def at(picture, row, col):
    return tuple(int(v) for v in np.asarray(picture)[row, col])


def test_semantic_overlay(tmp_path):
    image = photo()
    classes = torch.zeros(HEIGHT, WIDTH, dtype=torch.long)
    classes[:, WIDTH // 2 :] = 7
    picture = semantic_overlay(image, classes, {0: "sky", 7: "road"})
    picture.save(tmp_path / "semantic.png")
    assert Image.open(tmp_path / "semantic.png").size == image.size
    assert at(picture, 100, 40) == tinted(image, label_color(0), 100, 40)
    assert at(picture, 100, 120) == tinted(image, label_color(7), 100, 120)
    assert at(picture, 100, WIDTH // 2 - 1) == BOUNDARY_COLOR  # the class border is outlined
    # The legend, top left, shows a swatch of each class present (the larger first).
    legend = np.asarray(picture)[:40, :80].reshape(-1, 3)
    assert (legend == label_color(0)).all(-1).any() and (legend == label_color(7)).all(-1).any()
    with pytest.raises(ValueError, match="post-process to its size"):
        semantic_overlay(image, classes[:, :10])


def test_panoptic_overlay_leaves_void_alone_and_shades_instances_of_a_class():
    image = photo()
    segmentation = torch.full((HEIGHT, WIDTH), -1)
    segmentation[60:, :50] = 0
    segmentation[60:, 50:100] = 1
    infos = [{"id": 0, "label_id": 3, "score": 0.9}, {"id": 1, "label_id": 3, "score": 0.8}]
    picture = segments_overlay(image, {"segmentation": segmentation, "segments_info": infos})
    assert picture.size == image.size
    assert at(picture, 30, 140) == at(image, 30, 140)  # no segment: the photo as it is
    first, second = at(picture, 100, 20), at(picture, 100, 70)
    assert first == tinted(image, label_color(3), 100, 20)
    assert second != tinted(image, label_color(3), 100, 70)  # a second instance of class 3: another shade


def test_overlapping_instances_are_all_drawn_best_on_top():
    image = photo()
    masks = torch.zeros(2, HEIGHT, WIDTH, dtype=torch.bool)
    masks[0, 20:80, 20:80] = True  # best instance
    masks[1, 50:110, 50:110] = True  # overlaps it
    infos = [{"id": 0, "label_id": 1, "score": 0.9}, {"id": 1, "label_id": 2, "score": 0.6}]
    picture = segments_overlay(image, {"segmentation": None, "segments_info": infos, "masks": masks})
    assert at(picture, 60, 60) == tinted(image, label_color(1), 60, 60)  # the overlap shows the best instance
    assert at(picture, 100, 100) == tinted(image, label_color(2), 100, 100)
    assert at(picture, 65, 49) == BOUNDARY_COLOR  # the lower instance's outline, drawn inside the best one
    assert at(picture, 79, 65) == BOUNDARY_COLOR  # and the best one's inside the lower one


def test_hierarchy_picture_has_a_panel_per_level_with_group_boundaries():
    image = photo()
    fine = torch.arange(HEIGHT * WIDTH).reshape(HEIGHT, WIDTH) // 20 % 8  # vertical stripes, 20 pixels wide
    coarse = torch.zeros(HEIGHT, WIDTH, dtype=torch.long)
    coarse[:, 80:] = 1
    picture = hierarchy_picture(image, [fine, coarse])
    assert picture.size == (2 * WIDTH, HEIGHT)
    assert at(picture, 100, 19) == GROUP_BOUNDARY_COLOR  # a stripe border in the first panel
    assert at(picture, 100, 10) == at(image, 100, 10)  # the photo inside a group
    assert at(picture, 100, WIDTH + 79) == GROUP_BOUNDARY_COLOR  # the one border of the second panel
    assert at(picture, 100, WIDTH + 19) == at(image, 100, 19)


@pytest.mark.parametrize("universal", [False, True])
def test_segment_script_writes_pictures_and_json(tmp_path, universal):
    torch.manual_seed(0)
    config = ns.SeNaTraConfig(
        hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_heads=[1, 2, 3, 4], num_queries=8, num_blocks=1,
        num_labels=3, id2label={0: "sky", 1: "building", 2: "road"},
    )
    model = (ns.SeNaTraForUniversalSegmentation if universal else ns.SeNaTraForSemanticSegmentation)(config)
    model.save_pretrained(tmp_path / "model")
    ns.SeNaTraImageProcessor.from_model_config(config, size={"shortest_edge": 64}).save_pretrained(tmp_path / "model")
    script = runpy.run_path(os.path.join(ROOT, "scripts", "segment.py"))
    script["main"]([FIXTURE, "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--threshold", "0"])

    image = Image.open(FIXTURE)
    stem = os.path.splitext(os.path.basename(FIXTURE))[0]
    subtasks = ["semantic", "panoptic", "instance"] if universal else ["semantic"]
    for name in subtasks:
        assert Image.open(tmp_path / "out" / f"{stem}_{name}.png").size == image.size
    hierarchy = Image.open(tmp_path / "out" / f"{stem}_hierarchy.png")
    assert hierarchy.size == (3 * image.width, image.height)  # three grouping levels

    report = json.loads((tmp_path / "out" / f"{stem}.json").read_text())
    assert (report["height"], report["width"]) == (image.height, image.width)
    assert sum(s["area"] for s in report["semantic"]) == image.width * image.height
    assert all(s["label"] in config.id2label.values() for name in subtasks for s in report[name])
    assert len(report["native_groups_per_level"]) == 3
    if universal:
        assert all(s["box"][2] <= image.width and s["box"][3] <= image.height for s in report["instance"])
