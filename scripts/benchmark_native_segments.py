"""Native segments against a uniform grid and SLIC at the same segment count, on BSDS500 validation.

    python scripts/benchmark_native_segments.py MODEL_DIR --out results/native_segments/NAME.json [--images 100]

For each grouping level of a trained SeNaTra (the hard argmax of the composed assignments, `native_segments`),
every image's segment count is matched by (a) the uniform grid whose rows x cols is closest to it (what strided
downsampling gives) and (b) SLIC (scikit-image, compactness 10) asked for that many segments. All three are scored
with the package's grouping metrics (achievable segmentation accuracy, boundary recall at 2 px, undersegmentation
error; averaged over each image's human segmentations) at the image's original size. BSDS500 is read from
../shared/data/bsds500 (non-commercial research and education).
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.io import loadmat
from skimage.segmentation import slic

from native_seg_hf.metrics import GroupingMetrics
from native_seg_hf.models.modeling_senatra import SeNaTraForSemanticSegmentation
from native_seg_hf.training.learning import eval_inputs, git_commit, hardware, portable_path

ROOT = Path(__file__).resolve().parent.parent
BSDS = ROOT.parent / "shared" / "data" / "bsds500"


def human_segmentations(mat: Path) -> list[np.ndarray]:
    truths = loadmat(mat)["groundTruth"][0]
    return [t["Segmentation"][0, 0].astype(np.int64) for t in truths]


def uniform_grid(height: int, width: int, count: int) -> np.ndarray:
    """A grid of near-square cells (rows x cols, cells as equal as integer division allows) with about `count`
    cells: rows within 20% of the square-cell ideal sqrt(count * height / width)."""
    ideal = math.sqrt(count * height / width)
    candidates = range(max(1, math.floor(ideal / 1.2)), min(height, math.ceil(ideal * 1.2)) + 1)
    error = lambda r: abs(r * max(1, round(count / r)) - count)  # noqa: E731
    # the squarest cells among counts within 5% of the target, else the closest count
    rows = min(candidates, key=lambda r: (error(r) > 0.05 * count, abs(r - ideal) if error(r) <= 0.05 * count else error(r)))
    cols = min(width, max(1, round(count / rows)))
    ys = np.arange(height) * rows // height
    xs = np.arange(width) * cols // width
    return ys[:, None] * cols + xs[None, :]


@torch.no_grad()
def native_levels(model, image: Image.Image, short_side: int) -> list[np.ndarray]:
    """Each level's hard segment map at the image's size (nearest resampling of the stride-4 maps)."""
    pixels, (height, width) = eval_inputs(image, short_side)
    stride = model.config.patch_size
    levels = model.senatra.native_segments(model.senatra(pixels).assignments)
    maps = []
    for level in levels:
        level = level[:, : -(-height // stride), : -(-width // stride)].float()[None]
        maps.append(F.interpolate(level, size=(image.height, image.width), mode="nearest")[0, 0].long().numpy())
    return maps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--short_side", type=int, default=320, help="the model sees images resized to this")
    args = parser.parse_args()
    if not (BSDS / "val").is_dir():
        sys.exit(f"{BSDS / 'val'} is absent: this benchmark needs BSDS500 validation")
    model = SeNaTraForSemanticSegmentation.from_pretrained(args.model).eval()
    images = sorted((BSDS / "val" / "images").glob("*.jpg"))[: args.images]
    metrics = {}
    for path in images:
        image = Image.open(path).convert("RGB")
        truths = human_segmentations(BSDS / "val" / "groundTruth" / f"{path.stem}.mat")
        for level, segments in enumerate(native_levels(model, image, args.short_side), start=1):
            count = len(np.unique(segments))
            candidates = {"native": segments, "uniform_grid": uniform_grid(image.height, image.width, count),
                          "slic": slic(np.asarray(image), n_segments=count, compactness=10, start_label=0)}
            for name, prediction in candidates.items():
                metrics.setdefault(level, {}).setdefault(name, GroupingMetrics()).update([prediction], [truths])
    report = {"model": portable_path(args.model), "images": len(images), "short_side": args.short_side,
              "dataset": "BSDS500 validation (non-commercial research and education)",
              "command": "python scripts/benchmark_native_segments.py " + " ".join(sys.argv[1:]),
              "commit": git_commit(), "hardware": hardware(), "levels": {}}
    for level, by_method in metrics.items():
        report["levels"][str(level)] = {name: metric.compute() for name, metric in by_method.items()}
        for name, scores in report["levels"][str(level)].items():
            print(f"level {level} {name:12s} segments {scores['mean_num_segments']:6.1f}  ASA "
                  f"{scores['achievable_segmentation_accuracy']:.3f}  BR {scores['boundary_recall']:.3f}  UE "
                  f"{scores['undersegmentation_error']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
