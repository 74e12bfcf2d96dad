"""Spatial grouping ops: one step of the grouping layer, and moving values along the assignments.

Layout conventions (channels last everywhere):
- An input grid (B, H, W, C) is grouped into an output grid (B, H/2, W/2, C'). Input token (y, x) has the
  *parent cell* (y // 2, x // 2); its four input tokens are the cell's *children*, in row-major order.
- A **local** assignment is stored compactly per input token as (B, H, W, 9): the weights of the 9 output
  tokens around its parent cell, `NEIGHBOUR_OFFSETS` order ((-1, -1), (-1, 0), ... (1, 1)); neighbours
  outside the grid have weight 0. The dense N_in x N_out matrix is never built.
- A **dense** assignment is (B, H, W, H/2 * W/2): weights over every output token (row-major).
- A `"none"` transition (strided-conv downsampling) has a fixed local assignment, so it composes like the
  others: each token in its parent cell with weight 1 (nearest-neighbour un-pooling), or the weights of 2x
  bilinear interpolation over the 2x2 nearest cells (`SeNaTraConfig.uniform_upsampling`).
Rows of every assignment sum to 1 (`A_ups`, "upsampling"); dividing by the column sums gives `A_down`.
"""

import functools

import torch
import torch.nn.functional as F

from .kernels import use_triton

NEIGHBOUR_OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
CENTRE = NEIGHBOUR_OFFSETS.index((0, 0))
LOCAL_KINDS = ("local", "none")
COLUMN_EPS = 1e-6  # keeps the column normalisation finite for output tokens that receive (almost) nothing


def to_cells(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, ...) -> (B, H/2, W/2, 4, ...): the four children of each parent cell."""
    b, h, w = x.shape[:3]
    rest = x.shape[3:]
    x = x.reshape(b, h // 2, 2, w // 2, 2, *rest).transpose(2, 3)
    return x.reshape(b, h // 2, w // 2, 4, *rest)


def from_cells(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_cells`: (B, h, w, 4, ...) -> (B, 2h, 2w, ...)."""
    b, h, w = x.shape[:3]
    rest = x.shape[4:]
    x = x.reshape(b, h, w, 2, 2, *rest).transpose(2, 3)
    return x.reshape(b, 2 * h, 2 * w, *rest)


