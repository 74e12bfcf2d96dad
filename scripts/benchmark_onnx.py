"""ONNX Runtime against PyTorch eager on this CPU, in one run: SeNaTra semantic, SeNaTra universal (annealing
finished) and Segmenter (mask transformer on a ViT-S/14 DINOv2 backbone), random weights, each exported once with
`export_onnx` (dynamic height and width, what scripts/export_onnx.py writes) and then run at two input sizes (the
traced one and one it was not traced at), batch 1, with the same number of threads. Per model and size it records
the largest absolute difference of every output from PyTorch's (and that difference relative to the output's
largest value), and the latencies of eager and ONNX Runtime, timed alternately (eager, runtime, eager, ...) so
that a change of the machine's load hits both; their ratio is the number to read on a shared machine.

    python scripts/benchmark_onnx.py [--size 512] [--preset nano] [--repeats 5] [--threads 1] [--optimize]

--optimize also runs onnxscript's graph optimiser at export (off by default, as in `export_onnx` and
scripts/export_onnx.py): on this CPU it took over 20 minutes for the Nano semantic graph. ONNX Runtime optimises
the graph when it loads it either way.

Writes results/onnx.json with the command, commit, machine and load averages.
"""

import argparse
import json
import os
import platform
import subprocess
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


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux), else None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


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


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def differences(model, session, pixel_values: torch.Tensor) -> tuple[dict, dict]:
    """Per output: the largest absolute difference of ONNX Runtime's from PyTorch's, and the same relative to the
    largest absolute value of PyTorch's (`compare_with_pytorch`)."""
    relative = compare_with_pytorch(model, session, pixel_values)
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values)
    scale = {name: max(float(outputs[name].abs().max()), 1e-12) for name in relative}
    return {name: value * scale[name] for name, value in relative.items()}, relative


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--preset", default="nano", help="SeNaTra size (nano, mini, tiny, ...)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--optimize", action="store_true", help="run onnxscript's graph optimiser at export")
    parser.add_argument("--output", default=str(ROOT / "results" / "onnx.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # the code that runs: the commit at the start (the tree may move on during the run)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    # The traced size, and one divisor step more rows and fewer columns (a size the graph was not traced at).
    sizes = [(args.size, args.size), (args.size + 64, args.size - 64)]
    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        for name, model in models(args.preset).items():
            model.eval()
            start = time.perf_counter()
            try:
                path = export_onnx(model, Path(folder) / "model.onnx", sizes[0], optimize=args.optimize)
            except Exception as error:  # reported in the table, and the other models still run
                rows.append({"model": name, "error": f"{type(error).__name__}: {str(error)[:300]}"})
                print(f"{name}: export failed: {rows[-1]['error']}", flush=True)
                continue
            row = {"model": name, "export_seconds": round(time.perf_counter() - start, 1), "sizes": []}
            session = onnxruntime_session(path, threads=args.threads)
            for height, width in sizes:
                torch.manual_seed(1)
                x = torch.randn(1, 3, height, width)
                try:
                    absolute, relative = differences(model, session, x)
                except Exception as error:  # e.g. a graph that does not take this size: recorded, the rest runs
                    row["sizes"].append({"size": f"{height}x{width}", "error": f"{type(error).__name__}: {str(error)[:300]}"})
                    print(f"{name}: {height}x{width} failed: {row['sizes'][-1]['error']}", flush=True)
                    continue
                feed = {session.get_inputs()[0].name: x.numpy()}
                eager, runtime = [], []
                with torch.inference_mode():
                    model(pixel_values=x), session.run(None, feed)  # warm-up
                    for _ in range(args.repeats):  # alternating, so both see the same machine load
                        eager.append(seconds(lambda: model(pixel_values=x)))
                        runtime.append(seconds(lambda: session.run(None, feed)))
                entry = {
                    "size": f"{height}x{width}",
                    "max_abs_difference": {key: float(f"{value:.3e}") for key, value in absolute.items()},
                    "max_relative_difference": {key: float(f"{value:.3e}") for key, value in relative.items()},
                    "pytorch_eager_seconds": round(float(np.median(eager)), 4),
                    "onnxruntime_seconds": round(float(np.median(runtime)), 4),
                    "eager_over_onnxruntime_per_repeat": [round(e / r, 3) for e, r in zip(eager, runtime)],
                    "load_average": os.getloadavg(),
                }
                entry["eager_over_onnxruntime"] = round(entry["pytorch_eager_seconds"] / entry["onnxruntime_seconds"], 2)
                row["sizes"].append(entry)
                print(f"{name:44s} {height}x{width}  max abs diff {max(absolute.values()):.1e}  eager "
                      f"{entry['pytorch_eager_seconds']:.3f} s  ONNX Runtime {entry['onnxruntime_seconds']:.3f} s  "
                      f"(x{entry['eager_over_onnxruntime']:.2f})", flush=True)
            rows.append(row)

    import onnxruntime

    report = {
        "benchmark": "onnx",
        "command": " ".join(["python", "scripts/benchmark_onnx.py", *sys.argv[1:]]),
        "commit": commit,
        "sizes": [f"{height}x{width}" for height, width in sizes],
        "batch": 1,
        "threads": args.threads,
        "repeats": args.repeats,
        "onnxscript_optimizer": args.optimize,
        "weights": "random (torch.manual_seed(0)); latency and agreement do not depend on training",
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "machine": {"processor": platform.processor() or platform.machine(), "cpu_model": cpu_model(),
                    "cpu_count": os.cpu_count()},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "note": "a shared CPU: other jobs ran during the benchmark (load averages above), so absolute seconds are "
                "inflated; eager and ONNX Runtime alternate, so their ratio is the comparable number",
        "models": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
