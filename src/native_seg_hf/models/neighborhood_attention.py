"""2D neighbourhood attention (NAT semantics): the PyTorch reference and the dispatcher.

Every query at (y, x) attends to the `kernel_size x kernel_size` keys of a window centred on it; near the
borders the window is shifted inside the grid (so every query always sees kernel_size**2 keys), as in NAT.
Along an axis no longer than the kernel the window is the whole axis, so a grid no larger than the kernel
is global attention.

The computation is tiled: queries are cut into `tile x tile` blocks, each block gathers the
`(tile + kernel - 1)**2` keys that cover the windows of all its queries, and one masked
`scaled_dot_product_attention` call runs over all blocks. Memory is linear in the number of tokens (about
((tile + kernel - 1) / tile)**2 copies of K and V, plus tile**2 x (tile + kernel - 1)**2 scores per block),
and the matmuls are dense, which is what makes this fast on a CPU.
"""

import torch
import torch.nn.functional as F

from .kernels import use_triton


def window_starts(positions: torch.Tensor, length: int, kernel_size: int) -> torch.Tensor:
    """First key index of the (border-shifted) window of each query position along one axis."""
    kernel = min(kernel_size, length)
    return (positions - kernel // 2).clamp(0, length - kernel)


def _axis_tiles(length: int, kernel_size: int, tile: int, device):
    """Query indices (n, t), key indices (n, r) and the window mask (n, t, r) of the tiles along one axis.

    Query indices past the end are clamped to the last query: those rows are computed and then cropped.
    """
    kernel = min(kernel_size, length)
    tile = min(tile, length)
    n_tiles = -(-length // tile)
    tile_starts = torch.arange(n_tiles, device=device) * tile
    queries = (tile_starts[:, None] + torch.arange(tile, device=device)).clamp(max=length - 1)
    region = min(tile + kernel - 1, length)
    # The region [s, s + region) contains the window of every query of the tile (windows are monotone).
    region_starts = (tile_starts - kernel // 2).clamp(0, length - region)
    keys = region_starts[:, None] + torch.arange(region, device=device)
    starts = window_starts(queries, length, kernel)
    mask = (keys[:, None, :] >= starts[:, :, None]) & (keys[:, None, :] < starts[:, :, None] + kernel)
    return queries, keys, mask


def _gather_2d(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """x (B, h, H, W, d) -> (B, h, n_rows, n_cols, rows.shape[1] * cols.shape[1], d) blocks of rows x cols."""
    b, h, _, _, d = x.shape
    blocks = x[:, :, rows][:, :, :, :, cols]  # (B, h, nr, tr, nc, tc, d)
    return blocks.permute(0, 1, 2, 4, 3, 5, 6).reshape(b, h, rows.shape[0], cols.shape[0], -1, d)


def neighborhood_attention_torch(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: int, tile: int = 8
) -> torch.Tensor:
    """Neighbourhood attention over a 2D grid.

    Args:
        query, key, value: (B, heads, H, W, head_dim); the query is not pre-scaled.
        kernel_size: odd window side.
        tile: side of the query blocks (a speed/memory knob; the result does not depend on it).

    Returns:
        (B, heads, H, W, head_dim).
    """
    b, h, height, width, d = query.shape
    if height <= kernel_size and width <= kernel_size:
        out = F.scaled_dot_product_attention(
            query.reshape(b, h, -1, d), key.reshape(b, h, -1, d), value.reshape(b, h, -1, d)
        )
        return out.reshape(b, h, height, width, d)

    q_rows, k_rows, mask_rows = _axis_tiles(height, kernel_size, tile, query.device)
    q_cols, k_cols, mask_cols = _axis_tiles(width, kernel_size, tile, query.device)
    q = _gather_2d(query, q_rows, q_cols)
    k = _gather_2d(key, k_rows, k_cols)
    v = _gather_2d(value, k_rows, k_cols)
    # mask[ty, tx, (a, b), (c, e)] = mask_rows[ty, a, c] & mask_cols[tx, b, e]
    mask = mask_rows[:, None, :, None, :, None] & mask_cols[None, :, None, :, None, :]
    mask = mask.reshape(q_rows.shape[0], q_cols.shape[0], q.shape[-2], k.shape[-2])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, nty, ntx, ty*tx, d)

    nty, ntx = q_rows.shape[0], q_cols.shape[0]
    ty, tx = q_rows.shape[1], q_cols.shape[1]
    out = out.reshape(b, h, nty, ntx, ty, tx, d).permute(0, 1, 2, 4, 3, 5, 6).reshape(b, h, nty * ty, ntx * tx, d)
    return out[:, :, :height, :width]


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
