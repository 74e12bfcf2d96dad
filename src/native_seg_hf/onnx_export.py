"""ONNX export of our segmentation models, and a check of the exported graph against PyTorch with ONNX Runtime.

Exports go through `torch.onnx.export(..., dynamo=True)` (torch.export, then ONNX with onnxscript): Optimum's
exporter, the ecosystem's usual route for Transformers models, requires transformers < 4.58 (optimum-onnx 0.1.0) and
so cannot be installed next to transformers 5. The graph takes `pixel_values` (B, 3, H, W) and returns the model's
output tensors by name:

- `SeNaTraForSemanticSegmentation`, `SegmenterForSemanticSegmentation`: `logits` (B, num_labels, h, w);
- `SeNaTraForUniversalSegmentation` (annealing finished, `attn_mask_probs` all 0): `class_queries_logits`
  (B, K, C + 1) and `masks_queries_logits` (B, K, h, w).

Height and width are dynamic: any multiple of the model's `input_size_divisor` (32 for SeNaTra; any size for
Segmenter, which pads inputs to whole patches itself). The batch size is fixed at export (`batch_size`).
Needs the `onnx` extra: `pip install "native_seg_hf[onnx]"` (onnx, onnxscript, onnxruntime).
"""

from pathlib import Path

import numpy as np
import torch
from torch import nn


def onnx_output_names(model: nn.Module) -> tuple[str, ...]:
    """The output tensors the exported graph returns for this model, in order."""
    if hasattr(model, "attn_mask_probs"):  # query models: EoMT-style outputs
        return ("class_queries_logits", "masks_queries_logits")
    return ("logits",)


def input_size_divisor(model: nn.Module) -> int:
    """What input height and width must be multiples of (1 when the model pads inputs itself)."""
    if getattr(model.config, "model_type", None) == "segmenter":
        return 1
    return getattr(model.config, "input_size_divisor", None) or 1


def tracing_size(model: nn.Module, example_size: tuple[int, int]) -> tuple[int, int]:
    """The input size to trace a dynamic-size graph at: `example_size`, or one patch wider where a ViT backbone (a
    Segmenter's DINOv2) would see its native square patch grid there.

    Transformers' ViT embeddings hand out their position-embedding table as it is for the native grid and interpolate
    it for any other; they mean to interpolate always while tracing (`torch.jit.is_tracing()`), which torch.export does
    not set. A graph traced at the native grid would keep that table and fail at every other size; traced elsewhere it
    interpolates, and at the native size the interpolation (bicubic, scale 1) gives the table back.
    """
    backbone = getattr(model.config, "backbone_config", None)
    image_size, patch = getattr(backbone, "image_size", None), getattr(backbone, "patch_size", None)
    if not (isinstance(image_size, int) and isinstance(patch, int)):
        return example_size
    grid = tuple(-(-side // patch) for side in example_size)  # Segmenter pads inputs to whole patches
    if grid == (image_size // patch,) * 2:
        return example_size[0], example_size[1] + patch
    return example_size


class _OutputTensors(nn.Module):
    """The model with a tensor-only signature: `pixel_values` in, the named output tensors out."""

    def __init__(self, model: nn.Module, output_names: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.output_names = output_names

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(pixel_values=pixel_values)
        return tuple(outputs[name] for name in self.output_names)


def export_onnx(
    model: nn.Module,
    output: str | Path,
    example_size: tuple[int, int] = (512, 512),
    batch_size: int = 1,
    dynamic: bool = True,
    optimize: bool = False,
) -> Path:
    """Export `model` (in eval mode) to the ONNX file `output` and return its path.

    Args:
        example_size: (height, width) of the example input the graph is traced with. Sizes decide nothing in the
            graph's structure except which attention path a stage takes (dense for grids of at most 256 tokens,
            tiled above, both exact at every size), so a typical input size gives the fastest graph. A Segmenter's
            ViT backbone is traced one patch wider where this size is its native grid (`tracing_size`).
        batch_size: the graph's fixed batch size.
        dynamic: height and width dynamic (multiples of `input_size_divisor(model)`); False fixes them.
        optimize: run onnxscript's graph optimiser (constant folding, dead code) on the result. Off by default:
            on SeNaTra's graphs it ran for over 20 minutes on a 2-core CPU (the export itself takes a few), and ONNX
            Runtime applies its own graph optimisations when it loads the model.
    """
    if getattr(model, "attn_mask_probs", None) is not None and bool(model.attn_mask_probs.any()):
        raise ValueError(
            "ONNX export of a query model needs finished mask annealing (attn_mask_probs all 0, see "
            f"set_mask_annealing); got {model.attn_mask_probs.tolist()}: the graph has no masked attention"
        )
    divisor = input_size_divisor(model)
    if any(side % divisor for side in example_size):
        raise ValueError(f"example_size {example_size} must be multiples of the model's input divisor {divisor}")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    names = onnx_output_names(model)
    example = torch.randn(batch_size, 3, *(tracing_size(model, example_size) if dynamic else example_size))
    dynamic_shapes = None
    if dynamic:
        height, width = torch.export.Dim("height", min=1), torch.export.Dim("width", min=1)
        dynamic_shapes = {"pixel_values": {2: divisor * height, 3: divisor * width}}
    # Weights over 2 GB cannot live inside one protobuf: they go to a side file next to the graph.
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.5 * 2**30
    with torch.no_grad():
        torch.onnx.export(
            _OutputTensors(model.eval(), names).eval(),  # the wrapper too, or the exporter warns of training mode
            (example,),
            str(output),
            dynamo=True,
            input_names=["pixel_values"],
            output_names=list(names),
            dynamic_shapes=dynamic_shapes,
            optimize=optimize,
            external_data=large,
        )
    return output


def onnxruntime_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session of an exported graph (`threads` intra-op threads, default: the runtime's)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare_with_pytorch(model: nn.Module, session, pixel_values: torch.Tensor) -> dict[str, float]:
    """Per output: the largest absolute difference between ONNX Runtime's output and the model's, relative to the
    largest absolute value of the model's (shapes must agree)."""
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values)
    results = session.run(None, {session.get_inputs()[0].name: pixel_values.numpy()})
    differences = {}
    for name, got in zip(onnx_output_names(model), results):
        expected = outputs[name].numpy()
        if got.shape != expected.shape:
            raise ValueError(f"{name}: ONNX Runtime gives shape {got.shape}, PyTorch {expected.shape}")
        differences[name] = float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-12))
    return differences


__all__ = ["export_onnx", "onnx_output_names", "input_size_divisor", "tracing_size", "onnxruntime_session",
           "compare_with_pytorch"]
