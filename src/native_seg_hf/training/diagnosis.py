"""Measurements of what a trained SeNaTra's grouping does (`scripts/diagnose_grouping.py` prints and saves them).

- `assignment_statistics`: per transition, the mean entropy of the soft assignments and their mean largest
  weight, and how many output tokens own at least one stride-4 token under the hard (argmax) hierarchy.
- `label_bounds`: how the hierarchy bounds what the native head can label: the mIoU of an oracle that gives each
  final-level segment the majority ground-truth class of its pixels, next to the same oracle on the uniform grid
  of the same size (what strided downsampling allows), and the model's own mIoU with soft and with hardened
  assignments, split into pixels near label boundaries and the rest, and with its final tokens' logits resized
  bilinearly instead (assignments ignored: what the tokens know, without the grouping's upsampling); per class too.
- `gradient_statistics`: for one training batch, gradient and parameter norms of each parameter family
  (grouping keys/queries/values/biases/temperatures, blocks, head).
- `grouping_scalars`: where each grouping layer's relative bias and inverse temperature ended up, against where
  they start (`grouping_parent_bias` on the parent cell, `grouping_logit_scale`).
"""

import math
import re
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..metrics import MeanIoU
from ..models.grouping import LOCAL_KINDS, hard_segments, parent_assignment, upsample_through
from .learning import eval_inputs, percent_scores


def entropy(assignment: torch.Tensor) -> torch.Tensor:
    """Per-row entropy (nats) of (..., K) row-stochastic weights."""
    return -(assignment * assignment.clamp_min(1e-12).log()).sum(-1)


