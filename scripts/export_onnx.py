"""Export a saved segmentation model to ONNX, optionally checking the graph against PyTorch with ONNX Runtime.

    python scripts/export_onnx.py --model FOLDER --output FILE.onnx [--height 512 --width 512] [--static] [--check]

FOLDER is a `save_pretrained` folder of SeNaTraForSemanticSegmentation, SeNaTraForUniversalSegmentation (mask
annealing finished) or SegmenterForSemanticSegmentation. The graph takes `pixel_values` (B, 3, H, W), prepared by
the model's image processor, with H and W dynamic (multiples of the model's input divisor) unless --static, and
returns `logits` (semantic models) or `class_queries_logits` and `masks_queries_logits` (universal models), ready for
the processor's post-processing. --check runs ONNX Runtime and PyTorch at the export size and at a second size and
fails if any output differs by 1e-4 or more, relative to its largest value. Needs the `onnx` extra.
"""

import argparse
import sys

import torch

from native_seg_hf.onnx_export import compare_with_pytorch, export_onnx, input_size_divisor, onnxruntime_session
from native_seg_hf.training.loop import load_trained_model

TOLERANCE = 1e-4


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="save_pretrained folder")
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument("--height", type=int, default=512, help="height of the example input traced")
    parser.add_argument("--width", type=int, default=512, help="width of the example input traced")
    parser.add_argument("--batch_size", type=int, default=1, help="the graph's (fixed) batch size")
    parser.add_argument("--static", action="store_true", help="fix height and width to the example's")
    parser.add_argument("--optimize", action="store_true",
                        help="also run onnxscript's graph optimiser (slow on SeNaTra; ONNX Runtime optimises at load)")
    parser.add_argument("--check", action="store_true", help="compare ONNX Runtime with PyTorch at two sizes")
    args = parser.parse_args()

    model = load_trained_model(args.model)
    size = (args.height, args.width)
    path = export_onnx(model, args.output, size, args.batch_size, dynamic=not args.static,
                       optimize=args.optimize)
    print(f"wrote {path} (outputs {', '.join(o.name for o in onnxruntime_session(path).get_outputs())})")
    if not args.check:
        return
    session = onnxruntime_session(path)
    # One divisor more rows and fewer columns: for SeNaTra an odd multiple of 32 puts grids that are not whole numbers
    # of attention tiles in the deeper stages.
    step = input_size_divisor(model) if input_size_divisor(model) > 1 else 40
    sizes = [size] if args.static else [size, (size[0] + step, size[1] - step if size[1] > step else size[1] + step)]
    worst = 0.0
    for height, width in sizes:
        differences = compare_with_pytorch(model, session, torch.randn(args.batch_size, 3, height, width))
        worst = max(worst, *differences.values())
        print(f"{height}x{width}: " + ", ".join(f"{name} relative difference {value:.1e}" for name, value in differences.items()))
    if worst >= TOLERANCE:
        sys.exit(f"ONNX Runtime differs from PyTorch by {worst:.1e} (>= {TOLERANCE})")


if __name__ == "__main__":
    main()
