"""Parameters, forward latency and activation memory of SeNaTra backbones next to Transformers' own Swin-T and
ConvNeXt-T, measured in one run and printed as a table with ratios.

    python scripts/benchmark_senatra.py                  # Tiny at 224 and 512, grouping on/off, references
    python scripts/benchmark_senatra.py --sizes 256 512 --preset nano --threads 2

Every measurement runs in a fresh subprocess so that peak memory (ru_maxrss after the forward minus after
building the model) belongs to that model and input size alone.
"""

import argparse
import json
import subprocess
import sys

MEASURE = r"""
import json, resource, sys, time, torch
import native_seg_hf as ns
from transformers import ConvNextConfig, ConvNextModel, SwinConfig, SwinModel
spec = json.loads(sys.argv[1])
torch.manual_seed(0)
torch.set_num_threads(spec["threads"])
if spec["model"] == "senatra":
    model = ns.SeNaTraModel(ns.SeNaTraConfig.from_preset(spec["preset"], grouping_types=spec["grouping"]))
elif spec["model"] == "swin-t":
    model = SwinModel(SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7))
else:
    model = ConvNextModel(ConvNextConfig(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3]))
model.eval()
x = torch.randn(1, 3, spec["size"], spec["size"])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
with torch.inference_mode():
    for i in range(spec["repeats"] + 1):
        start = time.perf_counter()
        model(pixel_values=x)
        if i:  # the first call warms up
            times.append(time.perf_counter() - start)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times.sort()
print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "latency": times[len(times) // 2],
                  "activation_mib": (peak - before) / 1024}))
"""


def measure(spec: dict) -> dict:
    run = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(spec)], capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"{spec}: {run.stderr.strip().splitlines()[-1:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 256, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    rows = {}
    common = dict(preset=args.preset, repeats=args.repeats, threads=args.threads)
    for size in args.sizes:
        for name, grouping in [("grouping", ["local", "local", "dense"]), ("none", ["none", "none", "none"])]:
            rows[(f"senatra-{args.preset} {name}", size)] = measure(dict(common, model="senatra", grouping=grouping, size=size))
        for reference in ("swin-t", "convnext-t"):
            rows[(reference, size)] = measure(dict(common, model=reference, size=size))

    print(f"{'model':28s} {'size':>5s} {'params (M)':>10s} {'latency (s)':>11s} {'act. mem (MiB)':>14s}")
    for (name, size), r in rows.items():
        print(f"{name:28s} {size:5d} {r['params'] / 1e6:10.2f} {r['latency']:11.3f} {r['activation_mib']:14.1f}")

    grouped = f"senatra-{args.preset} grouping"
    print()
    for size in args.sizes:
        g, n = rows[(grouped, size)], rows[(f"senatra-{args.preset} none", size)]
        s, c = rows[("swin-t", size)], rows[("convnext-t", size)]
        print(
            f"{size}px: grouping/none latency x{g['latency'] / n['latency']:.2f}; "
            f"senatra/swin-t x{g['latency'] / s['latency']:.2f}; senatra/convnext-t x{g['latency'] / c['latency']:.2f}"
        )
    if len(args.sizes) > 1:
        small, large = min(args.sizes), max(args.sizes)
        pixels = (large / small) ** 2
        growth = rows[(grouped, large)]["activation_mib"] / max(rows[(grouped, small)]["activation_mib"], 1e-9)
        print(f"activation memory {small}->{large}px: x{growth:.1f} (pixels x{pixels:.1f})")


if __name__ == "__main__":
    main()
