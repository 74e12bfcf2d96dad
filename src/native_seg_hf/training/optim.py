"""AdamW with layer-wise learning-rate decay and EoMT's schedule: warm-up, then polynomial decay.

Layer-wise decay (EoMT/BEiT): the backbone's embeddings get `lr * decay**L`, its block b (1..L, in the order the
model runs them) `lr * decay**(L - b)`, and everything else (heads, queries, decoders, final norms) the base `lr`.
Blocks are recognised by name in every model this package trains: SeNaTra (`encoder.stages.s.layers.b` and each
stage's `grouping` layer, which counts as a block), Dinov2/ViT backbones of Segmenter (`encoder.layer.b`) and
Transformers' EoMT (`layers.b`). decay = 1 gives every parameter the base lr (training from scratch).

Schedule (EoMT, section 4.3 of the brief): the non-backbone groups warm up linearly from 0 over `warmup_steps`;
with `backbone_warmup_steps` > 0 the backbone stays frozen (lr 0) during that warm-up and then warms up over
`backbone_warmup_steps` (two-stage warm-up), else it warms up with the rest. After its warm-up each group decays
polynomially, `(1 - t' / T') ** power`, t' and T' counted from the end of its own warm-up to `total_steps`.
Weight decay applies to every parameter, as in EoMT.

Grouping's assignment scalars (each SeNaTra grouping layer's relative position bias and inverse temperature) may
take `grouping_lr_multiplier` x their group's lr: they live on the scale of logits (the bias starts at 5, the
temperature's log at log 10), which AdamW at a backbone lr of 4e-4 moves by at most ~0.5 in a 2000-step run, so
at x1 they stay where they were initialised (README: "Does grouping earn its place?").

Run length (`RunLength`): a fixed number of steps, or a time budget, where the number of steps is re-planned after
every step from the pace of the whole run so far and the schedule runs to the current plan.
"""

import copy
import math
import re
import time
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

BACKBONE_BLOCK = re.compile(
    r"^(?:senatra\.|backbone\.)?(encoder\.stages\.\d+\.(?:layers\.\d+|grouping)|encoder\.layer\.\d+|layers\.\d+)\."
)
EMBEDDINGS = re.compile(r"^(?:senatra\.|backbone\.)?embeddings\.")
GROUPING_SCALARS = re.compile(r"\.grouping\.(?:relative_bias|log_logit_scale)$")


