"""ONNX Runtime against PyTorch eager on this CPU, in one run: SeNaTra semantic, SeNaTra universal (annealing
finished) and Segmenter (mask transformer on a ViT-S/14 DINOv2 backbone), random weights, each exported with
`export_onnx` (dynamic height and width, what scripts/export_onnx.py writes), then timed alternately at the
benchmark size with the same number of threads, batch 1. Reports the export time, the largest relative difference
of the outputs at two sizes and the latencies with their ratio.

    python scripts/benchmark_onnx.py [--size 512] [--preset nano] [--repeats 5] [--threads 2]

Writes results/onnx.json.
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Dinov2Config

import native_seg_hf as ns
from native_seg_hf.onnx_export import compare_with_pytorch, export_onnx, onnxruntime_session

ROOT = Path(__file__).resolve().parents[1]


def models(preset: str) -> dict:
    torch.manual_seed(0)
    universal = ns.SeNaTraForUniversalSegmentation(ns.SeNaTraConfig.from_preset(preset, num_labels=150, num_queries=100))
    universal.attn_mask_probs.zero_()
    dinov2_small = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, image_size=518)
    return {
        f"SeNaTra-{preset} semantic": ns.SeNaTraForSemanticSegmentation(ns.SeNaTraConfig.from_preset(preset, num_labels=150)),
        f"SeNaTra-{preset} universal (100 queries)": universal,
        "Segmenter mask transformer, DINOv2 ViT-S/14": ns.SegmenterForSemanticSegmentation(
            ns.SegmenterConfig(backbone_config=dinov2_small, decoder_type="mask_transformer", num_labels=150)
        ),
    }


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--preset", default="nano", help="SeNaTra size (nano, mini, tiny, ...)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(ROOT / "results" / "onnx.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, model in models(args.preset).items():
            model.eval()
            start = time.perf_counter()
            try:
                path = export_onnx(model, Path(folder) / "model.onnx", (args.size, args.size))
            except Exception as error:  # reported in the table, and the other models still run
                rows.append({"model": name, "error": f"{type(error).__name__}: {str(error)[:300]}"})
                print(f"{name}: export failed: {rows[-1]['error']}", flush=True)
                continue
            export_seconds = time.perf_counter() - start
            session = onnxruntime_session(path, threads=args.threads)
            other = args.size + 64  # a size the graph was not traced at
            difference = max(
                max(compare_with_pytorch(model, session, torch.randn(1, 3, *size)).values())
                for size in ((args.size, args.size), (other, args.size - 64))
            )
            x = torch.randn(1, 3, args.size, args.size)
            feed = {session.get_inputs()[0].name: x.numpy()}
            eager, runtime = [], []
            with torch.inference_mode():
                model(pixel_values=x), session.run(None, feed)  # warm-up
                for _ in range(args.repeats):  # alternating, so both see the same machine load
                    eager.append(median_seconds(lambda: model(pixel_values=x), 1))
                    runtime.append(median_seconds(lambda: session.run(None, feed), 1))
            row = {
                "model": name,
                "export_seconds": round(export_seconds, 1),
                "max_relative_difference": float(f"{difference:.2e}"),
                "pytorch_eager_seconds": round(float(np.median(eager)), 4),
                "onnxruntime_seconds": round(float(np.median(runtime)), 4),
            }
            row["eager_over_onnxruntime"] = round(row["pytorch_eager_seconds"] / row["onnxruntime_seconds"], 2)
            rows.append(row)
            print(f"{name:48s} export {row['export_seconds']:6.1f} s  diff {difference:.1e}  eager "
                  f"{row['pytorch_eager_seconds']:.3f} s  ONNX Runtime {row['onnxruntime_seconds']:.3f} s  "
                  f"(x{row['eager_over_onnxruntime']:.2f})", flush=True)

    import onnxruntime

    report = {
        "benchmark": "onnx",
        "size": f"{args.size}x{args.size}",
        "batch": 1,
        "threads": args.threads,
        "repeats": args.repeats,
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "machine": platform.processor() or platform.machine(),
        "models": rows,
        "command": " ".join(["python", "scripts/benchmark_onnx.py", *sys.argv[1:]]),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
