"""Triton path of 2D neighbourhood attention (same function as `neighborhood_attention.neighborhood_attention_torch`).

Imported only when the Triton path runs (see `kernels.use_triton`). Window semantics are NAT's, as in
`neighborhood_attention.window_starts`: along an axis of length L the window is min(kernel_size, L) long
and starts at clamp(p - window // 2, 0, L - window), so it is shifted inside the grid at the borders and is
the whole axis when the axis is no longer than the kernel (a grid no larger than the kernel is global
attention). Rotary embedding is applied by the caller to query and key before the call, so the kernels see
plain attention on already-rotated inputs.

Flash-attention style, with the window as the mask:
- forward: a program takes a TILE x TILE block of queries, walks the rows of keys that any of its windows
  touch in chunks of KEY_BLOCK columns, and keeps an online softmax; it stores the output and the
  log-sum-exp of each query's scores for the backward pass;
- backward, queries: the same walk, recomputing the probabilities from the log-sum-exp;
- backward, keys and values: a program takes a TILE x TILE block of keys and walks the queries whose
  windows contain any of them (a contiguous range per axis, since windows are monotone in the query).
Memory is that of q, k, v, the output and one float per query; no score matrix is stored.
"""

import torch

from .kernels import load_rows, tl, triton

TILE = 8  # queries (forward) or keys (backward) per program: TILE x TILE
KEY_BLOCK = 16  # keys of one row per inner step (the smallest size `tl.dot` accepts)


