"""Triton path of the local grouping step (same function as `grouping.local_grouping_step_torch`).

Imported only when the Triton path runs (see `kernels.use_triton`). Layouts are those of `grouping.py`:
channels last, an input token (y, x) belongs to the parent cell (y // 2, x // 2), and its 9 candidate output
tokens are the cells around it in `NEIGHBOUR_OFFSETS` order, so neighbour j is the offset
(j // 3 - 1, j % 3 - 1).

Four kernels, all gathers (no atomics, so results are deterministic), none of which materialises the
N_in x 9 x D tensor of the PyTorch path:
- forward, per input token: the 9 logits against its candidate output tokens, softmax -> the assignment;
- forward, per output token: pull the 36 (child, neighbour) weights that point at it and the matching
  values -> column mass and the weighted mean (`_pull_to_outputs_kernel`, normalised);
- backward, per input token: gradients of keys and values, and the logits' gradient (N_in x 9);
- backward, per output token: the queries' gradient, the same pull over the logits' gradient and the keys
  (`_pull_to_outputs_kernel`, unnormalised).
The bias gradient is a (4, 9) sum of the logits' gradient, done with one PyTorch reduction.

Each program works on a block of tokens with all D channels in registers; the block shrinks as D grows
(`_block_sizes`). The block sizes are chosen, not tuned: no GPU was at hand when this was written.
"""

import torch

from .grouping import COLUMN_EPS, NEIGHBOUR_OFFSETS, to_cells
from .kernels import load_rows, tl, triton

