"""2D neighbourhood attention (NAT semantics): the PyTorch reference and the dispatcher.

Every query at (y, x) attends to the `kernel_size x kernel_size` keys of a window centred on it; near the
borders the window is shifted inside the grid (so every query always sees kernel_size**2 keys), as in NAT.
Along an axis no longer than the kernel the window is the whole axis, so a grid no larger than the kernel
is global attention.

The PyTorch path is tiled: queries are cut into tiles that divide the grid evenly (sides of at least
`tile`), each tile takes the `(tile + kernel - 1)**2` keys around it (strided views of the zero-padded grid,
no index gathers), and one masked attention (matmul, softmax, matmul) runs over all tiles. Memory is linear
in the number of tokens (about ((tile + kernel - 1) / tile)**2 copies of K and V, plus
tile**2 x (tile + kernel - 1)**2 scores per tile), and the matmuls are dense, which is what makes this fast
on a CPU. Grids of at most `DENSE_MAX_TOKENS` tokens run as one dense masked attention instead: on a CPU
that is faster than tiling them (measured, single-threaded CPU time: 16x16 grids, not 32x32). The default
tile side 4 (the smallest that holds a kernel-7 window's half) beat 8 and 16 at every grid size measured.
"""

import functools

import torch
import torch.nn.functional as F

from .kernels import use_triton

DENSE_MAX_TOKENS = 256