@triton.jit
def _window_start(position, length, window):
    """First index of the window of `position` along an axis (`neighborhood_attention.window_starts`)."""
    return tl.minimum(tl.maximum(position - window // 2, 0), length - window)


@triton.jit
def _first_query_seeing(key, window):
    """Smallest query position whose window contains `key` (queries' windows start at most key - window + 1)."""
    first_start = key - window + 1
    return tl.where(first_start <= 0, 0, first_start + window // 2)


@triton.jit
def _last_query_seeing(key, length, window):
    """Largest query position whose window contains `key`."""
    return tl.where(key >= length - window, length - 1, key + window // 2)


@triton.jit
def _tile_positions(tile, H, W, TILE: tl.constexpr):
    """Rows and columns of the TILE * TILE positions of tile `tile` (row-major), clamped into the grid, and
    whether each is really in it (clamped positions repeat the last row/column and are never stored)."""
    tiles_x = tl.cdiv(W, TILE)
    offsets = tl.arange(0, TILE * TILE)
    y = (tile // tiles_x) * TILE + offsets // TILE
    x = (tile % tiles_x) * TILE + offsets % TILE
    in_grid = (y < H) & (x < W)
    return tl.minimum(y, H - 1), tl.minimum(x, W - 1), in_grid


@triton.jit
def _in_window(position, start, window):
    """Whether `position` lies in the window [start, start + window) (broadcasting)."""
    return (position >= start) & (position < start + window)


@triton.jit
def _query_tile_pass(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, grad_out_ptr, delta_ptr, grad_q_ptr,
    H, W, D, window_h, window_w, scale,
    BACKWARD: tl.constexpr, TILE: tl.constexpr, KEY_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One TILE x TILE block of queries against every key of their windows.

    Forward (BACKWARD=False): online softmax; stores the output and the log-sum-exp.
    Backward (BACKWARD=True): recomputes the probabilities p from the stored log-sum-exp and stores
    dQ = scale * sum_k p (dO . V_k - delta) K_k, with delta = dO . O.
    """
    head = tl.program_id(1).to(tl.int64) * H * W  # first token of this (batch, head)
    y, x, in_grid = _tile_positions(tl.program_id(0), H, W, TILE)
    queries = head + y * W + x
    start_y = _window_start(y, H, window_h)
    start_x = _window_start(x, W, window_w)
    channels = tl.arange(0, BLOCK_D)
    q = load_rows(q_ptr, queries, channels, D)
    # Windows are monotone in the query, so the tile's keys span from its first query's window start to its
    # last query's window end, along each axis.
    rows_begin = tl.min(start_y, axis=0)
    rows_end = tl.max(start_y, axis=0) + window_h
    cols_begin = tl.min(start_x, axis=0)
    cols_end = tl.max(start_x, axis=0) + window_w
    if BACKWARD:
        grad_out = load_rows(grad_out_ptr, queries, channels, D)
        lse = tl.load(lse_ptr + queries)
        delta = tl.load(delta_ptr + queries)
        grad_q = tl.zeros((TILE * TILE, BLOCK_D), tl.float32)
    else:
        # A finite start keeps exp(running_max - new_max) defined while a row has seen only masked keys.
        running_max = tl.full((TILE * TILE,), -1e30, tl.float32)
        running_sum = tl.zeros((TILE * TILE,), tl.float32)
        acc = tl.zeros((TILE * TILE, BLOCK_D), tl.float32)
    for key_y in range(rows_begin, rows_end):
        for chunk in range(cols_begin, cols_end, KEY_BLOCK):
            key_x = chunk + tl.arange(0, KEY_BLOCK)
            keys = head + key_y * W + tl.minimum(key_x, W - 1)
            k = load_rows(k_ptr, keys, channels, D)
            v = load_rows(v_ptr, keys, channels, D)
            in_rows = _in_window(key_y, start_y, window_h)
            visible = in_rows[:, None] & _in_window(key_x[None, :], start_x[:, None], window_w)
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
            scores = tl.where(visible, scores, float("-inf"))
            if BACKWARD:
                p = tl.exp(scores - lse[:, None])
                grad_p = tl.dot(grad_out, tl.trans(v), input_precision=DOT_PRECISION)
                grad_scores = p * (grad_p - delta[:, None])
                grad_q += tl.dot(grad_scores.to(k.dtype), k, input_precision=DOT_PRECISION)
            else:
                new_max = tl.maximum(running_max, tl.max(scores, axis=1))
                p = tl.exp(scores - new_max[:, None])
                rescale = tl.exp(running_max - new_max)
                running_sum = running_sum * rescale + tl.sum(p, axis=1)
                acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
                running_max = new_max
    row_mask = in_grid[:, None] & (channels[None, :] < D)
    rows = queries[:, None] * D + channels[None, :]
    if BACKWARD:
        tl.store(grad_q_ptr + rows, grad_q * scale, mask=row_mask)
    else:
        # Every query sees at least itself, so running_sum > 0.
        tl.store(out_ptr + rows, acc / running_sum[:, None], mask=row_mask)
        tl.store(lse_ptr + queries, running_max + tl.log(running_sum), mask=in_grid)


@triton.jit
def _key_tile_backward(
    q_ptr, k_ptr, v_ptr, lse_ptr, grad_out_ptr, delta_ptr, grad_k_ptr, grad_v_ptr,
    H, W, D, window_h, window_w, scale,
    TILE: tl.constexpr, QUERY_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dK and dV of one TILE x TILE block of keys, from every query whose window contains one of them:
    dV = sum_q p dO_q,  dK = scale * sum_q p (dO_q . V - delta_q) Q_q."""
    head = tl.program_id(1).to(tl.int64) * H * W
    y, x, in_grid = _tile_positions(tl.program_id(0), H, W, TILE)
    keys = head + y * W + x
    channels = tl.arange(0, BLOCK_D)
    k = load_rows(k_ptr, keys, channels, D)
    v = load_rows(v_ptr, keys, channels, D)
    rows_begin = _first_query_seeing(tl.min(y, axis=0), window_h)
    rows_end = _last_query_seeing(tl.max(y, axis=0), H, window_h) + 1
    cols_begin = _first_query_seeing(tl.min(x, axis=0), window_w)
    cols_end = _last_query_seeing(tl.max(x, axis=0), W, window_w) + 1
    grad_k = tl.zeros((TILE * TILE, BLOCK_D), tl.float32)
    grad_v = tl.zeros((TILE * TILE, BLOCK_D), tl.float32)
    for query_y in range(rows_begin, rows_end):
        start_y = _window_start(query_y, H, window_h)
        for chunk in range(cols_begin, cols_end, QUERY_BLOCK):
            query_x = chunk + tl.arange(0, QUERY_BLOCK)
            queries = head + query_y * W + tl.minimum(query_x, W - 1)
            q = load_rows(q_ptr, queries, channels, D)
            grad_out = load_rows(grad_out_ptr, queries, channels, D)
            lse = tl.load(lse_ptr + queries)
            delta = tl.load(delta_ptr + queries)
            # Rows are keys, columns queries.
            start_x = _window_start(query_x, W, window_w)
            in_rows = _in_window(y, start_y, window_h)
            visible = in_rows[:, None] & _in_window(x[:, None], start_x[None, :], window_w)
            visible = visible & (query_x < cols_end)[None, :]
            scores = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * scale
            p = tl.exp(tl.where(visible, scores, float("-inf")) - lse[None, :])
            grad_v += tl.dot(p.to(grad_out.dtype), grad_out, input_precision=DOT_PRECISION)
            grad_p = tl.dot(v, tl.trans(grad_out), input_precision=DOT_PRECISION)
            grad_scores = p * (grad_p - delta[None, :])
            grad_k += tl.dot(grad_scores.to(q.dtype), q, input_precision=DOT_PRECISION)
    row_mask = in_grid[:, None] & (channels[None, :] < D)
    rows = keys[:, None] * D + channels[None, :]
    tl.store(grad_k_ptr + rows, grad_k * scale, mask=row_mask)
    tl.store(grad_v_ptr + rows, grad_v, mask=row_mask)


def _launch_config(query, kernel_size):
    """Grid, shared runtime arguments and block sizes of the three kernels for q/k/v shaped like `query`."""
    b, heads, height, width, d = query.shape
    grid = (triton.cdiv(height, TILE) * triton.cdiv(width, TILE), b * heads)
    args = (height, width, d, min(kernel_size, height), min(kernel_size, width), d**-0.5)
    # fp32 dots as exact as the PyTorch path's matmuls: TF32 only where PyTorch allows it.
    exact = query.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    blocks = dict(TILE=TILE, BLOCK_D=max(16, triton.next_power_of_2(d)), DOT_PRECISION="ieee" if exact else "tf32")
    return grid, args, blocks


class _NeighborhoodAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, kernel_size):
        if kernel_size % 2 == 0:
            raise ValueError(f"neighbourhood attention needs an odd kernel_size, got {kernel_size}")
        query, key, value = (t.contiguous() for t in (query, key, value))
        grid, args, blocks = _launch_config(query, kernel_size)
        out = torch.empty(query.shape, device=query.device, dtype=query.dtype)
        lse = torch.empty(query.shape[:-1], device=query.device, dtype=torch.float32)
        # The backward-only pointers get `out` as a placeholder: the forward pass does not touch them.
        _query_tile_pass[grid](
            query, key, value, out, lse, out, out, out, *args, BACKWARD=False, KEY_BLOCK=KEY_BLOCK, **blocks
        )
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.kernel_size = kernel_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        grid, args, blocks = _launch_config(query, ctx.kernel_size)
        grad_out = grad_out.contiguous()
        delta = (grad_out.float() * out.float()).sum(dim=-1)  # dO . O per query, the softmax backward's row term
        grad_q, grad_k, grad_v = (torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (query, key, value))
        _query_tile_pass[grid](
            query, key, value, out, lse, grad_out, delta, grad_q, *args, BACKWARD=True, KEY_BLOCK=KEY_BLOCK, **blocks
        )
        _key_tile_backward[grid](
            query, key, value, lse, grad_out, delta, grad_k, grad_v, *args, QUERY_BLOCK=KEY_BLOCK, **blocks
        )
        return grad_q, grad_k, grad_v, None


def neighborhood_attention_triton(query, key, value, kernel_size):
    """Neighbourhood attention, Triton kernels forward and backward (contract of `neighborhood_attention_torch`)."""
    return _NeighborhoodAttention.apply(query, key, value, kernel_size)
