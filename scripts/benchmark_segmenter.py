"""Parameters and CPU forward latency of Segmenter (linear and mask-transformer decoders) on a ViT-S/16-sized Dinov2
encoder, next to SeNaTraForSemanticSegmentation Tiny, measured in one run and printed with ratios.

    python scripts/benchmark_segmenter.py                        # 512x512, 150 classes (ADE20K), 2 threads
    python scripts/benchmark_segmenter.py --size 640 --repeats 7

All models are randomly initialised (latency does not depend on the weights). The models are timed in alternating
rounds, so that a change in the machine's load during the run affects all of them alike; the median is reported.
"""

import argparse
import time

import torch
from transformers import Dinov2Config

from native_seg_hf import (
    SegmenterConfig,
    SegmenterForSemanticSegmentation,
    SeNaTraConfig,
    SeNaTraForSemanticSegmentation,
)

# The paper's ViT-S/16: width 384, 12 layers, 6 heads, MLP 4x, patch 16.
VIT_S16 = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=16, image_size=512)


def build_models(num_labels: int) -> dict:
    encoder = Dinov2Config(**VIT_S16)
    return {
        "Segmenter-linear ViT-S/16": SegmenterForSemanticSegmentation(
            SegmenterConfig(backbone_config=encoder, decoder_type="linear", num_labels=num_labels)
        ),
        "Segmenter-mask ViT-S/16": SegmenterForSemanticSegmentation(
            SegmenterConfig(backbone_config=encoder, decoder_type="mask_transformer", num_labels=num_labels)
        ),
        "SeNaTra-T native head": SeNaTraForSemanticSegmentation(SeNaTraConfig(num_labels=num_labels)),
    }


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="input height and width")
    parser.add_argument("--num-labels", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    models = {name: model.eval() for name, model in build_models(args.num_labels).items()}
    x = torch.randn(1, 3, args.size, args.size)
    times = {name: [] for name in models}
    with torch.inference_mode():
        for round_ in range(args.repeats + 1):
            for name, model in models.items():
                start = time.perf_counter()
                model(pixel_values=x)
                if round_:  # the first round warms up
                    times[name].append(time.perf_counter() - start)

    reference = "SeNaTra-T native head"
    latency = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    print(f"{args.size}x{args.size}, {args.num_labels} classes, batch 1, {args.threads} CPU threads, "
          f"median of {args.repeats}")
    print(f"{'model':28s} {'params (M)':>10s} {'decoder (M)':>11s} {'latency (s)':>11s} {'vs SeNaTra-T':>12s}")
    for name, model in models.items():
        head = model.decoder if isinstance(model, SegmenterForSemanticSegmentation) else model.head
        print(f"{name:28s} {count(model) / 1e6:10.2f} {count(head) / 1e6:11.2f} {latency[name]:11.3f} "
              f"{latency[name] / latency[reference]:11.2f}x")


if __name__ == "__main__":
    main()