# The kernels find neighbour j at offset (j // 3 - 1, j % 3 - 1) and its mirror at 8 - j.
assert NEIGHBOUR_OFFSETS == [(j // 3 - 1, j % 3 - 1) for j in range(9)]
N_NEIGHBOURS = len(NEIGHBOUR_OFFSETS)
NEIGHBOUR_SLOTS = 16  # 9 neighbours padded to a power of two, the shape Triton blocks need
TILE_ELEMENTS = 2048  # tokens x channels per (BLOCK_N, BLOCK_D) register tile: 16 floats a thread at 4 warps


@triton.jit
def _token_block(n_tokens, BLOCK_N: tl.constexpr):
    """This program's BLOCK_N flat token indices, and which of them exist.

    Indices past the end are clamped to the last token, so loads through them need no mask: the block's tail
    recomputes that token and stores nothing.
    """
    tokens = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return tl.minimum(tokens, n_tokens - 1).to(tl.int64), tokens < n_tokens


@triton.jit
def _input_token_block(n_tokens, H, W, BLOCK_N: tl.constexpr):
    """`_token_block` of input tokens, with the batch, parent cell (row, column) and child index (row-major in
    the cell) of each."""
    tokens, stored = _token_block(n_tokens, BLOCK_N)
    x = tokens % W
    y = (tokens // W) % H
    return tokens, stored, tokens // (H * W), y // 2, x // 2, (y % 2) * 2 + x % 2


@triton.jit
def _neighbour_cell(batch, cell_y, cell_x, j: tl.constexpr, H, W):
    """The cell at neighbour offset j of (cell_y, cell_x) in the (H/2, W/2) output grid: its flat index, row
    and column, and whether it lies in the grid.

    Row and column are clamped into the grid so that loads through them need no mask; callers zero what
    comes from outside.
    """
    h = H // 2
    w = W // 2
    ny = cell_y + (j // 3 - 1)
    nx = cell_x + (j % 3 - 1)
    inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
    ny = tl.minimum(tl.maximum(ny, 0), h - 1)
    nx = tl.minimum(tl.maximum(nx, 0), w - 1)
    return (batch * h + ny) * w + nx, ny, nx, inside


@triton.jit
def _local_assignment_kernel(
    keys, queries, bias, assignment, n_tokens, H, W, D,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SLOTS: tl.constexpr,
):
    """assignment[i, j] = softmax_j(keys[i] . queries[neighbour j of i's cell] + bias[child of i, j])."""
    tokens, stored, batch, cell_y, cell_x, child = _input_token_block(n_tokens, H, W, BLOCK_N)
    channels = tl.arange(0, BLOCK_D)
    slots = tl.arange(0, SLOTS)
    k = load_rows(keys, tokens, channels, D).to(tl.float32)
    logits = tl.full((BLOCK_N, SLOTS), float("-inf"), tl.float32)
    for j in tl.static_range(9):
        cell, _, _, inside = _neighbour_cell(batch, cell_y, cell_x, j, H, W)
        logit = tl.sum(k * load_rows(queries, cell, channels, D).to(tl.float32), axis=1)
        logit += tl.load(bias + child * 9 + j).to(tl.float32)
        logits = tl.where(slots[None, :] == j, tl.where(inside, logit, float("-inf"))[:, None], logits)
    # The token's own cell (j = 4) is always inside the grid, so every row has a finite maximum.
    weights = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    weights = weights / tl.sum(weights, axis=1)[:, None]
    tl.store(assignment + tokens[:, None] * 9 + slots[None, :], weights, mask=stored[:, None] & (slots[None, :] < 9))


@triton.jit
def _pull_to_outputs_kernel(
    weights, rows, out, inv_mass, n_outputs, H, W, D, eps,
    NORMALISE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[o] = sum of weights[i, j] * rows[i] over the input tokens i whose neighbour j is output token o.

    Output token o is neighbour j of the cell at offset -(offset j) from it, so it gathers from the four
    children of each of the 9 cells around it. With NORMALISE, the sum is divided by the column mass
    (plus eps) and 1 / (mass + eps) is stored in `inv_mass`: `A_down^T V` of the forward pass.
    """
    outputs, stored = _token_block(n_outputs, BLOCK_N)
    h = H // 2
    w = W // 2
    out_x = outputs % w
    out_y = (outputs // w) % h
    batch = outputs // (h * w)
    channels = tl.arange(0, BLOCK_D)
    total = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    mass = tl.zeros((BLOCK_N,), tl.float32)
    for j in tl.static_range(9):
        # The source cell is the mirror offset 8 - j of the output token.
        _, cell_y, cell_x, inside = _neighbour_cell(batch, out_y, out_x, 8 - j, H, W)
        for child in tl.static_range(4):
            token = (batch * H + 2 * cell_y + child // 2) * W + 2 * cell_x + child % 2
            weight = tl.where(inside, tl.load(weights + token * 9 + j).to(tl.float32), 0.0)
            total += weight[:, None] * load_rows(rows, token, channels, D).to(tl.float32)
            mass += weight
    store_mask = stored[:, None] & (channels[None, :] < D)
    if NORMALISE:
        inverse = 1.0 / (mass + eps)
        total = total * inverse[:, None]
        tl.store(inv_mass + outputs, inverse, mask=stored)
    tl.store(out + outputs[:, None] * D + channels[None, :], total, mask=store_mask)


@triton.jit
def _local_input_grads_kernel(
    values, queries, assignment, update, inv_mass, grad_update, grad_assignment,
    grad_keys, grad_values, grad_logits, n_tokens, H, W, D,
    HAS_GRAD_ASSIGNMENT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SLOTS: tl.constexpr,
):
    """Gradients of keys, values and logits, per input token i, from those of update and assignment.

    With o_j the output token of neighbour j, r_o = 1 / (mass_o + eps) and U_o = r_o sum_i A_io V_i:
        dA_ij     = r_oj dU_oj . (V_i - U_oj)  (+ the assignment's own gradient)
        dV_i      = sum_j A_ij r_oj dU_oj
        dlogit_ij = A_ij (dA_ij - s_i),  s_i = sum_j A_ij dA_ij                 (softmax backward)
        dK_i      = sum_j dlogit_ij Q_oj = sum_j A_ij dA_ij Q_oj - s_i sum_j A_ij Q_oj
    The last form lets one pass over the 9 neighbours accumulate everything.
    """
    tokens, stored, batch, cell_y, cell_x, _ = _input_token_block(n_tokens, H, W, BLOCK_N)
    channels = tl.arange(0, BLOCK_D)
    slots = tl.arange(0, SLOTS)
    v = load_rows(values, tokens, channels, D).to(tl.float32)
    grad_v = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    weighted_queries = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)  # sum_j A_ij dA_ij Q_oj
    mean_query = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)  # sum_j A_ij Q_oj
    a_grad_a = tl.zeros((BLOCK_N, SLOTS), tl.float32)  # A_ij dA_ij per neighbour
    for j in tl.static_range(9):
        cell, _, _, inside = _neighbour_cell(batch, cell_y, cell_x, j, H, W)
        # Outside the grid A_ij = 0, which zeroes every term below.
        a = tl.where(inside, tl.load(assignment + tokens * 9 + j).to(tl.float32), 0.0)
        r = tl.load(inv_mass + cell)
        grad_u = load_rows(grad_update, cell, channels, D).to(tl.float32)
        grad_a = r * tl.sum(grad_u * (v - load_rows(update, cell, channels, D).to(tl.float32)), axis=1)
        if HAS_GRAD_ASSIGNMENT:
            grad_a += tl.load(grad_assignment + tokens * 9 + j).to(tl.float32)
        grad_v += (a * r)[:, None] * grad_u
        q = load_rows(queries, cell, channels, D).to(tl.float32)
        weighted_queries += (a * grad_a)[:, None] * q
        mean_query += a[:, None] * q
        a_grad_a = tl.where(slots[None, :] == j, (a * grad_a)[:, None], a_grad_a)
    neighbours = slots[None, :] < 9
    a_all = tl.load(assignment + tokens[:, None] * 9 + slots[None, :], mask=neighbours, other=0.0).to(tl.float32)
    s = tl.sum(a_grad_a, axis=1)
    rows = tokens[:, None] * D + channels[None, :]
    row_mask = stored[:, None] & (channels[None, :] < D)
    tl.store(grad_keys + rows, weighted_queries - s[:, None] * mean_query, mask=row_mask)
    tl.store(grad_values + rows, grad_v, mask=row_mask)
    grad_logits_block = a_grad_a - a_all * s[:, None]
    tl.store(grad_logits + tokens[:, None] * 9 + slots[None, :], grad_logits_block, mask=stored[:, None] & neighbours)


def _block_sizes(d):
    """Tokens per program and the padded channel count, for D channels."""
    block_d = triton.next_power_of_2(d)
    return max(1, min(32, TILE_ELEMENTS // block_d)), block_d


class _LocalGroupingStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, keys, values, queries, bias):
        b, height, width, d = keys.shape
        if height % 2 or width % 2 or queries.shape != (b, height // 2, width // 2, d) or bias.shape != (4, 9):
            raise ValueError(
                f"local grouping step: keys {tuple(keys.shape)} (even H, W), queries {tuple(queries.shape)} "
                f"(B, H/2, W/2, D), bias {tuple(bias.shape)} (4, 9)"
            )
        ctx.set_materialize_grads(False)  # the assignment often gets no gradient: skip that term then
        keys, values, queries, bias = (t.contiguous() for t in (keys, values, queries, bias))
        n_in, n_out = keys.numel() // d, queries.numel() // d
        assignment = torch.empty((b, height, width, N_NEIGHBOURS), device=keys.device, dtype=keys.dtype)
        update = torch.empty(queries.shape, device=keys.device, dtype=values.dtype)
        inv_mass = torch.empty((n_out,), device=keys.device, dtype=torch.float32)
        block_n, block_d = _block_sizes(d)
        _local_assignment_kernel[(triton.cdiv(n_in, block_n),)](
            keys, queries, bias, assignment, n_in, height, width, d,
            BLOCK_N=block_n, BLOCK_D=block_d, SLOTS=NEIGHBOUR_SLOTS,
        )
        _pull_to_outputs_kernel[(triton.cdiv(n_out, block_n),)](
            assignment, values, update, inv_mass, n_out, height, width, d, COLUMN_EPS,
            NORMALISE=True, BLOCK_N=block_n, BLOCK_D=block_d,
        )
        ctx.save_for_backward(keys, values, queries, assignment, update, inv_mass)
        ctx.bias_dtype = bias.dtype
        return update, assignment

    @staticmethod
    def backward(ctx, grad_update, grad_assignment):
        keys, values, queries, assignment, update, inv_mass = ctx.saved_tensors
        b, height, width, d = keys.shape
        n_in, n_out = keys.numel() // d, queries.numel() // d
        if grad_update is None:
            grad_update = torch.zeros_like(update)
        has_grad_assignment = grad_assignment is not None
        grad_assignment = grad_assignment.contiguous() if has_grad_assignment else assignment  # never read if None
        grad_keys = torch.empty(keys.shape, device=keys.device, dtype=keys.dtype)
        grad_values = torch.empty(values.shape, device=keys.device, dtype=values.dtype)
        grad_queries = torch.empty(queries.shape, device=keys.device, dtype=queries.dtype)
        grad_logits = torch.empty((b, height, width, N_NEIGHBOURS), device=keys.device, dtype=torch.float32)
        block_n, block_d = _block_sizes(d)
        _local_input_grads_kernel[(triton.cdiv(n_in, block_n),)](
            values, queries, assignment, update, inv_mass, grad_update.contiguous(), grad_assignment,
            grad_keys, grad_values, grad_logits, n_in, height, width, d,
            HAS_GRAD_ASSIGNMENT=has_grad_assignment, BLOCK_N=block_n, BLOCK_D=block_d, SLOTS=NEIGHBOUR_SLOTS,
        )
        _pull_to_outputs_kernel[(triton.cdiv(n_out, block_n),)](
            grad_logits, keys, grad_queries, inv_mass, n_out, height, width, d, COLUMN_EPS,
            NORMALISE=False, BLOCK_N=block_n, BLOCK_D=block_d,
        )
        grad_bias = to_cells(grad_logits).sum(dim=(0, 1, 2)).to(ctx.bias_dtype)
        return grad_keys, grad_values, grad_queries, grad_bias


def local_grouping_step_triton(keys, values, queries, bias):
    """Local grouping step, Triton kernels forward and backward (contract of `local_grouping_step_torch`)."""
    return _LocalGroupingStep.apply(keys, values, queries, bias)