def gather_neighbours(y: torch.Tensor) -> torch.Tensor:
    """(B, h, w, C) -> (B, h, w, 9, C): the 3x3 neighbourhood of every cell, zeros outside the grid."""
    h, w = y.shape[1:3]
    padded = F.pad(y, (0, 0, 1, 1, 1, 1))
    return torch.stack([padded[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in NEIGHBOUR_OFFSETS], dim=3)


def scatter_neighbours(z: torch.Tensor) -> torch.Tensor:
    """Adjoint of `gather_neighbours`: (B, h, w, 9, C) -> (B, h, w, C), adding z[p, j] into cell p + offset_j."""
    b, h, w, _, c = z.shape
    padded = z.new_zeros(b, h + 2, w + 2, c)
    for j, (dy, dx) in enumerate(NEIGHBOUR_OFFSETS):
        padded[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] += z[:, :, :, j]
    return padded[:, 1:-1, 1:-1]


def neighbour_valid(h: int, w: int, device=None) -> torch.Tensor:
    """(h, w, 9) bool: whether each neighbour of each cell of an h x w output grid lies inside it."""
    ys = torch.arange(h, device=device)[:, None, None]
    xs = torch.arange(w, device=device)[None, :, None]
    offsets = torch.tensor(NEIGHBOUR_OFFSETS, device=device)
    ny, nx = ys + offsets[:, 0], xs + offsets[:, 1]
    return (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)


def neighbour_logit_mask(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(h, w, 1, 9) additive logit mask of `neighbour_valid`: 0 inside the grid, -inf outside.

    Cached per grid size (a dozen small elementwise ops otherwise run at every grouping iteration), except while
    torch.compile or torch.export trace, whose tensors are fake.
    """
    if torch.compiler.is_compiling():
        return _neighbour_logit_mask(h, w, device, dtype)
    return _cached_neighbour_logit_mask(h, w, torch.device(device) if device is not None else None, dtype)


def _neighbour_logit_mask(h: int, w: int, device, dtype) -> torch.Tensor:
    valid = neighbour_valid(h, w, device)[:, :, None, :]
    return torch.zeros(valid.shape, device=device, dtype=dtype).masked_fill(~valid, float("-inf"))


@functools.lru_cache(maxsize=16)
def _cached_neighbour_logit_mask(h: int, w: int, device, dtype) -> torch.Tensor:
    # A normal tensor even when first asked for under inference_mode (a later training forward may use it).
    with torch.inference_mode(False):
        return _neighbour_logit_mask(h, w, device, dtype)


def local_relative_offsets(device=None) -> torch.Tensor:
    """(4, 9, 2) offsets (in input tokens) of each child from each candidate output token's cell origin.

    Child (a, e) of a cell and neighbour (dy, dx) are `(a - 2 dy, e - 2 dx)` apart: values in [-2, 3].
    """
    children = torch.tensor([(a, e) for a in (0, 1) for e in (0, 1)], device=device)
    offsets = torch.tensor(NEIGHBOUR_OFFSETS, device=device)
    return children[:, None, :] - 2 * offsets[None, :, :]


def dense_relative_offsets(height: int, width: int, device=None) -> torch.Tensor:
    """(H*W, H/2*W/2, 2) offsets (in input tokens) of every input token from every output cell's origin."""
    yi, xi = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    yo, xo = torch.meshgrid(
        torch.arange(height // 2, device=device), torch.arange(width // 2, device=device), indexing="ij"
    )
    dy = yi.reshape(-1, 1) - 2 * yo.reshape(1, -1)
    dx = xi.reshape(-1, 1) - 2 * xo.reshape(1, -1)
    return torch.stack([dy, dx], dim=-1)


def relative_bias_index(offsets: torch.Tensor, radius: int) -> torch.Tensor:
    """Index into a flattened (2r+2) x (2r+2) relative-bias table for (..., 2) offsets, clipped to [-r, r + 1]."""
    offsets = offsets.clamp(-radius, radius + 1) + radius
    return offsets[..., 0] * (2 * radius + 2) + offsets[..., 1]


def dense_bias_index(height: int, width: int, radius: int, device=None) -> torch.Tensor:
    """`relative_bias_index` of `dense_relative_offsets`: (H*W, H/2*W/2), cached per grid size and device.

    Built once per size instead of at every forward: the int64 offset table it comes from is N_in x N_out x 2
    (about 256 MiB for a 1024x2048 image's stride-16 grid). Kept as int32 (half the memory; the table it indexes
    is tiny). Not cached while torch.compile or torch.export trace, whose tensors are fake.
    """
    if torch.compiler.is_compiling():  # int64: ONNX export turns the lookup into a GatherND, which takes no int32
        return relative_bias_index(dense_relative_offsets(height, width, device), radius)
    return _cached_dense_bias_index(height, width, radius, torch.device(device) if device is not None else None)


@functools.lru_cache(maxsize=8)
def _cached_dense_bias_index(height: int, width: int, radius: int, device) -> torch.Tensor:
    # A normal tensor even when first asked for under inference_mode: a training forward later saves it for
    # backward, which an inference tensor refuses.
    with torch.inference_mode(False):
        return relative_bias_index(dense_relative_offsets(height, width, device), radius).to(torch.int32)


# ----------------------------------------------------------------------------------------------------------
# One grouping step (the op a kernel fuses): logits, softmax over output tokens, column normalisation and
# the weighted mean of the values.
# ----------------------------------------------------------------------------------------------------------


def local_grouping_step_torch(keys, values, queries, bias):
    """Local grouping step, pure PyTorch.

    Args:
        keys, values: (B, H, W, D) projections of the input tokens.
        queries: (B, H/2, W/2, D) projections of the output tokens, already multiplied by the temperature.
        bias: (4, 9) relative position bias of each child and each candidate output token.

    Returns:
        update: (B, H/2, W/2, D), `A_down^T V` (the weighted mean of the values of each output token).
        assignment: (B, H, W, 9), the row-stochastic `A_ups` in local form.
    """
    h, w = queries.shape[1:3]
    # The bias and the mask of neighbours outside the grid (0 or -inf, so the sum is exactly either) added at once.
    mask = neighbour_logit_mask(h, w, keys.device, keys.dtype)
    logits = torch.einsum("bhwcd,bhwjd->bhwcj", to_cells(keys), gather_neighbours(queries)) + (bias + mask)
    assignment = logits.softmax(dim=-1)  # (B, h, w, 4, 9)
    column_sums = scatter_neighbours(assignment.sum(dim=3)[..., None])  # (B, h, w, 1)
    weighted = torch.einsum("bhwcj,bhwcd->bhwjd", assignment, to_cells(values))
    update = scatter_neighbours(weighted) / (column_sums + COLUMN_EPS)
    return update, from_cells(assignment)


def dense_grouping_step_torch(keys, values, queries, bias):
    """Dense grouping step, pure PyTorch.

    Args:
        keys, values: (B, H, W, D); queries: (B, H/2, W/2, D) already multiplied by the temperature;
        bias: (H*W, H/2*W/2).

    Returns:
        update (B, H/2, W/2, D) and assignment (B, H, W, H/2*W/2).
    """
    b, height, width, d = keys.shape
    h, w = queries.shape[1:3]
    logits = keys.reshape(b, -1, d) @ queries.reshape(b, -1, d).transpose(1, 2) + bias
    assignment = logits.softmax(dim=-1)  # (B, N_in, N_out)
    column_sums = assignment.sum(dim=1)[..., None]  # (B, N_out, 1)
    update = assignment.transpose(1, 2) @ values.reshape(b, -1, d) / (column_sums + COLUMN_EPS)
    return update.reshape(b, h, w, d), assignment.reshape(b, height, width, h * w)


def local_grouping_step(keys, values, queries, bias):
    """Local grouping step (see `local_grouping_step_torch` for the contract).

    Runs the fused Triton kernels of `grouping_triton` or the PyTorch reference, as `kernels.use_triton` says.
    """
    if use_triton(keys, values, queries, bias):
        from .grouping_triton import local_grouping_step_triton  # on use: it needs Triton, and imports this module

        return local_grouping_step_triton(keys, values, queries, bias)
    return local_grouping_step_torch(keys, values, queries, bias)


def dense_grouping_step(keys, values, queries, bias):
    """Dense grouping step (see `dense_grouping_step_torch` for the contract).

    The same code on both kernel paths: it is two dense matmuls and a softmax, which cuBLAS already does
    well, and the default configuration uses it only on the coarsest grid, where N_in x N_out is small.
    """
    return dense_grouping_step_torch(keys, values, queries, bias)


def parent_assignment(batch: int, height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """The local assignment of plain downsampling: every token belongs to its parent cell."""
    assignment = torch.zeros(batch, height, width, len(NEIGHBOUR_OFFSETS), device=device, dtype=dtype)
    assignment[..., CENTRE] = 1.0
    return assignment


def bilinear_assignment(batch: int, height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """The local assignment whose `upsample` is 2x bilinear interpolation (`align_corners=False`, edges
    replicated, as `F.interpolate`): on each axis a token takes 3/4 of its parent cell and 1/4 of the cell on its
    own side (before the parent for an even index, after it for an odd one), or all of the parent at the edge."""

    def axis_weights(size: int) -> torch.Tensor:  # (size, 3): weights of offsets -1, 0, +1
        index = torch.arange(size, device=device)
        side = torch.where(index % 2 == 0, 0, 2)  # column of the neighbouring cell on the token's side
        inside = (index // 2 + side - 1 >= 0) & (index // 2 + side - 1 < size // 2)
        parent = F.one_hot(torch.ones_like(index), 3)
        return (0.75 * parent + 0.25 * F.one_hot(torch.where(inside, side, 1), 3)).to(dtype or torch.float32)

    rows, cols = axis_weights(height), axis_weights(width)
    assignment = (rows[:, None, :, None] * cols[None, :, None, :]).reshape(height, width, len(NEIGHBOUR_OFFSETS))
    return assignment.expand(batch, -1, -1, -1)


UNIFORM_ASSIGNMENTS = {"nearest": parent_assignment, "bilinear": bilinear_assignment}


# ----------------------------------------------------------------------------------------------------------
# Moving values along assignments (the Markov chain of the brief).
# ----------------------------------------------------------------------------------------------------------


def upsample(values: torch.Tensor, assignment: torch.Tensor, kind: str) -> torch.Tensor:
    """Carry output-token values back to the input tokens: `A_ups @ values`.

    values (B, h, w, C), assignment (B, 2h, 2w, K) -> (B, 2h, 2w, C).
    """
    if kind in LOCAL_KINDS:
        return from_cells(to_cells(assignment) @ gather_neighbours(values))
    b, height, width, _ = assignment.shape
    return (assignment.reshape(b, height * width, -1) @ values.reshape(b, -1, values.shape[-1])).reshape(
        b, height, width, -1
    )


def downsample(values: torch.Tensor, assignment: torch.Tensor, kind: str) -> torch.Tensor:
    """Weighted mean of input-token values per output token: `A_down^T @ values`.

    values (B, H, W, C), assignment (B, H, W, K) -> (B, H/2, W/2, C).
    """
    b, height, width, c = values.shape
    if kind in LOCAL_KINDS:
        cells = to_cells(assignment)  # (B, h, w, 4, 9)
        sums = scatter_neighbours(cells.transpose(3, 4) @ to_cells(values))
        mass = scatter_neighbours(cells.sum(dim=3)[..., None])
    else:
        flat = assignment.reshape(b, height * width, -1)
        sums = (flat.transpose(1, 2) @ values.reshape(b, -1, c)).reshape(b, height // 2, width // 2, c)
        mass = flat.sum(dim=1).reshape(b, height // 2, width // 2, 1)
    return sums / (mass + COLUMN_EPS)


def upsample_through(values: torch.Tensor, assignments, kinds) -> torch.Tensor:
    """Carry values down a chain of transitions, last transition first (`A_1 @ A_2 @ ... @ values`).

    `assignments` and `kinds` list the transitions from fine to coarse; values live on the coarsest grid.
    """
    for assignment, kind in zip(reversed(list(assignments)), reversed(list(kinds))):
        values = upsample(values, assignment, kind)
    return values


def downsample_through(values: torch.Tensor, assignments, kinds) -> torch.Tensor:
    """Carry values up a chain of transitions, first transition first (composed `A_down`)."""
    for assignment, kind in zip(assignments, kinds):
        values = downsample(values, assignment, kind)
    return values


def hard_segments(assignments, kinds, chunk_size: int = 256) -> torch.Tensor:
    """Argmax group of every token of the finest grid under the composed assignment of a chain.

    Returns (B, H, W) int64 indices of the coarsest grid's tokens (row-major). The composed matrix is built
    `chunk_size` groups at a time (a one-hot block carried down the chain), so memory stays at
    N_fine x chunk_size.
    """
    last = assignments[-1]
    b, height, width = last.shape[:3]
    h, w = height // 2, width // 2
    n_groups = h * w
    best_score, best_group = None, None
    for start in range(0, n_groups, chunk_size):
        size = min(chunk_size, n_groups - start)
        one_hot = torch.zeros(n_groups, size, device=last.device, dtype=last.dtype)
        one_hot[start : start + size] = torch.eye(size, device=last.device, dtype=last.dtype)
        probs = upsample_through(one_hot.reshape(1, h, w, size).expand(b, -1, -1, -1), assignments, kinds)
        score, group = probs.max(dim=-1)
        group = group + start
        if best_score is None:
            best_score, best_group = score, group
        else:
            better = score > best_score
            best_score = torch.where(better, score, best_score)
            best_group = torch.where(better, group, best_group)
    return best_group
