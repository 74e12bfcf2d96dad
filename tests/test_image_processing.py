"""SeNaTraImageProcessor: input kinds, resizing and padding, segmentation maps, geometry round trips of every
post-processing, query post-processing on outputs whose answer is known, sliding windows, saving and bad input."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import AutoImageProcessor, EomtConfig, EomtForUniversalSegmentation
from transformers.modeling_outputs import SemanticSegmenterOutput

import native_seg_hf as ns
from native_seg_hf.models.image_processing_senatra import nearest_resize, semantic_logits

COCO_PANOPTIC = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "coco_panoptic_sample", "sample_data"
)
TINY = dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_heads=[1, 2, 3, 4], attention_kernel_size=3)


def random_image(height, width, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def blocks_map(height, width):
    """A class map with a few large rectangles (classes 0..3), for round trips."""
    labels = np.zeros((height, width), dtype=np.int64)
    labels[: height // 2, width // 3 :] = 1
    labels[height // 2 :, : width // 2] = 2
    labels[height // 4 : 3 * height // 4, 2 * width // 3 :] = 3
    return labels


def interior(labels, margin):
    """Pixels whose (2 * margin + 1)^2 neighbourhood holds a single label: where resampling cannot blur the answer."""
    padded = np.pad(labels, margin, mode="edge")
    same = np.ones(labels.shape, dtype=bool)
    height, width = labels.shape
    for dy in range(2 * margin + 1):
        for dx in range(2 * margin + 1):
            same &= padded[dy : dy + height, dx : dx + width] == labels
    return same


# ---- inputs ----


def test_every_input_kind_gives_the_same_pixels():
    processor = ns.SeNaTraImageProcessor(size={"shortest_edge": 32})
    rgb = random_image(37, 53)
    variants = [Image.fromarray(rgb), rgb, np.moveaxis(rgb, -1, 0), torch.from_numpy(rgb).permute(2, 0, 1)]
    outputs = [processor(images=v, return_tensors="pt").pixel_values for v in variants]
    for out in outputs[1:]:
        assert torch.equal(out, outputs[0])

    gray = random_image(37, 53, channels=1)[..., 0]
    as_rgb = processor(images=np.repeat(gray[..., None], 3, -1), return_tensors="pt").pixel_values
    for v in [Image.fromarray(gray), gray, gray[..., None], torch.from_numpy(gray)[None]]:
        assert torch.equal(processor(images=v, return_tensors="pt").pixel_values, as_rgb)

    # Transparent pixels are composited onto white, as transformers' convert_to_rgb does.
    rgba = np.concatenate([rgb, np.zeros((37, 53, 1), np.uint8)], axis=-1)
    white = processor(images=np.full((37, 53, 3), 255, np.uint8), return_tensors="pt").pixel_values
    assert torch.equal(processor(images=Image.fromarray(rgba), return_tensors="pt").pixel_values, white)
    assert torch.equal(processor(images=rgba, return_tensors="pt").pixel_values, white)


@pytest.mark.parametrize(
    "settings,original,content,padded",
    [
        (dict(size={"shortest_edge": 64}), (37, 53), (64, 91), (64, 96)),
        (dict(size={"longest_edge": 64}), (37, 53), (45, 64), (64, 64)),
        (dict(size={"height": 50, "width": 70}), (37, 53), (50, 70), (64, 96)),
        (dict(size={"shortest_edge": 64, "longest_edge": 80}), (20, 90), (18, 80), (32, 96)),
        (dict(size={"longest_edge": 100}, pad_size={"height": 128, "width": 128}), (37, 53), (70, 100), (128, 128)),
        (dict(size={"shortest_edge": 40}, size_divisor=16), (37, 53), (40, 57), (48, 64)),
        (dict(do_resize=False, do_pad=False), (37, 53), (37, 53), (37, 53)),
    ],
)
def test_resize_and_pad(settings, original, content, padded):
    processor = ns.SeNaTraImageProcessor(**settings)
    out = processor(images=random_image(*original), return_tensors="pt")
    assert out.pixel_values.shape == (1, 3, *padded)
    mask = out.pixel_mask[0]
    assert mask.sum(0).max() == content[0] and mask.sum(1).max() == content[1]
    assert mask[: content[0], : content[1]].all()
    assert (out.pixel_values[0, :, content[0] :] == 0).all() and (out.pixel_values[0, :, :, content[1] :] == 0).all()
    [geometry] = processor.image_geometry([original])
    assert (geometry.content, geometry.padded) == (content, padded)


def test_batches_pad_to_the_largest_image():
    processor = ns.SeNaTraImageProcessor(do_resize=False)
    out = processor(images=[random_image(40, 70), random_image(65, 30, channels=1)[..., 0]], return_tensors="pt")
    assert out.pixel_values.shape == (2, 3, 96, 96)
    assert out.pixel_mask.sum((1, 2)).tolist() == [40 * 70, 65 * 30]
    stacked = processor(images=np.stack([random_image(40, 70), random_image(40, 70, seed=1)]), return_tensors="pt")
    assert stacked.pixel_values.shape == (2, 3, 64, 96)


# ---- segmentation maps ----


def test_semantic_labels_follow_the_image_and_pad_with_the_ignore_index():
    processor = ns.SeNaTraImageProcessor(size={"shortest_edge": 64}, num_labels=4)
    labels = blocks_map(37, 53)
    out = processor(images=random_image(37, 53), segmentation_maps=labels, return_tensors="pt")
    assert out.labels.shape == (1, 64, 96) and out.labels.dtype == torch.int64
    assert np.array_equal(out.labels[0, :, :91].numpy(), nearest_resize(labels, (64, 91)))
    assert (out.labels[0, :, 91:] == 255).all()

    ade_style = processor(
        images=random_image(37, 53), segmentation_maps=labels, do_reduce_labels=True, return_tensors="pt"
    ).labels[0, :, :91]
    expected = np.where(nearest_resize(labels, (64, 91)) == 0, 255, nearest_resize(labels, (64, 91)) - 1)
    assert np.array_equal(ade_style.numpy(), expected)


def test_instance_maps_become_mask_labels_and_class_labels():
    processor = ns.SeNaTraImageProcessor(size={"shortest_edge": 64})
    instances = np.zeros((37, 53), dtype=np.int64)  # 0 = void
    instances[2:20, 3:30] = 300  # ids beyond 8 bits survive resizing
    instances[15:35, 20:50] = 7
    out = processor(
        images=random_image(37, 53),
        segmentation_maps=instances,
        instance_id_to_semantic_id={0: 255, 7: 1, 300: 2},
        return_tensors="pt",
    )
    [masks], [classes] = out.mask_labels, out.class_labels
    resized = nearest_resize(instances, (64, 91))
    assert classes.tolist() == [1, 2]  # ids in increasing order: 7, then 300; void left out
    assert masks.shape == (2, 64, 96) and masks.dtype == torch.float32
    assert np.array_equal(masks[0, :, :91].numpy(), resized == 7)
    assert np.array_equal(masks[1, :, :91].numpy(), resized == 300)
    assert (masks[:, :, 91:] == 0).all()

    # A semantic map for a query model: one mask per class present.
    semantic = processor(
        images=random_image(37, 53), segmentation_maps=blocks_map(37, 53), return_mask_labels=True, return_tensors="pt"
    )
    assert semantic.class_labels[0].tolist() == [0, 1, 2, 3]
    assert torch.equal(semantic.mask_labels[0].sum(0)[:, :91], torch.ones(64, 91))


@pytest.mark.skipif(not os.path.isdir(COCO_PANOPTIC), reason="../shared/data/coco_panoptic_sample is absent")
def test_real_coco_panoptic_annotation():
    with open(os.path.join(COCO_PANOPTIC, "panoptic_examples.json")) as f:
        annotation = json.load(f)["annotations"][0]
    stem = annotation["file_name"].rsplit(".", 1)[0]
    image = Image.open(os.path.join(COCO_PANOPTIC, "input_images", stem + ".jpg"))
    rgb = np.asarray(Image.open(os.path.join(COCO_PANOPTIC, "panoptic_examples", annotation["file_name"])), np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]
    mapping = {0: 255, **{s["id"]: s["category_id"] for s in annotation["segments_info"]}}
    out = ns.SeNaTraImageProcessor(size={"shortest_edge": 128})(
        images=image, segmentation_maps=ids, instance_id_to_semantic_id=mapping, return_tensors="pt"
    )
    [masks], [classes] = out.mask_labels, out.class_labels
    segments = sorted(annotation["segments_info"], key=lambda s: s["id"])
    assert classes.tolist() == [s["category_id"] for s in segments]
    content = out.pixel_mask[0].sum()
    for mask, segment in zip(masks, segments):  # each segment keeps its share of the image
        assert abs(mask.sum() / content - segment["area"] / ids.size) < 0.01


# ---- geometry round trips: post-processing returns maps of the original size with labels where they were ----


@pytest.mark.parametrize("settings", [dict(size={"shortest_edge": 64}), dict(size={"longest_edge": 128})])
def test_semantic_and_hierarchical_round_trips(settings):
    processor = ns.SeNaTraImageProcessor(**settings)
    originals = [blocks_map(75, 101), blocks_map(120, 50)[::-1].copy()]  # a batch of different sizes and shapes
    images = [random_image(*labels.shape) for labels in originals]
    out = processor(images=images, segmentation_maps=originals, return_tensors="pt")
    sizes = [labels.shape for labels in originals]

    # Logits of a perfect stride-1 prediction, and hierarchy levels at stride 4: the processed maps sampled at the
    # top-left pixel of each cell (never in the padding for a cell the image reaches into), as native group ids (the
    # class ids, offset per level).
    semantic_maps = processor.post_process_semantic_segmentation(
        SemanticSegmenterOutput(logits=F.one_hot(out.labels.clamp(max=3)).permute(0, 3, 1, 2).float()), sizes
    )
    levels = [out.labels[:, ::4, ::4] + 10 * level for level in range(3)]
    hierarchies = processor.post_process_hierarchical_segmentation(levels, sizes)
    for labels, semantic, hierarchy, geometry in zip(originals, semantic_maps, hierarchies, processor.image_geometry(sizes)):
        scale = min(c / o for c, o in zip(geometry.content, geometry.original))
        # Away from class borders by more than one output cell (in original pixels), labels must be exact.
        inside = interior(labels, margin=math.ceil(1 / scale) + 1)
        assert semantic.shape == labels.shape and semantic.dtype == torch.int64
        assert np.array_equal(semantic.numpy()[inside], labels[inside])
        inside = interior(labels, margin=math.ceil(4 / scale) + 1)
        assert inside.mean() > 0.4
        assert len(hierarchy) == 3
        for level, groups in enumerate(hierarchy):
            assert groups.shape == labels.shape
            assert np.array_equal(groups.numpy()[inside], labels[inside] + 10 * level)


def test_post_processing_checks_target_sizes_against_the_outputs():
    processor = ns.SeNaTraImageProcessor(size={"shortest_edge": 64})
    outputs = SemanticSegmenterOutput(logits=torch.randn(1, 3, 16, 24))  # a 64x96 input at stride 4
    assert processor.post_process_semantic_segmentation(outputs, [(37, 53)])[0].shape == (37, 53)
    with pytest.raises(ValueError, match="target_sizes has 2 entries but the outputs hold 1"):
        processor.post_process_semantic_segmentation(outputs, [(37, 53), (37, 53)])
    with pytest.raises(ValueError, match="cannot cover the 64x64 input"):
        processor.post_process_semantic_segmentation(outputs, [(60, 60)])


# ---- query post-processing on hand-built outputs whose answer is known ----

HEIGHT, WIDTH = 32, 48  # images of this size go through unchanged with the processor below


def query_outputs(class_probs, masks):
    """Outputs of a query model: class probabilities (K, C + 1) and boolean masks (K, 8, 12) on a coarse grid, given
    at pixel resolution so that the expected answer holds to the pixel (the stride is the round trips' business)."""
    class_logits = torch.tensor(class_probs, dtype=torch.float32).log()[None]
    mask_logits = torch.where(torch.stack([pixels(m) for m in masks]), 10.0, -10.0)[None]
    return {"class_queries_logits": class_logits, "masks_queries_logits": mask_logits}


def mask(rows=slice(None), cols=slice(None)):
    m = np.zeros((8, 12), dtype=bool)
    m[rows, cols] = True
    return m


def unchanged_processor(**kwargs):
    return ns.SeNaTraImageProcessor(do_resize=False, size_divisor=16, **kwargs)


def pixels(m):
    """A coarse (8, 12) mask at the image's pixel size."""
    return torch.from_numpy(np.kron(m, np.ones((4, 4), dtype=bool)))


def test_panoptic_merges_stuff_classes_into_one_segment():
    # Classes: 0 thing, 1 stuff; index 2 is "no object".
    outputs = query_outputs(
        [
            [0.02, 0.95, 0.03],  # q0: stuff, left third
            [0.05, 0.90, 0.05],  # q1: stuff, middle third
            [0.92, 0.03, 0.05],  # q2: thing, right third (top half)
            [0.85, 0.05, 0.10],  # q3: thing, half inside q2's region: wins too little of its own mask
            [0.30, 0.30, 0.40],  # q4: below threshold, bottom-right
            [0.01, 0.01, 0.98],  # q5: no object
        ],
        [mask(cols=slice(0, 4)), mask(cols=slice(4, 8)), mask(slice(0, 4), slice(8, 12)),
         mask(slice(2, 6), slice(9, 11)), mask(slice(4, 8), slice(8, 12)), mask()],
    )
    processor = unchanged_processor(stuff_classes=[1])
    [result] = processor.post_process_panoptic_segmentation(outputs, [(HEIGHT, WIDTH)], threshold=0.5)
    segmentation, infos = result["segmentation"], result["segments_info"]
    assert [(s["label_id"], s["score"]) for s in infos] == [(1, 0.95), (0, 0.92)]
    stuff_id, thing_id = infos[0]["id"], infos[1]["id"]
    assert torch.equal(segmentation == stuff_id, pixels(mask(cols=slice(0, 8))))
    assert torch.equal(segmentation == thing_id, pixels(mask(slice(0, 4), slice(8, 12))))
    assert (segmentation[16:, 32:] == -1).all()  # q4's region (and the part q3 won there): no segment

    [apart] = processor.post_process_panoptic_segmentation(outputs, [(HEIGHT, WIDTH)], threshold=0.5, stuff_classes=[])
    assert [s["label_id"] for s in apart["segments_info"]] == [1, 0, 1]


def test_instances_may_overlap_and_are_scored_for_ap():
    outputs = query_outputs(
        [
            [0.90, 0.02, 0.03, 0.05],  # q0: class 0, rows 0-5
            [0.02, 0.03, 0.80, 0.15],  # q1: class 2, rows 3-7, overlapping q0
            [0.45, 0.40, 0.05, 0.10],  # q2: two likely classes on one mask, right columns
            [0.01, 0.01, 0.01, 0.97],  # q3: no object
        ],
        [mask(rows=slice(0, 6)), mask(rows=slice(3, 8)), mask(cols=slice(10, 12)), mask()],
    )
    soft = outputs["masks_queries_logits"][0, 2]
    soft[soft > 0] = np.log(0.8 / 0.2)  # q2's mask probability is 0.8 inside: its scores are 0.8 x its class's
    processor = unchanged_processor()
    [result] = processor.post_process_instance_segmentation(outputs, [(HEIGHT, WIDTH)], threshold=0.3)
    infos, masks = result["segments_info"], result["masks"]
    assert [(s["label_id"], round(s["score"], 2)) for s in infos] == [(0, 0.9), (2, 0.8), (0, 0.36), (1, 0.32)]
    assert [s["id"] for s in infos] == [0, 1, 2, 3]
    assert masks.shape == (4, HEIGHT, WIDTH) and masks.dtype == torch.bool
    assert torch.equal(masks[0], pixels(mask(rows=slice(0, 6))))
    assert torch.equal(masks[1], pixels(mask(rows=slice(3, 8))))
    assert (masks[0] & masks[1]).sum() == 3 * 4 * WIDTH  # the overlap is kept in both masks
    assert torch.equal(masks[2], masks[3])  # one query, two classes: AP-style (query, class) pairs
    # The non-overlapping map gives each pixel to the best instance covering it.
    expected = torch.full((HEIGHT, WIDTH), -1)
    expected[pixels(mask(cols=slice(10, 12)))] = 2
    expected[pixels(mask(rows=slice(3, 8)))] = 1
    expected[pixels(mask(rows=slice(0, 6)))] = 0
    assert torch.equal(result["segmentation"], expected)

    [top] = processor.post_process_instance_segmentation(outputs, [(HEIGHT, WIDTH)], threshold=0.0, top_k=2)
    assert [s["label_id"] for s in top["segments_info"]] == [0, 2]
    [bare] = processor.post_process_instance_segmentation(outputs, [(HEIGHT, WIDTH)], return_binary_masks=False)
    assert "masks" not in bare and len(bare["segments_info"]) == 2


def test_semantic_maps_from_queries_and_panoptic_from_semantic_logits():
    processor = unchanged_processor()
    outputs = query_outputs(
        [[0.9, 0.05, 0.05], [0.05, 0.9, 0.05]], [mask(cols=slice(0, 5)), mask(cols=slice(5, 12))]
    )
    [semantic] = processor.post_process_semantic_segmentation(outputs, [(HEIGHT, WIDTH)])
    assert torch.equal(semantic, pixels(mask(cols=slice(5, 12))).long())

    logits = torch.full((1, 3, 8, 12), -5.0)  # at stride 4
    logits[0, 2, :4] = logits[0, 0, 4:] = 5.0
    [panoptic] = processor.post_process_panoptic_segmentation(SemanticSegmenterOutput(logits=logits), [(HEIGHT, WIDTH)])
    assert sorted(s["label_id"] for s in panoptic["segments_info"]) == [0, 2]
    by_label = {s["label_id"]: s["id"] for s in panoptic["segments_info"]}
    assert torch.equal(panoptic["segmentation"] == by_label[2], pixels(mask(rows=slice(0, 4))))
    with pytest.raises(ValueError, match="instance segmentation needs query predictions"):
        processor.post_process_instance_segmentation(SemanticSegmenterOutput(logits=logits), [(HEIGHT, WIDTH)])


def test_transformers_eomt_outputs_go_through_every_post_processing():
    torch.manual_seed(0)
    config = EomtConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16, num_queries=6,
        num_blocks=1, num_labels=3, num_register_tokens=1,
    )
    model = EomtForUniversalSegmentation(config).eval()
    model.attn_mask_probs.zero_()  # inference runs unmasked, as after annealing
    processor = ns.SeNaTraImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}, size_divisor=16)
    images, sizes = [random_image(50, 90), random_image(70, 40)], [(50, 90), (70, 40)]
    with torch.no_grad():
        outputs = model(**processor(images=images, return_tensors="pt"))
    for semantic, size in zip(processor.post_process_semantic_segmentation(outputs, sizes), sizes):
        assert semantic.shape == size and 0 <= semantic.min() and semantic.max() < 3
    for result, size in zip(processor.post_process_panoptic_segmentation(outputs, sizes, threshold=0.0), sizes):
        assert result["segmentation"].shape == size
        assert {s["id"] for s in result["segments_info"]} == set(result["segmentation"].unique().tolist()) - {-1}
    for result, size in zip(processor.post_process_instance_segmentation(outputs, sizes, threshold=0.0), sizes):
        assert result["masks"].shape == (len(result["segments_info"]), *size)
        assert all(0 <= s["label_id"] < 3 for s in result["segments_info"])


