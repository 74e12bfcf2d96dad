"""SeNaTraForUniversalSegmentation on this machine, in one run:

1. The two ways to make native masks: dot the mask embeddings with final-stage tokens and carry the K logit
   maps to stride 4 through the assignments ("carry logits", what the model does), or carry the C-channel
   token features to stride 4 and dot there ("carry features"). Both are the same linear map, so they agree
   to float rounding; the table shows how closely on real photos and what each costs.
2. Latency at 512x512 with annealing finished (probabilities 0) next to Transformers' EomtForUniversalSegmentation
   (ViT-S, 100 queries, probabilities 0) and Mask2FormerForUniversalSegmentation with a Swin-T backbone,
   alternating the models in one process (one call of each per round), with ratios. On a shared CPU the machine's
   load inflates every model's time, and with several threads the more so the more operations a model launches
   (each parallel region waits for all its threads to be scheduled), so the ratios of one run are the comparable
   numbers and the load averages before and after are recorded. The same rounds are then timed on one thread by
   CPU time, which the load barely moves (a second, load-robust ratio).

Writes the latencies, ratios, command, commit, machine, threads and load averages to `--output`
(results/universal_speed.json).

    python scripts/benchmark_universal.py [--size 512] [--repeats 5] [--threads 2] [--skip-mask-routes]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import (
    EomtConfig,
    EomtForUniversalSegmentation,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    SwinConfig,
)

import native_seg_hf as ns
from native_seg_hf.models.grouping import upsample_through

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PHOTOS = ["coco_panoptic_sample/sample_data/input_images", "ade20k_sample/images"]


def real_photos(size: int) -> list[torch.Tensor]:
    paths = [p for folder in PHOTOS for p in sorted((SHARED / folder).glob("*.jpg"))]
    if not paths:
        print(f"{SHARED} is absent: using random images")
        return [torch.randn(1, 3, size, size) for _ in range(3)]
    photos = []
    for path in paths:
        pixels = np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32)
        photos.append(torch.from_numpy(pixels / 127.5 - 1).permute(2, 0, 1)[None])
    return photos


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux), else None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def compare_mask_routes(model, photos, repeats):
    kinds = model.config.grouping_types
    route_times = {"carry logits": [], "carry features": []}
    worst = 0.0
    with torch.inference_mode():
        for x in photos:
            out = model(x)
            tokens = out.last_hidden_state.permute(0, 2, 3, 1)
            embeddings = model.mask_head(model.senatra.layernorm(model.query.weight))

            def carry_logits():
                return model.masks_to_stride4(torch.einsum("kc,bhwc->bkhw", embeddings, tokens), out.assignments)

            def carry_features():
                return torch.einsum("kc,bhwc->bkhw", embeddings, upsample_through(tokens, out.assignments, kinds))

            a, b = carry_logits(), carry_features()
            worst = max(worst, ((a - b).abs().max() / a.abs().max()).item())
            route_times["carry logits"].append(timed(carry_logits, repeats))
            route_times["carry features"].append(timed(carry_features, repeats))
    print(f"native masks on {len(photos)} photos: largest relative difference between routes {worst:.1e}")
    for name, values in route_times.items():
        print(f"  {name:15s} {np.median(values) * 1000:8.1f} ms")
    return {"photos": len(photos), "largest_relative_difference": worst,
            "milliseconds": {name: round(float(np.median(values)) * 1000, 1) for name, values in route_times.items()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5, help="rounds of one call per model (the median is reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-mask-routes", action="store_true", help="time only the models (part 2)")
    parser.add_argument("--output", default=str(ROOT / "results" / "universal_speed.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    # the code that runs: the commit at the start (the tree may move on during the run)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    load_before = os.getloadavg()

    ours = ns.SeNaTraForUniversalSegmentation(ns.SeNaTraConfig(num_labels=150, num_queries=100)).eval()
    ours.attn_mask_probs.zero_()
    mask_routes = None if args.skip_mask_routes else compare_mask_routes(ours, real_photos(args.size), args.repeats)

    swin = SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], out_features=["stage1", "stage2", "stage3", "stage4"])
    models = {
        "SeNaTra-T universal (ours)": ours,
        "EoMT ViT-S": EomtForUniversalSegmentation(
            EomtConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=args.size, num_queries=100, num_labels=150)
        ).eval(),
        "Mask2Former Swin-T": Mask2FormerForUniversalSegmentation(
            Mask2FormerConfig(backbone_config=swin, num_labels=150, num_queries=100)
        ).eval(),
    }
    models["EoMT ViT-S"].attn_mask_probs.zero_()
    x = torch.randn(1, 3, args.size, args.size)
    times = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(pixel_values=x)
        for _ in range(args.repeats):
            for name, model in models.items():
                times[name].append(timed(lambda: model(pixel_values=x), 1))
        # The same rounds on one thread, timed by the process's CPU time: a load-robust second figure (on a busy
        # machine a multi-threaded model waits at every parallel region for its threads to be scheduled, so
        # wall-clock ratios then count operations more than work; CPU time on one thread counts the work).
        torch.set_num_threads(1)
        cpu_times = {name: [] for name in models}
        for _ in range(args.repeats):
            for name, model in models.items():
                start = time.process_time()
                model(pixel_values=x)
                cpu_times[name].append(time.process_time() - start)
        torch.set_num_threads(args.threads)
    load_after = os.getloadavg()
    ours_time = np.median(times["SeNaTra-T universal (ours)"])
    ours_cpu = np.median(cpu_times["SeNaTra-T universal (ours)"])
    print(f"\n{args.size}x{args.size}, {args.threads} threads, batch 1 (load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after):")
    print(f"{'model':28s} {'params (M)':>10s} {'latency (s)':>11s} {'vs ours':>8s} {'1-thread CPU (s)':>17s} {'vs ours':>8s}")
    rows = []
    for name, model in models.items():
        latency, cpu = float(np.median(times[name])), float(np.median(cpu_times[name]))
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{name:28s} {params:10.1f} {latency:11.3f} {latency / ours_time:7.2f}x {cpu:17.3f} {cpu / ours_cpu:7.2f}x")
        rows.append({"model": name, "params_millions": round(params, 1), "median_seconds": round(latency, 4),
                     "seconds": [round(t, 4) for t in times[name]], "over_ours": round(latency / ours_time, 2),
                     "median_cpu_seconds_1_thread": round(cpu, 4), "cpu_seconds_1_thread": [round(t, 4) for t in cpu_times[name]],
                     "cpu_over_ours": round(cpu / ours_cpu, 2)})
    ratios = {"mask2former_over_ours": rows[2]["over_ours"], "eomt_over_ours": rows[1]["over_ours"],
              "mask2former_over_ours_cpu_1_thread": rows[2]["cpu_over_ours"],
              "eomt_over_ours_cpu_1_thread": rows[1]["cpu_over_ours"]}
    print(f"{args.threads} threads, wall clock: Mask2Former Swin-T / ours x{ratios['mask2former_over_ours']:.2f}, EoMT ViT-S / "
          f"ours x{ratios['eomt_over_ours']:.2f};  1 thread, CPU time: x{ratios['mask2former_over_ours_cpu_1_thread']:.2f}, "
          f"x{ratios['eomt_over_ours_cpu_1_thread']:.2f}")

    report = {
        "benchmark": "universal_speed",
        "command": " ".join(["python", "scripts/benchmark_universal.py", *sys.argv[1:]]),
        "commit": commit,
        "size": f"{args.size}x{args.size}",
        "batch": 1,
        "threads": args.threads,
        "repeats": args.repeats,
        "setting": "random weights (torch.manual_seed(0)), eval, inference_mode, annealing finished "
                   "(attn_mask_probs 0) for ours and EoMT; models alternate, one call each per round, after a warm-up; "
                   "seconds: wall clock at `threads`; cpu_seconds_1_thread: process CPU time of the same rounds on one "
                   "thread",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "machine": {"processor": platform.processor() or platform.machine(), "cpu_model": cpu_model(),
                    "cpu_count": os.cpu_count()},
        "load_average_before": load_before,
        "load_average_after": load_after,
        "note": "a shared CPU: other jobs ran during the benchmark (load averages above), so absolute seconds are "
                "inflated; the models alternate, so their ratios are the comparable numbers. Under load, wall-clock "
                "time with several threads grows with the number of parallel operations a model launches (each waits "
                "for all its threads to be scheduled), not only with its work; the one-thread CPU time does not",
        "models": rows,
        "ratios": ratios,
        "mask_routes": mask_routes,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