def window_starts(positions: torch.Tensor, length: int, kernel_size: int) -> torch.Tensor:
    """First key index of the (border-shifted) window of each query position along one axis."""
    kernel = min(kernel_size, length)
    return (positions - kernel // 2).clamp(0, length - kernel)


def _window_mask_1d(queries: torch.Tensor, keys: torch.Tensor, length: int, kernel_size: int) -> torch.Tensor:
    """(..., n_queries, n_keys) bool: key index inside the window of the query index (padding never is)."""
    starts = window_starts(queries, length, kernel_size)[..., :, None]
    kernel = min(kernel_size, length)
    return (keys[..., None, :] >= starts) & (keys[..., None, :] < starts + kernel)


def _cached_outside_tracing(build):
    """Memoise a mask builder (masks depend only on the grid), except while torch.compile/export trace the
    model: a mask made then is a fake tensor and must not be kept for later eager calls."""
    cached = functools.lru_cache(maxsize=32)(build)

    @functools.wraps(build)
    def get(*args):
        return build(*args) if torch.compiler.is_compiling() else cached(*args)

    return get


@_cached_outside_tracing
def _dense_mask(height: int, width: int, kernel_size: int, device) -> torch.Tensor:
    """(H*W, H*W) bool mask of every query's window, for grids small enough to attend densely."""
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    mask_rows = _window_mask_1d(rows, rows, height, kernel_size)
    mask_cols = _window_mask_1d(cols, cols, width, kernel_size)
    return (mask_rows[:, None, :, None] & mask_cols[None, :, None, :]).reshape(height * width, height * width)


def _axis_tiling(length: int, kernel_size: int, tile: int) -> tuple[int, int]:
    """(tile, pad) along one axis. Tiles divide the axis evenly; each tile's keys are the region
    [start - pad, start + tile + pad) of the axis zero-padded by `pad` on both sides.

    With pad = kernel // 2 that region holds the (border-shifted) window of every query of the tile as long
    as tile > kernel // 2; an axis no longer than the kernel is one tile whose window is the whole axis.
    """
    if length <= kernel_size:
        return length, 0
    pad = kernel_size // 2
    tile = next(t for t in range(max(tile, pad + 1), length + 1) if length % t == 0)
    return tile, pad


@_cached_outside_tracing
def _tiled_bias(height: int, width: int, kernel_size: int, tile: int, device, dtype) -> torch.Tensor:
    """(n_tiles_y, n_tiles_x, tile_y * tile_x, region_y * region_x) additive mask of every tile's windows:
    0 inside a query's window, -inf outside."""

    def axis(length):
        t, pad = _axis_tiling(length, kernel_size, tile)
        starts = torch.arange(0, length, t, device=device)[:, None]
        queries = starts + torch.arange(t, device=device)
        keys = starts - pad + torch.arange(t + 2 * pad, device=device)
        return _window_mask_1d(queries, keys, length, kernel_size)  # (n, t, region)

    mask_rows, mask_cols = axis(height), axis(width)
    mask = mask_rows[:, None, :, None, :, None] & mask_cols[None, :, None, :, None, :]
    mask = mask.reshape(mask_rows.shape[0], mask_cols.shape[0], mask_rows.shape[1] * mask_cols.shape[1], -1)
    return torch.zeros(mask.shape, device=device, dtype=dtype).masked_fill_(~mask, float("-inf"))


def _tiles(x: torch.Tensor, tiling_y, tiling_x, region: bool) -> torch.Tensor:
    """(B, h, H, W, d) -> (B, h, n_y, n_x, tokens, d): the query tiles, or with `region` their key regions."""
    (ty, py), (tx, px) = tiling_y, tiling_x
    b, h, _, _, d = x.shape
    if region:
        x = F.pad(x, (0, 0, px, px, py, py))
        blocks = x.unfold(2, ty + 2 * py, ty).unfold(3, tx + 2 * px, tx)  # (B, h, n_y, n_x, d, ry, rx)
    else:
        blocks = x.unfold(2, ty, ty).unfold(3, tx, tx)
    n_y, n_x = blocks.shape[2:4]
    return blocks.permute(0, 1, 2, 3, 5, 6, 4).reshape(b, h, n_y, n_x, -1, d)


def neighborhood_attention_torch(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: int,
    tile: int = 4,
    dense_max_tokens: int = DENSE_MAX_TOKENS,
) -> torch.Tensor:
    """Neighbourhood attention over a 2D grid.

    Args:
        query, key, value: (B, heads, H, W, head_dim); the query is not pre-scaled.
        kernel_size: odd window side.
        tile: smallest side of the query tiles; dense_max_tokens: largest grid attended in one dense masked
            call. Both are speed/memory knobs: the result does not depend on them.

    Returns:
        (B, heads, H, W, head_dim).
    """
    b, h, height, width, d = query.shape
    if height * width <= dense_max_tokens:
        flat = [t.reshape(b, h, height * width, d) for t in (query, key, value)]
        mask = _dense_mask(height, width, kernel_size, query.device)
        return F.scaled_dot_product_attention(*flat, attn_mask=mask).reshape(b, h, height, width, d)

    tiling_y, tiling_x = _axis_tiling(height, kernel_size, tile), _axis_tiling(width, kernel_size, tile)
    # Plain matmul-softmax-matmul with an additive mask: on a CPU this is 1.5-2x faster than
    # scaled_dot_product_attention with a boolean mask (which checks and converts the mask on every call).
    scores = (_tiles(query, tiling_y, tiling_x, region=False) * d**-0.5) @ _tiles(
        key, tiling_y, tiling_x, region=True
    ).transpose(-1, -2)
    scores = scores + _tiled_bias(height, width, kernel_size, tile, query.device, scores.dtype)
    out = scores.softmax(dim=-1) @ _tiles(value, tiling_y, tiling_x, region=True)  # (B, h, n_y, n_x, ty * tx, d)
    (ty, _), (tx, _) = tiling_y, tiling_x
    n_y, n_x = height // ty, width // tx
    return out.reshape(b, h, n_y, n_x, ty, tx, d).permute(0, 1, 2, 4, 3, 5, 6).reshape(b, h, height, width, d)


def neighborhood_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: int
) -> torch.Tensor:
    """Neighbourhood attention, (B, heads, H, W, head_dim) -> (B, heads, H, W, head_dim).

    Runs the Triton kernels of `neighborhood_attention_triton` or the PyTorch reference, as
    `kernels.use_triton` says.
    """
    if use_triton(query, key, value):
        from .neighborhood_attention_triton import neighborhood_attention_triton  # on use: its kernels need Triton

        return neighborhood_attention_triton(query, key, value, kernel_size)
    return neighborhood_attention_torch(query, key, value, kernel_size)
