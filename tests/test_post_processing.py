"""Memory-bounded post-processing: every subtask gives what resampling every class or query to the full image gave
(the reference functions below, the algorithm post-processing used before it worked in bands and windows), on
predictions made from real label maps; exactly for photos no larger than the model's input, within resampling
tolerance for larger ones; and the size of the bands never changes an answer."""

import glob
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from transformers.modeling_outputs import SemanticSegmenterOutput

import native_seg_hf as ns
from native_seg_hf.models import image_processing_senatra

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
ADE20K = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "ade20k_sample", "annotations")
NUM_LABELS = 12


def label_maps():
    """Real label maps: the bundled CamVid one, and the ADE20K sample's when ../shared/data is there."""
    maps = {"camvid": np.array(Image.open(os.path.join(FIXTURES, "camvid_0016E5_07959.png")))}
    for path in sorted(glob.glob(os.path.join(ADE20K, "*.png")))[:2]:
        maps[os.path.basename(path)] = np.array(Image.open(path))
    return maps


def query_predictions(label_map, processor, seed=0, distractors=20):
    """Stride-4 query predictions shaped by a real label map: one confident query per connected region of a class
    (its mask logits the region's coverage of each cell, with noise), and distractor queries of smooth noise that
    mostly say "no object"; as `SeNaTraForUniversalSegmentation` would give for the processed photo."""
    generator = torch.Generator().manual_seed(seed)
    image = processor.image_geometry([label_map.shape])[0]
    grid = (image.padded[0] // 4, image.padded[1] // 4)
    content = (-(-image.content[0] // 4), -(-image.content[1] // 4))
    regions = []
    for label in np.unique(label_map):
        components, count = ndimage.label(label_map == label)
        regions += [(int(label) % NUM_LABELS, components == k) for k in range(1, count + 1)]
    regions = [(label, region) for label, region in regions if region.sum() > 50]
    num_queries = len(regions) + distractors
    mask_logits = torch.full((num_queries, *grid), -8.0)
    class_logits = torch.randn(num_queries, NUM_LABELS + 1, generator=generator)
    for q, (label, region) in enumerate(regions):
        coverage = F.interpolate(torch.from_numpy(region).float()[None, None], size=content, mode="area")[0, 0]
        mask_logits[q, : content[0], : content[1]] = 10 * (coverage - 0.5) + 0.5 * torch.randn(content, generator=generator)
        class_logits[q, label] += 4 + 2 * torch.rand((), generator=generator)
    for q in range(len(regions), num_queries):
        coarse = torch.randn(1, 1, grid[0] // 8 + 1, grid[1] // 8 + 1, generator=generator) * 6
        mask_logits[q] = F.interpolate(coarse, size=grid, mode="bilinear")[0, 0]
        class_logits[q, -1] += 3
    return {"class_queries_logits": class_logits[None], "masks_queries_logits": mask_logits[None]}


# ---- the algorithm before bands and windows: everything resampled to the full image at once ----


def reference_instance(image, class_logits, mask_logits, threshold, mask_threshold=0.5, top_k=100):
    class_probs = class_logits.softmax(-1)[:, :-1]
    num_classes = class_probs.shape[-1]
    pair_probs, pairs = class_probs.flatten().topk(min(top_k, class_probs.numel()))
    queries, pair_query = (pairs // num_classes).unique(return_inverse=True)
    mask_probs = image.to_original(mask_logits[queries][None])[0].sigmoid()
    masks = mask_probs > mask_threshold
    areas = masks.sum((1, 2))
    scores = pair_probs * ((mask_probs * masks).sum((1, 2)) / areas.clamp(min=1))[pair_query]
    keep = ((areas[pair_query] > 0) & (scores >= threshold)).nonzero()[:, 0]
    keep = keep[scores[keep].argsort(descending=True)]
    instance_masks = masks[pair_query[keep]]
    segmentation = torch.full(image.original, -1, dtype=torch.long)
    for n in reversed(range(len(keep))):
        segmentation[instance_masks[n]] = n
    infos = [
        {"id": n, "label_id": int(pairs[k] % num_classes), "score": round(float(scores[k]), 6)}
        for n, k in enumerate(keep.tolist())
    ]
    return {"segmentation": segmentation, "segments_info": infos, "masks": instance_masks}


def reference_panoptic(image, class_logits, mask_logits, threshold, mask_threshold=0.5, overlap=0.8):
    scores, labels = class_logits.softmax(-1).max(-1)
    kept = ((labels != class_logits.shape[-1] - 1) & (scores > threshold)).nonzero()[:, 0]
    kept = kept[scores[kept].argsort(descending=True)]
    scores, labels, n = scores[kept], labels[kept], len(kept)
    mask_probs = image.to_original(mask_logits[kept][None])[0].sigmoid()
    owner = (scores[:, None, None] * mask_probs).argmax(0)
    final_owner = torch.where(mask_probs.gather(0, owner[None])[0] >= mask_threshold, owner, n)
    owned_area = torch.bincount(owner.flatten(), minlength=n)
    final_area = torch.bincount(final_owner.flatten(), minlength=n + 1)[:n]
    valid = (final_area > 0) & (owned_area >= overlap * (mask_probs >= mask_threshold).sum((1, 2)))
    segment_of_query = torch.full((n + 1,), -1, dtype=torch.long)
    infos = []
    for k in valid.nonzero()[:, 0].tolist():  # no stuff classes: one segment per valid query
        segment_of_query[k] = len(infos)
        infos.append({"id": len(infos), "label_id": int(labels[k]), "score": round(float(scores[k]), 6)})
    return {"segmentation": segment_of_query[final_owner], "segments_info": infos}


def reference_panoptic_from_logits(image, logits):
    logits = image.to_original(logits[None])[0]
    classes = logits.argmax(0)
    confidence = logits.softmax(0).gather(0, classes[None])[0]
    found = sorted(
        ((float(confidence[classes == c].mean()), c) for c in classes.unique().tolist()), key=lambda item: -item[0]
    )
    segmentation = torch.full(image.original, -1, dtype=torch.long)
    for n, (_, c) in enumerate(found):
        segmentation[classes == c] = n
    return segmentation, [{"id": n, "label_id": c, "score": round(s, 6)} for n, (s, c) in enumerate(found)]


def post_process_all(processor, predictions, size, seed=0):
    """Every post-processing of our processor and of the reference on the same predictions."""
    image = processor.image_geometry([size])[0]
    class_logits, mask_logits = predictions["class_queries_logits"][0], predictions["masks_queries_logits"][0]
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, NUM_LABELS, *mask_logits.shape[-2:], generator=generator) * 3
    levels = [torch.randint(0, 60, (1, *mask_logits.shape[-2:]), generator=generator) for _ in range(3)]
    ours = {
        "semantic": processor.post_process_semantic_segmentation(predictions, [size])[0],
        "semantic_logits": processor.post_process_semantic_segmentation(SemanticSegmenterOutput(logits=logits), [size])[0],
        "panoptic_logits": processor.post_process_panoptic_segmentation(SemanticSegmenterOutput(logits=logits), [size])[0],
        "hierarchy": processor.post_process_hierarchical_segmentation(levels, [size])[0],
    }
    reference = {
        "semantic": image.to_original(image_processing_senatra.semantic_logits(predictions))[0].argmax(0),
        "semantic_logits": image.to_original(logits)[0].argmax(0),
        "panoptic_logits": reference_panoptic_from_logits(image, logits[0]),
        "hierarchy": list(image.to_original(torch.stack(levels, 1).float(), mode="nearest")[0].long()),
    }
    ours["panoptic_logits"] = (ours["panoptic_logits"]["segmentation"], ours["panoptic_logits"]["segments_info"])
    for threshold in (0.0, 0.5):
        ours[f"instance_{threshold}"] = processor.post_process_instance_segmentation(predictions, [size], threshold)[0]
        reference[f"instance_{threshold}"] = reference_instance(image, class_logits, mask_logits, threshold)
    for threshold in (0.5, 0.8):
        ours[f"panoptic_{threshold}"] = processor.post_process_panoptic_segmentation(predictions, [size], threshold)[0]
        reference[f"panoptic_{threshold}"] = reference_panoptic(image, class_logits, mask_logits, threshold)
    return ours, reference


def assert_same_answers(ours, reference):
    for key in ("semantic", "semantic_logits"):
        assert torch.equal(ours[key], reference[key]), key
    assert torch.equal(ours["panoptic_logits"][0], reference["panoptic_logits"][0])
    assert ours["panoptic_logits"][1] == reference["panoptic_logits"][1]
    assert all(torch.equal(a, b) for a, b in zip(ours["hierarchy"], reference["hierarchy"], strict=True))


@pytest.mark.parametrize("name", list(label_maps()))
def test_photos_up_to_the_model_input_size_get_exactly_the_full_resolution_answer(name):
    processor = ns.SeNaTraImageProcessor()  # short side 512: these photos are resized up for the model
    label_map = label_maps()[name]
    predictions = query_predictions(label_map, processor)
    ours, reference = post_process_all(processor, predictions, label_map.shape)
    assert_same_answers(ours, reference)
    for key in ("instance_0.0", "instance_0.5", "panoptic_0.5", "panoptic_0.8"):
        assert ours[key]["segments_info"] == reference[key]["segments_info"], key
        assert len(reference[key]["segments_info"]) > 5, key  # real work: many segments
        assert torch.equal(ours[key]["segmentation"], reference[key]["segmentation"]), key
    for key in ("instance_0.0", "instance_0.5"):
        assert torch.equal(ours[key]["masks"], reference[key]["masks"]), key


def label_of_pixels(result):
    labels = torch.tensor([info["label_id"] for info in result["segments_info"]] + [-1], dtype=torch.long)
    return labels[result["segmentation"]]  # -1 (no segment) picks the last entry


def test_photos_larger_than_the_model_input_get_the_full_resolution_answer_within_resampling_tolerance():
    """At 2.5x the model's input, scores and which segments are kept are measured at the input's resolution, and the
    maps and masks at the photo's: class, semantic and hierarchy maps stay exact, and instance and panoptic answers
    agree with the full-resolution ones up to the sampling of small masks."""
    processor = ns.SeNaTraImageProcessor()
    label_map = label_maps()["camvid"]
    predictions = query_predictions(label_map, processor)
    size = (1280, 1707)  # the model's input is 512x683
    ours, reference = post_process_all(processor, predictions, size)
    assert_same_answers(ours, reference)
    for key in ("instance_0.5", "panoptic_0.5", "panoptic_0.8"):
        mine, theirs = ours[key]["segments_info"], reference[key]["segments_info"]
        assert abs(len(mine) - len(theirs)) <= 1, key
        agreement = (label_of_pixels(ours[key]) == label_of_pixels(reference[key])).float().mean()
        assert agreement > 0.99, (key, agreement)
    # Every kept instance has a full-resolution counterpart: same class, nearly the same mask, a close score.
    mine, theirs = ours["instance_0.5"], reference["instance_0.5"]
    for info in mine["segments_info"]:
        mask = mine["masks"][info["id"]]
        candidates = [other for other in theirs["segments_info"] if other["label_id"] == info["label_id"]]
        ious = [
            ((mask & theirs["masks"][other["id"]]).sum() / (mask | theirs["masks"][other["id"]]).sum()).item()
            for other in candidates
        ]
        best = int(np.argmax(ious))
        assert ious[best] > 0.99 and abs(candidates[best]["score"] - info["score"]) < 0.06, (info, candidates[best])


def test_the_size_of_the_bands_never_changes_an_answer(monkeypatch):
    processor = ns.SeNaTraImageProcessor()
    label_map = label_maps()["camvid"]
    predictions = query_predictions(label_map, processor)
    size = (900, 1200)
    wide, _ = post_process_all(processor, predictions, size)
    monkeypatch.setattr(image_processing_senatra, "CHUNK_ELEMENTS", 20_000)  # bands of a few rows, one query at a time
    narrow, _ = post_process_all(processor, predictions, size)
    for key, value in wide.items():
        if isinstance(value, dict):
            # Same segments in the same order; a score may differ in its last digit (float sums in another order).
            strip = lambda infos: [{k: v for k, v in info.items() if k != "score"} for info in infos]  # noqa: E731
            assert strip(value["segments_info"]) == strip(narrow[key]["segments_info"]), key
            scores = [[info["score"] for info in answer[key]["segments_info"]] for answer in (wide, narrow)]
            assert scores[0] == pytest.approx(scores[1], abs=1e-5), key
            assert torch.equal(value["segmentation"], narrow[key]["segmentation"]), key
        elif isinstance(value, tuple):
            assert torch.equal(value[0], narrow[key][0]) and value[1] == narrow[key][1], key
        else:
            assert all(torch.equal(a, b) for a, b in zip(value, narrow[key])) if isinstance(value, list) else torch.equal(value, narrow[key]), key
