"""Post-processing of a large photo in bounded memory: a real photo resized to 4000x3000 through
`pipeline("image-segmentation")` with a Nano universal model (100 queries, annealing finished), one subtask per
fresh process so that each peak resident memory (the process's maximum resident set) is its own, plus the
processor's instance and panoptic post-processing at threshold 0 (every candidate kept and painted).

The processor's default resize bounds what the model sees (short side 512, long side at most 2048: 4000x3000 becomes
512x704), so the model's time does not grow with the photo. Each case runs once per torch thread count in
`--threads`, alternately (case A at 1 thread, case A at 2, case B at 1, ...), so that the machine's load hits both:
on a CPU whose cores other jobs already hold, a second intra-op thread makes each of the model's small operations
wait for a core at its barrier, and the model's time multiplies (the load averages are recorded per case).

    python scripts/benchmark_post_processing.py [--width 4000 --height 3000] [--num_queries 100] [--threads 1 2]

Writes results/post_processing.json (`cases`: seconds, peak GB and segments per case and thread count, the
command, commit and machine).
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CASES = ["pipeline instance", "pipeline panoptic", "pipeline semantic", "instance threshold 0", "panoptic threshold 0"]


def photo(width: int, height: int):
    from PIL import Image
    import numpy as np

    paths = sorted((SHARED / "ade20k_sample" / "images").glob("*.jpg")) or sorted((ROOT / "tests" / "fixtures").glob("*.jpg"))
    if not paths:
        print("no photo found: using random pixels")
        return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    return Image.open(paths[0]).convert("RGB").resize((width, height), Image.BILINEAR)


def run_case(case: str, model_dir: str, width: int, height: int) -> dict:
    """One case in this (fresh) process: its time and the peak resident memory it reached."""
    import torch
    from transformers import pipeline

    import native_seg_hf  # noqa: F401 (registers the model types)

    segmenter = pipeline("image-segmentation", model=model_dir)
    image = photo(width, height)
    # The pipeline's own three steps (what segmenter(image, subtask=...) runs), timed one by one: on a shared CPU the
    # model's time varies with the load, and the post-processing's is what this benchmark is about.
    start = time.perf_counter()
    inputs = segmenter.preprocess(image)
    prepared = time.perf_counter()
    outputs = segmenter.forward(inputs)
    predicted = time.perf_counter()
    if case.startswith("pipeline"):
        segments = len(segmenter.postprocess(outputs, subtask=case.split()[1]))
    else:
        post_process = getattr(segmenter.image_processor, f"post_process_{case.split()[0]}_segmentation")
        options = {"return_binary_masks": False} if case.startswith("instance") else {}
        [result] = post_process(outputs, [(height, width)], threshold=0.0, **options)
        segments = len(result["segments_info"])
    finished = time.perf_counter()
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports kB
    seconds = {"total": finished - start, "preprocess": prepared - start, "model": predicted - prepared,
               "postprocess": finished - predicted}
    return {"case": case, "model_input": list(inputs["pixel_values"].shape[-2:]), "threads": torch.get_num_threads(),
            "seconds": {k: round(v, 2) for k, v in seconds.items()}, "peak_gb": round(peak_gb, 3),
            "segments": segments}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--num_queries", type=int, default=100)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts, each case at each")
    parser.add_argument("--output", default=str(ROOT / "results" / "post_processing.json"))
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    if args.case:
        torch.set_num_threads(args.threads[0])
        print(json.dumps(run_case(args.case, args.model, args.width, args.height)))
        return

    import native_seg_hf as ns

    # the code that runs: the commit at the start (the tree may move on during the run)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    results = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        config = ns.SeNaTraConfig.from_preset("nano", num_labels=20, num_queries=args.num_queries)
        model = ns.SeNaTraForUniversalSegmentation(config).eval()
        model.attn_mask_probs.zero_()
        model.save_pretrained(folder)
        ns.SeNaTraImageProcessor.from_model_config(config).save_pretrained(folder)
        for case in CASES:
            for threads in args.threads:
                command = [sys.executable, __file__, "--case", case, "--model", folder, "--width", str(args.width),
                           "--height", str(args.height), "--threads", str(threads)]
                load = os.getloadavg()
                finished = subprocess.run(command, capture_output=True, text=True, check=True)
                results.append({**json.loads(finished.stdout.strip().splitlines()[-1]), "load_average_before": load})
                seconds = results[-1]["seconds"]
                print(f"{case:22s} {threads} thread(s) {seconds['total']:6.2f} s (post-processing "
                      f"{seconds['postprocess']:5.2f} s, model {seconds['model']:5.2f} s)  "
                      f"{results[-1]['peak_gb']:5.2f} GB peak  {results[-1]['segments']} segments (load {load[0]:.1f})",
                      flush=True)

    report = {
        "benchmark": "post_processing",
        "photo": f"{args.width}x{args.height}",
        "model": f"SeNaTra-Nano universal, {args.num_queries} queries, random init, annealing finished",
        "threads": args.threads,
        "cases": results,
        "command": " ".join(["python", "scripts/benchmark_post_processing.py", *sys.argv[1:]]),
        "commit": commit,
        "machine": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "note": "a shared CPU: other jobs ran during the benchmark (load averages per case), so absolute seconds are "
                "inflated; compare a case's thread counts, which ran one after the other",
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