# ---- sliding windows ----


class PerPixelModel(nn.Module):
    """A model whose scores at a pixel depend on that pixel only, so windows must reproduce a full pass exactly.
    With `fixed_size` it refuses other input sizes, as EoMT does."""

    def __init__(self, queries: bool, fixed_size=None):
        super().__init__()
        torch.manual_seed(0)
        self.queries, self.fixed_size = queries, fixed_size
        self.conv = nn.Conv2d(3, 5, 1)
        self.class_logits = nn.Parameter(torch.randn(5, 4))

    def forward(self, pixel_values):
        if self.fixed_size is not None:
            assert tuple(pixel_values.shape[-2:]) == self.fixed_size, pixel_values.shape
        features = self.conv(pixel_values)
        if not self.queries:
            return SemanticSegmenterOutput(logits=features)
        return {"class_queries_logits": self.class_logits.expand(len(pixel_values), -1, -1), "masks_queries_logits": features}


@pytest.mark.parametrize("queries", [False, True])
@pytest.mark.parametrize("height,width,window,stride", [(72, 104, 32, 24), (20, 100, 32, (32, 16)), (64, 64, 64, None)])
def test_sliding_windows_reproduce_a_full_pass(queries, height, width, window, stride):
    processor = ns.SeNaTraImageProcessor(size_divisor=8)
    pixel_values = torch.randn(2, 3, height, width)
    model = PerPixelModel(queries, fixed_size=(window, window))
    merged = processor.sliding_window_inference(model, pixel_values, window, stride, batch_size=3).logits
    full = semantic_logits(PerPixelModel(queries)(pixel_values))
    assert merged.shape == full.shape
    assert torch.allclose(merged, full, atol=1e-5)


