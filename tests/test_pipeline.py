"""pipeline("image-segmentation") by path on real photos, for every model and subtask it supports, with small random
models: masks of the image's size and labels from id2label. Also through remote code, without this package."""

import glob
import logging
import os
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Dinov2Config, EomtConfig, EomtForUniversalSegmentation, pipeline
from transformers.utils import logging as transformers_logging

import native_seg_hf as ns

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
# Real photos from ../shared/data where it exists, and always the CamVid photo bundled with the tests, so that these
# tests run (and can fail) everywhere.
FIXTURE_PHOTO = os.path.join(os.path.dirname(__file__), "fixtures", "camvid_0016E5_07959.jpg")
PHOTOS = sorted(glob.glob(os.path.join(SHARED_DATA, "ade20k_sample", "images", "*.jpg")))[:1] + sorted(
    glob.glob(os.path.join(SHARED_DATA, "coco_panoptic_sample", "sample_data", "input_images", "*.jpg"))
)[:1] + [FIXTURE_PHOTO]

ID2LABEL = {0: "sky", 1: "tree", 2: "road"}
LABELS = dict(num_labels=3, id2label=ID2LABEL, label2id={name: i for i, name in ID2LABEL.items()})
TINY = dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_heads=[1, 2, 3, 4], attention_kernel_size=3)
SIZE = {"shortest_edge": 96}  # small inputs keep the random models fast


def save(model, folder, **processor_settings) -> str:
    """A model folder as users make it: the model and its processor side by side."""
    torch.manual_seed(0)
    model.save_pretrained(folder)
    ns.SeNaTraImageProcessor.from_model_config(model.config, **{"size": SIZE, **processor_settings}).save_pretrained(folder)
    return str(folder)


def photos():
    return [Image.open(path) for path in PHOTOS]


def check(results, image, scored: bool, disjoint: bool = True):
    """Masks of the image's size, labels from id2label, scores where the subtask has them; semantic and panoptic
    masks never overlap."""
    assert isinstance(results, list) and results
    covered = np.zeros((image.height, image.width), dtype=np.int64)
    for result in results:
        assert result["mask"].size == image.size and result["mask"].mode == "L"
        assert result["label"] in ID2LABEL.values()
        assert isinstance(result["score"], float) if scored else result["score"] is None
        covered += np.asarray(result["mask"]) // 255
    if disjoint:
        assert covered.max() <= 1


def labelled_pixels(results) -> dict:
    """{label: boolean mask} of pipeline results."""
    return {r["label"]: np.asarray(r["mask"]) > 0 for r in results}


def check_default_call_is_semantic(segmenter, image):
    """The pipeline's default call (no subtask: it asks for panoptic at threshold 0.9) on a semantic model answers
    like subtask="semantic": the same classes on the same pixels, every pixel labelled."""
    default, semantic = labelled_pixels(segmenter(image)), labelled_pixels(segmenter(image, subtask="semantic"))
    assert sorted(default) == sorted(semantic)
    for label, mask in semantic.items():
        assert (default[label] == mask).all(), label
    assert sum(m.astype(np.int64) for m in default.values()).min() == 1  # every pixel, once


class PipelineLogs:
    """Records what transformers' pipeline module logs (its logger does not propagate to pytest's caplog)."""

    def __enter__(self):
        self.records = []
        self.logger = transformers_logging.get_logger("transformers.pipelines.base")
        self.handler = logging.Handler()
        self.handler.emit = self.records.append
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)

    def messages(self) -> str:
        return "\n".join(record.getMessage() for record in self.records)


