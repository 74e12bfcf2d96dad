"""The provisional main job: run SeNaTra on a real photo and report its native segment hierarchy.

    python scripts/demo.py [IMAGE] [--preset tiny] [--size 512]

With no IMAGE it takes the first CamVid validation image from ../shared/data when present, else the bundled
fixture tests/fixtures/camvid_0016E5_07959.jpg. The model is randomly initialised (no weights are
downloaded); the report shows stage shapes, the number of native groups at each level of the hierarchy and
the forward time.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import native_seg_hf as ns

ROOT = Path(__file__).resolve().parent.parent
SHARED_CAMVID = ROOT.parent / "shared" / "data" / "camvid" / "val" / "images"
FIXTURE = ROOT / "tests" / "fixtures" / "camvid_0016E5_07959.jpg"


def default_image() -> Path:
    if SHARED_CAMVID.is_dir():
        return sorted(SHARED_CAMVID.glob("*.jpg"))[0]
    print(f"{SHARED_CAMVID} is absent: using the bundled fixture")
    return FIXTURE


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", nargs="?", type=Path)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", type=int, default=512, help="square input side (a multiple of 32)")
    args = parser.parse_args()

    path = args.image or default_image()
    image = Image.open(path).convert("RGB").resize((args.size, args.size), Image.BILINEAR)
    pixels = (np.asarray(image, dtype=np.float32) / 255.0 - 0.5) / 0.5
    pixel_values = torch.from_numpy(pixels).permute(2, 0, 1)[None]

    torch.manual_seed(0)
    model = ns.SeNaTraModel(ns.SeNaTraConfig.from_preset(args.preset)).eval()
    print(f"SeNaTra-{args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, image {path.name}")
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(pixel_values, output_hidden_states=True)
        elapsed = time.perf_counter() - start
        segments = model.native_segments(out.assignments)
    for name, hidden in zip(model.config.stage_names, out.hidden_states):
        print(f"  {name:7s} {tuple(hidden.shape)}")
    for level, segment_map in enumerate(segments, start=1):
        print(f"  level {level}: {segment_map.unique().numel()} native groups on the stride-4 grid")
    print(f"forward: {elapsed:.2f}s on {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