def test_sliding_window_with_a_senatra_model_matches_one_pass_on_a_single_window():
    torch.manual_seed(0)
    model = ns.SeNaTraForSemanticSegmentation(ns.SeNaTraConfig(**TINY, num_labels=3)).eval()
    processor = ns.SeNaTraImageProcessor.from_model_config(model.config, size={"shortest_edge": 64})
    inputs = processor(images=random_image(64, 64), return_tensors="pt")
    merged = processor.sliding_window_inference(model, inputs.pixel_values, 64)
    with torch.no_grad():
        full = F.interpolate(model(inputs.pixel_values).logits, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(merged.logits, full, atol=1e-5)
    assert processor.post_process_semantic_segmentation(merged, [(64, 64)])[0].shape == (64, 64)
    with pytest.raises(ValueError, match="multiples of size_divisor 32"):
        processor.sliding_window_inference(model, inputs.pixel_values, 48)
    with pytest.raises(ValueError, match="at most the window"):
        processor.sliding_window_inference(model, inputs.pixel_values, 32, stride=64)


# ---- configs, saving, Auto classes ----


def test_from_model_config_and_auto_image_processor_round_trip(tmp_path):
    config = ns.SeNaTraConfig(**TINY, patch_size=8, num_labels=5, semantic_loss_ignore_index=100)
    processor = ns.SeNaTraImageProcessor.from_model_config(config, stuff_classes=[3, 4], size={"shortest_edge": 96})
    assert (processor.size_divisor, processor.num_labels, processor.ignore_index) == (64, 5, 100)
    assert ns.SeNaTraImageProcessor.from_model_config(config, size_divisor=128).size_divisor == 128
    config.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is ns.SeNaTraImageProcessor
    assert loaded.to_dict() == processor.to_dict()
    assert loaded.stuff_classes == [3, 4] and loaded.size.shortest_edge == 96

    segmenter = ns.SegmenterConfig(backbone_config=ns.SeNaTraConfig(**TINY), num_labels=2)
    assert ns.SeNaTraImageProcessor.from_model_config(segmenter).size_divisor == 32
    segmenter.save_pretrained(tmp_path / "segmenter")
    ns.SeNaTraImageProcessor().save_pretrained(tmp_path / "segmenter")
    assert type(AutoImageProcessor.from_pretrained(tmp_path / "segmenter")) is ns.SeNaTraImageProcessor


# ---- bad input ----

RGB = random_image(8, 8)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(images=Image.new("RGB", (0, 10))), r"images\[0\] has 0 pixels"),
        (dict(images=[RGB, np.zeros((0, 5, 3), np.uint8)]), r"images\[1\] has 0 pixels"),
        (dict(images=np.zeros((8, 8, 2), np.uint8)), r"images\[0\] has 2 channels"),
        (dict(images=torch.zeros(2, 8, 8)), r"images\[0\] has 2 channels"),
        (dict(images=np.zeros((2, 3, 8, 8, 1))), r"images\[0\] must have shape"),
        (dict(images=[]), "images is an empty batch"),
        (dict(images="photo.jpg"), "must be a PIL image, a numpy array or a torch tensor, got str"),
        (dict(images=RGB, segmentation_maps=np.zeros((8, 9), np.int64)), r"segmentation_maps\[0\] is 8x9 but images\[0\] is 8x8"),
        (dict(images=RGB, segmentation_maps=np.full((8, 8), 5), num_labels=3), r"segmentation_maps\[0\] holds class ids \[5\] outside \[0, 3\)"),
        (dict(images=RGB, segmentation_maps=np.full((8, 8), -1)), r"class ids \[-1\]"),
        (dict(images=RGB, segmentation_maps=np.full((8, 8), 4), instance_id_to_semantic_id={3: 1}), "instance ids \\[4\\] that instance_id_to_semantic_id lacks"),
        (dict(images=RGB, segmentation_maps=np.full((8, 8), 1), instance_id_to_semantic_id={1: 7}, num_labels=3), r"class ids \[7\]"),
        (dict(images=RGB, segmentation_maps=np.zeros((8, 8), np.float32)), "must hold integer ids"),
        (dict(images=RGB, segmentation_maps=Image.new("RGB", (8, 8))), "RGB image"),
        (dict(images=RGB, segmentation_maps=[np.zeros((8, 8), np.int64)] * 2), "got 2 segmentation_maps for 1 images"),
        (dict(images=random_image(40, 200), size={"longest_edge": 100}, pad_size={"height": 16, "width": 128}), "does not fit pad_size"),
        (dict(images=[RGB, random_image(9, 8)], do_pad=False, do_resize=False), "same size"),
    ],
)
def test_bad_input_raises_value_error_naming_it(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ns.SeNaTraImageProcessor()(**kwargs)
