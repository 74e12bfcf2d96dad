"""SeNaTraForUniversalSegmentation on this machine, in one run:

1. The two ways to make native masks: dot the mask embeddings with final-stage tokens and carry the K logit
   maps to stride 4 through the assignments ("carry logits", what the model does), or carry the C-channel
   token features to stride 4 and dot there ("carry features"). Both are the same linear map, so they agree
   to float rounding; the table shows how closely on real photos and what each costs.
2. Latency at 512x512 with annealing finished (probabilities 0) next to Transformers' EomtForUniversalSegmentation
   (ViT-S, 100 queries, probabilities 0) and Mask2FormerForUniversalSegmentation with a Swin-T backbone,
   alternating the models, with ratios.

    python scripts/benchmark_universal.py [--size 512] [--repeats 3] [--threads 2]
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
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

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    ours = ns.SeNaTraForUniversalSegmentation(ns.SeNaTraConfig(num_labels=150, num_queries=100)).eval()
    ours.attn_mask_probs.zero_()
    compare_mask_routes(ours, real_photos(args.size), args.repeats)

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
    ours_time = np.median(times["SeNaTra-T universal (ours)"])
    print(f"\n{args.size}x{args.size}, {args.threads} threads, batch 1:")
    print(f"{'model':28s} {'params (M)':>10s} {'latency (s)':>11s} {'vs ours':>8s}")
    for name, model in models.items():
        latency = np.median(times[name])
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{name:28s} {params:10.1f} {latency:11.3f} {latency / ours_time:7.2f}x")


if __name__ == "__main__":
    main()