def layer_decay_groups(model: torch.nn.Module, lr: float, weight_decay: float, layer_decay: float,
                       grouping_lr_multiplier: float = 1.0) -> list[dict]:
    """Optimizer parameter groups, one per depth (and, with `grouping_lr_multiplier` != 1, one more per grouping
    layer for its assignment scalars), with `lr` scaled by depth (module docstring). Each group also carries
    `is_backbone` for the schedule."""
    blocks: list[str] = []
    depth_of = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        match = BACKBONE_BLOCK.match(name)
        if match:
            if match.group(1) not in blocks:
                blocks.append(match.group(1))
            depth_of[name] = blocks.index(match.group(1)) + 1
        elif EMBEDDINGS.match(name):
            depth_of[name] = 0
    num_blocks = len(blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        depth = depth_of.get(name, num_blocks + 1)
        scalar = grouping_lr_multiplier != 1 and GROUPING_SCALARS.search(name) is not None
        group = groups.setdefault((depth, scalar), {
            "params": [], "weight_decay": weight_decay, "is_backbone": depth <= num_blocks,
            "lr": lr * layer_decay ** max(0, num_blocks - depth) * (grouping_lr_multiplier if scalar else 1),
        })
        group["params"].append(parameter)
    return [groups[key] for key in sorted(groups)]


def create_optimizer(model, lr: float, weight_decay: float = 0.05, layer_decay: float = 1.0,
                     betas=(0.9, 0.999), grouping_lr_multiplier: float = 1.0) -> torch.optim.AdamW:
    groups = layer_decay_groups(model, lr, weight_decay, layer_decay, grouping_lr_multiplier)
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def lr_factor(step: int, warmup_steps: int, total_steps: int, power: float = 0.9, delay: int = 0) -> float:
    """The multiplier of a group's lr at `step`: 0 before `delay`, a linear warm-up over `warmup_steps`, then
    polynomial decay to 0 at `total_steps`."""
    if step < delay:
        return 0.0
    start = delay + warmup_steps
    if step < start:
        return (step - delay + 1) / warmup_steps
    return max(0.0, 1 - (step - start) / max(1, total_steps - start)) ** power


def create_scheduler(optimizer, total_steps: int | Callable[[], int], warmup_steps: int = 0,
                     backbone_warmup_steps: int = 0, power: float = 0.9) -> LambdaLR:
    """One `LambdaLR` over every group: EoMT's two-stage warm-up when `backbone_warmup_steps` > 0 (module
    docstring), one warm-up for all otherwise. `total_steps` may be a function giving the current plan
    (`RunLength.steps` of a run with a time budget), read at every step."""
    total = total_steps if callable(total_steps) else lambda: total_steps

    def schedule(is_backbone: bool):
        if is_backbone and backbone_warmup_steps > 0:
            return lambda step: lr_factor(step, backbone_warmup_steps, total(), power, delay=warmup_steps)
        return lambda step: lr_factor(step, warmup_steps, total(), power)

    return LambdaLR(optimizer, [schedule(group["is_backbone"]) for group in optimizer.param_groups])


class WeightAverage:
    """An exponential moving average of a model's parameters, for evaluation (Polyak averaging).

    `update(step)` after every optimizer step: `ema = d ema + (1 - d) live`, with `d = min(decay, (1 + step) /
    (10 + step))` so the first steps are not held back by the initial weights. Buffers (BatchNorm's running
    statistics, EoMT's annealing state) are copied from the live model: they are running values already.
    `model` is the averaged copy, an ordinary module (evaluate it, save it).
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"the weight average's decay must lie in (0, 1), got {decay}")
        self.decay, self.live = decay, model
        self.model = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, step: int) -> None:
        weight = 1 - min(self.decay, (1 + step) / (10 + step))
        for averaged, live in zip(self.model.parameters(), self.live.parameters()):
            averaged.lerp_(live, weight)
        for averaged, live in zip(self.model.buffers(), self.live.buffers()):
            averaged.copy_(live)


class RunLength:
    """How many optimizer steps a run has: `max_steps`, or, with a time budget of `minutes`, as many as fit in it.

    With a budget the plan is re-made after every step from the pace of the whole run so far,
    `steps = floor(step * budget / elapsed)` (capped by `max_steps`): every stall counts (the pause at the end of
    each pass over a streamed dataset, evaluations, checkpoints), which a pace probe of a few steps at the start
    cannot see, and a machine that slows down or speeds up midway moves the plan. The run stops when it reaches
    the plan, that is once less time is left than its average step takes, so it ends within its budget whatever
    the load. The lr schedule and mask annealing run to the current plan, so they end where the run ends; while the
    pace holds, the plan holds too.

    Args:
        max_steps: the run's length without a budget, its cap with one.
        minutes: the time budget, or None.
    """

    def __init__(self, max_steps: int, minutes: float | None = None):
        self.max_steps, self.minutes = max_steps, minutes
        self.steps = max_steps
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the run started (including the time of the run a checkpoint continues)."""
        return time.perf_counter() - self.start

    def resume(self, step: int, elapsed: float) -> None:
        """Continue a run that spent `elapsed` seconds on its first `step` steps."""
        self.start = time.perf_counter() - elapsed
        self.update(step, elapsed)

    def update(self, step: int, elapsed: float) -> int:
        """Re-plan after `step` steps that took `elapsed` seconds (the same value in every process, so that all
        of them stop together and keep the same lr); returns the plan."""
        if self.minutes is not None and step > 0:
            self.steps = min(self.max_steps, math.floor(step * self.minutes * 60 / max(elapsed, 1e-9)))
        return self.steps