def test_senatra_semantic_model(tmp_path):
    folder = save(ns.SeNaTraForSemanticSegmentation(ns.SeNaTraConfig(**TINY, **LABELS)), tmp_path)
    with PipelineLogs() as logs:
        segmenter = pipeline("image-segmentation", model=folder)
    assert "not supported" not in logs.messages()
    assert type(segmenter.model) is ns.SeNaTraForSemanticSegmentation
    assert type(segmenter.image_processor) is ns.SeNaTraImageProcessor
    for image in photos():
        semantic = segmenter(image, subtask="semantic")
        check(semantic, image, scored=False)
        covered = sum(np.asarray(r["mask"], dtype=np.int64) // 255 for r in semantic)
        assert (covered == 1).all()  # every pixel has a class
        check_default_call_is_semantic(segmenter, image)
        # Panoptic on a semantic model: one scored segment per class whatever the threshold (nothing to filter).
        check(segmenter(image, subtask="panoptic", threshold=0.999), image, scored=True)
        assert sorted(labelled_pixels(segmenter(image, subtask="panoptic", threshold=0.999))) == sorted(
            labelled_pixels(semantic)
        )
        with pytest.raises(ValueError, match="needs query predictions"):
            segmenter(image, subtask="instance")


def test_segmenter_model(tmp_path):
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=8, image_size=32)
    model = ns.SegmenterForSemanticSegmentation(ns.SegmenterConfig(backbone_config=backbone, **LABELS))
    with PipelineLogs() as logs:
        segmenter = pipeline("image-segmentation", model=save(model, tmp_path))
    assert "not supported" not in logs.messages()
    assert type(segmenter.model) is ns.SegmenterForSemanticSegmentation
    for image in photos():
        check(segmenter(image, subtask="semantic"), image, scored=False)
        check_default_call_is_semantic(segmenter, image)


def universal_subtasks(segmenter):
    for image in photos():
        check(segmenter(image, subtask="panoptic", threshold=0.0), image, scored=True)
        check(segmenter(image, subtask="instance", threshold=0.0), image, scored=True, disjoint=False)
        check(segmenter(image, subtask="semantic"), image, scored=False)
        # The default call of a query model is panoptic post-processing with the pipeline's default thresholds.
        for threshold in ({}, {"threshold": 0.0}):
            default, panoptic = segmenter(image, **threshold), segmenter(image, subtask="panoptic", **threshold)
            assert [(r["label"], r["score"]) for r in default] == [(r["label"], r["score"]) for r in panoptic]
            assert all((np.asarray(a["mask"]) == np.asarray(b["mask"])).all() for a, b in zip(default, panoptic))


def test_senatra_universal_model(tmp_path):
    model = ns.SeNaTraForUniversalSegmentation(ns.SeNaTraConfig(**TINY, **LABELS, num_queries=8, num_blocks=1))
    with PipelineLogs() as logs:
        segmenter = pipeline("image-segmentation", model=save(model, tmp_path))
    assert "not supported" not in logs.messages()
    assert type(segmenter.model) is ns.SeNaTraForUniversalSegmentation
    universal_subtasks(segmenter)


def test_transformers_eomt_with_our_processor(tmp_path):
    """EoMT takes one fixed input size: the processor fits the longer side and pads to the square."""
    config = EomtConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16, num_queries=8,
        num_blocks=1, num_register_tokens=1, **LABELS,
    )
    model = EomtForUniversalSegmentation(config)
    model.attn_mask_probs.zero_()  # inference without masked attention, as after annealing
    folder = save(model, tmp_path, size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}, size_divisor=16)
    segmenter = pipeline("image-segmentation", model=folder)
    assert type(segmenter.model) is EomtForUniversalSegmentation
    universal_subtasks(segmenter)


REMOTE_PIPELINE = textwrap.dedent(
    """
    import sys
    from PIL import Image
    from transformers import pipeline
    folder, photo = sys.argv[1:]
    segmenter = pipeline("image-segmentation", model=folder, trust_remote_code=True)
    image = Image.open(photo)
    results = segmenter(image, subtask="semantic")
    assert type(segmenter.image_processor).__name__ == "SeNaTraImageProcessor", type(segmenter.image_processor)
    assert results and all(r["mask"].size == image.size for r in results), results
    print(type(segmenter.model).__name__, sorted(r["label"] for r in results))
    """
)


def test_pipeline_from_remote_code_without_the_package(tmp_path, run_without_package):
    folder = save(ns.SeNaTraForSemanticSegmentation(ns.SeNaTraConfig(**TINY, **LABELS)), tmp_path)
    assert os.path.isfile(os.path.join(folder, "image_processing_senatra.py"))
    run = run_without_package(REMOTE_PIPELINE, folder, PHOTOS[0])
    assert run.stdout.split()[0] == "SeNaTraForSemanticSegmentation"
    assert "not supported" not in run.stderr  # the remote modeling code names its classes for the pipeline too