def possible_groups(assignment: torch.Tensor) -> int:
    height, width = assignment.shape[1:3]
    return (height // 2) * (width // 2)


@torch.no_grad()
def assignment_statistics(model, pixel_values: torch.Tensor) -> list[dict]:
    """Per transition (fine to coarse), averaged over the images of the batch."""
    assignments = model.senatra(pixel_values).assignments
    kinds = model.config.grouping_types
    stats = []
    for level, (assignment, kind) in enumerate(zip(assignments, kinds), start=1):
        segments = hard_segments(assignments[:level], kinds[:level])
        used = [len(torch.unique(s)) for s in segments]
        candidates = 9 if kind in LOCAL_KINDS else assignment.shape[-1]
        stats.append({
            "transition": level, "kind": kind, "grid": list(assignment.shape[1:3]),
            "mean_entropy": float(entropy(assignment).mean()), "max_entropy": math.log(candidates),
            "mean_largest_weight": float(assignment.max(-1).values.mean()), "uniform_weight": 1 / candidates,
            "groups_used_per_image": used, "groups_possible": possible_groups(assignment),
        })
    return stats


def hardened(assignments) -> list[torch.Tensor]:
    """Every assignment replaced by the one-hot of its largest weight."""
    return [F.one_hot(a.argmax(-1), a.shape[-1]).to(a.dtype) for a in assignments]


def near_boundary(label: np.ndarray, radius: int = 3) -> np.ndarray:
    """Pixels within `radius` of a change of label (void pixels count as a label)."""
    edges = np.zeros(label.shape, bool)
    edges[1:] |= label[1:] != label[:-1]
    edges[:, 1:] |= label[:, 1:] != label[:, :-1]
    return ndimage.binary_dilation(edges, iterations=radius)


def majority_labels(segments: np.ndarray, label: np.ndarray, num_labels: int) -> np.ndarray:
    """Each segment's most frequent valid label painted over its pixels (255 where a segment has none)."""
    valid = label < num_labels
    counts = np.zeros((segments.max() + 1, num_labels), np.int64)
    np.add.at(counts, (segments[valid], label[valid]), 1)
    best = np.where(counts.sum(1) > 0, counts.argmax(1), 255)
    return best[segments]


def resize_nearest(ids: torch.Tensor, size) -> np.ndarray:
    return F.interpolate(ids[None, None].float(), size=size, mode="nearest")[0, 0].long().numpy()


@torch.no_grad()
def label_bounds(model, samples: list[dict], short_side: int, num_labels: int) -> dict:
    """Oracle and model IoU (percent) over `samples`, at the labels' size (module docstring): for each way of
    labelling, {"mean_iou", "per_class_iou"} (None for a class absent from labels and predictions)."""
    model.eval()
    kinds = model.config.grouping_types
    metrics = {name: MeanIoU(num_labels) for name in ("oracle_native", "oracle_grid", "soft", "hard", "tokens",
                                                      "soft_near_boundary", "soft_interior")}
    for sample in samples:
        label = sample["label"]
        pixels, (height, width) = eval_inputs(sample["image"], short_side)
        outputs = model.senatra(pixels)
        crop = lambda x: x[..., : math.ceil(height / 4), : math.ceil(width / 4)]  # noqa: E731  (stride-4 maps)
        native = crop(hard_segments(outputs.assignments, kinds)[0])
        grid_assignments = [parent_assignment(*a.shape[:3]) for a in outputs.assignments]
        grid = crop(hard_segments(grid_assignments, ["none"] * len(kinds))[0])
        for name, segments in (("oracle_native", native), ("oracle_grid", grid)):
            metrics[name].update(majority_labels(resize_nearest(segments, label.shape), label, num_labels), label)
        token_logits = model.head(outputs.last_hidden_state.permute(0, 2, 3, 1))
        stride_4_logits = {
            name: upsample_through(token_logits, assignments, kinds).permute(0, 3, 1, 2)
            for name, assignments in (("soft", outputs.assignments), ("hard", hardened(outputs.assignments)))
        }
        stride_4_logits["tokens"] = F.interpolate(token_logits.permute(0, 3, 1, 2),
                                                  size=stride_4_logits["soft"].shape[-2:], mode="bilinear")
        boundary = near_boundary(label)
        for name, logits in stride_4_logits.items():
            prediction = F.interpolate(crop(logits), size=label.shape, mode="bilinear").argmax(1)[0].numpy()
            metrics[name].update(prediction, label)
            if name == "soft":
                metrics["soft_near_boundary"].update(prediction, np.where(boundary, label, 255))
                metrics["soft_interior"].update(prediction, np.where(boundary, 255, label))
    model.train()
    return {name: percent_scores(metric) for name, metric in metrics.items()}


FAMILIES = [
    ("grouping.key", r"grouping\.key\."), ("grouping.query", r"grouping\.query\."),
    ("grouping.value", r"grouping\.value\."), ("grouping.relative_bias", r"grouping\.relative_bias"),
    ("grouping.log_logit_scale", r"grouping\.log_logit_scale"), ("grouping.init_conv", r"grouping\.init_"),
    ("grouping.other", r"grouping\."), ("blocks", r"layers\."), ("stem", r"embeddings\."), ("head", r"^head\."),
]


def gradient_statistics(model, batch: dict) -> dict:
    """Gradient and parameter L2 norms per parameter family for one batch (gradients cleared afterwards)."""
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    grad_sq, param_sq, count = defaultdict(float), defaultdict(float), defaultdict(int)
    for name, parameter in model.named_parameters():
        family = next((f for f, pattern in FAMILIES if re.search(pattern, name)), "other")
        if parameter.grad is not None:
            grad_sq[family] += float(parameter.grad.pow(2).sum())
        param_sq[family] += float(parameter.detach().pow(2).sum())
        count[family] += parameter.numel()
    model.zero_grad(set_to_none=True)
    return {f: {"grad_norm": math.sqrt(grad_sq[f]), "param_norm": math.sqrt(param_sq[f]), "numel": count[f],
                "grad_per_param_rms": math.sqrt(grad_sq[f] / count[f])} for f in param_sq}


def grouping_scalars(model) -> list[dict]:
    """Per grouping layer (stage order): its inverse temperature, the mean relative bias on the parent cell, and
    the range of the bias elsewhere (strided-downsampling layers have neither and are left out)."""
    layers = []
    for stage, module in enumerate(model.senatra.encoder.stages):
        grouping = module.grouping
        if grouping is None or grouping.kind == "none":
            continue
        table = grouping.relative_bias.detach()
        parent = grouping.parent_bias_init(1.0).to(table.device).bool()  # the layer's own parent-cell entries
        layers.append({
            "stage": stage, "kind": grouping.kind,
            "logit_scale": float(grouping.log_logit_scale.detach().exp()) if grouping.cosine else None,
            "parent_bias": float(table[parent].mean()),
            "other_bias_min": float(table[~parent].min()), "other_bias_max": float(table[~parent].max()),
        })
    return layers
