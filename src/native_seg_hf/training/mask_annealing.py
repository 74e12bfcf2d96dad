"""EoMT's mask annealing: per-block probabilities of masked attention, from 1 to 0 over training.

Block k (of the `num_blocks` query blocks) keeps its masked attention with probability

    P_k(t) = 1                                   for t <  start_k
           = (1 - (t - start_k) / (end_k - start_k)) ** power   in between   (power 0.9 as in EoMT)
           = 0                                   for t >= end_k

where t is the global optimizer step. The windows follow the rule that fits every EoMT config (the brief,
section 1.5): each window is T/6 long, the first starts at T/6, the last ends at 5T/6, starts evenly spaced,
so the final sixth of training runs fully unmasked. The schedule depends on the global step only, so a
resumed run continues exactly where it stopped.

Stale masks in Transformers' `EomtForUniversalSegmentation`: in eval mode it builds an attention mask only in
blocks whose probability is above 0 and passes the last one built on to later blocks, so probabilities that
are partly 0 make later blocks reuse an earlier block's mask. For models other than ours the schedule is
therefore floored at `STALE_MASK_FLOOR` while training (every block builds its own, practically never kept,
mask), and set to exactly 0 only when training ends. `SeNaTraForUniversalSegmentation` builds a mask per
block and needs no floor.
"""

import torch
from transformers import TrainerCallback

STALE_MASK_FLOOR = 1e-6


def annealing_windows(total_steps: int, num_blocks: int) -> tuple[list[float], list[float]]:
    """(starts, ends) of each block's annealing window for a run of `total_steps` optimizer steps."""
    sixth = total_steps / 6
    starts = torch.linspace(sixth, 4 * sixth, num_blocks).tolist() if num_blocks > 1 else [sixth]
    return starts, [start + sixth for start in starts]


def mask_annealing_probabilities(step: int, total_steps: int, num_blocks: int, power: float = 0.9) -> torch.Tensor:
    """The masking probability of every query block at global step `step` (closed form above)."""
    starts, ends = annealing_windows(total_steps, num_blocks)
    probs = [
        1.0 if step < start else 0.0 if step >= end else (1 - (step - start) / (end - start)) ** power
        for start, end in zip(starts, ends)
    ]
    return torch.tensor(probs)


def set_mask_annealing(model: torch.nn.Module, step: int, total_steps: int, power: float = 0.9) -> torch.Tensor:
    """Write the probabilities for `step` into `model.attn_mask_probs` (our universal model or Transformers'
    EoMT; pass the unwrapped model in an Accelerate loop) and return them. Call it after every optimizer step."""
    buffer = model.attn_mask_probs
    probs = mask_annealing_probabilities(step, total_steps, buffer.numel(), power)
    if step < total_steps and not getattr(model, "builds_mask_per_block", False):
        probs = probs.clamp(min=STALE_MASK_FLOOR)
    with torch.no_grad():
        buffer.copy_(probs.to(buffer.device, buffer.dtype))
    return probs


class MaskAnnealingCallback(TrainerCallback):
    """Anneals `attn_mask_probs` of the trained model at every step of a `Trainer` run.

    Args:
        total_steps (`int`, *optional*): length of the schedule; defaults to the run's `max_steps`.
        power (`float`, defaults to 0.9): exponent of the polynomial decay.
    """

    def __init__(self, total_steps: int | None = None, power: float = 0.9):
        self.total_steps = total_steps
        self.power = power

    def _update(self, state, model):
        set_mask_annealing(model, state.global_step, self.total_steps or state.max_steps, self.power)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._update(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._update(state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.global_step >= (self.total_steps or state.max_steps):
            model.attn_mask_probs.data.zero_()
