"""Segment photos with a saved model and write pictures and a JSON of the segments.

    python scripts/segment.py IMAGE... --model FOLDER --out DIR [--threshold 0.5]

FOLDER is a `save_pretrained` folder of a native_seg_hf model (or of Transformers' EoMT) that also holds its image
processor, saved with `SeNaTraImageProcessor.from_model_config(model.config).save_pretrained(FOLDER)`. For each IMAGE,
DIR receives:
  NAME_semantic.png              class overlay with a legend
  NAME_panoptic.png, _instance.png   segment overlays, for query models (SeNaTraForUniversalSegmentation, EoMT)
  NAME_hierarchy.png             SeNaTra's native groups, one panel per level of the hierarchy (SeNaTra models)
  NAME.json                      every segment of each result: label, score, area in pixels, box [x0, y0, x1, y1]
The PNG overlays have the image's size.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor

from native_seg_hf.training.loop import load_trained_model
from native_seg_hf.visualize import hierarchy_picture, segment_masks, segments_overlay, semantic_overlay


def native_segments(model, pixel_values, outputs):
    """The native group maps of a SeNaTra model (None for other models), from the outputs' assignments when they
    carry them, else from a pass of the backbone."""
    if not hasattr(model, "native_segments"):
        return None
    assignments = outputs.get("assignments")
    if assignments is None:
        assignments = model.base_model(pixel_values).assignments
    return model.native_segments(assignments)


def describe(mask: np.ndarray, info: dict, id2label: dict) -> dict:
    rows, cols = mask.nonzero()
    box = [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1] if len(rows) else None
    return {**info, "label": id2label.get(info["label_id"], str(info["label_id"])), "area": int(mask.sum()), "box": box}


def segment_image(path: Path, model, processor, out: Path, threshold: float) -> dict:
    image = Image.open(path).convert("RGB")
    sizes = [(image.height, image.width)]
    id2label = model.config.id2label
    inputs = processor(images=image, return_tensors="pt")
    report = {"image": str(path), "height": image.height, "width": image.width}
    with torch.no_grad():
        outputs = model(**inputs)
        semantic = processor.post_process_semantic_segmentation(outputs, sizes)[0]
        semantic_overlay(image, semantic, id2label).save(out / f"{path.stem}_semantic.png")
        classes = semantic.numpy()
        report["semantic"] = [
            describe(classes == label, {"label_id": int(label)}, id2label) for label in np.unique(classes)
        ]
        if outputs.get("class_queries_logits") is not None:
            for subtask in ("panoptic", "instance"):
                post_process = getattr(processor, f"post_process_{subtask}_segmentation")
                result = post_process(outputs, sizes, threshold=threshold)[0]
                segments_overlay(image, result, id2label).save(out / f"{path.stem}_{subtask}.png")
                report[subtask] = [
                    describe(mask, info, id2label) for mask, info in zip(segment_masks(result), result["segments_info"])
                ]
        groups = native_segments(model, inputs["pixel_values"], outputs)
        if groups is not None:
            levels = processor.post_process_hierarchical_segmentation(groups, sizes)[0]
            hierarchy_picture(image, levels).save(out / f"{path.stem}_hierarchy.png")
            report["native_groups_per_level"] = [int(level.unique().numel()) for level in levels]
    (out / f"{path.stem}.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    parser.add_argument("--model", required=True, type=Path, help="save_pretrained folder with preprocessor_config.json")
    parser.add_argument("--out", required=True, type=Path, help="folder for the PNGs and JSON files")
    parser.add_argument("--threshold", type=float, default=0.5, help="minimum score of panoptic and instance segments")
    args = parser.parse_args(argv)

    processor = AutoImageProcessor.from_pretrained(args.model)
    model = load_trained_model(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in args.images:
        report = segment_image(path, model, processor, args.out, args.threshold)
        counts = ", ".join(f"{key} {len(report[key])}" for key in ("semantic", "panoptic", "instance") if key in report)
        print(f"{path}: {counts} segments -> {args.out}/{path.stem}_*.png, {path.stem}.json")


if __name__ == "__main__":
    main()
