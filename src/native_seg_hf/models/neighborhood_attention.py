"""2D neighbourhood attention (NAT semantics): the PyTorch reference and the dispatcher.

Every query at (y, x) attends to the `kernel_size x kernel_size` keys of a window centred on it; near the
borders the window is shifted inside the grid (so every query always sees kernel_size**2 keys), as in NAT.
Along an axis no longer than the kernel the window is the whole axis, so a grid no larger than the kernel
is global attention.

The PyTorch path is tiled: queries are cut into tiles, each tile takes the keys of the region around it (tile side
plus kernel - 1 along each axis), and one masked attention (matmul, softmax, matmul) runs over all tiles with an
additive mask of every query's window. Memory is linear in the number of tokens (about
((tile + kernel - 1) / tile)**2 copies of K and V, plus tile**2 x (tile + kernel - 1)**2 scores per tile), and the
matmuls are dense, which is what makes this fast on a CPU. The key regions are made in one of two ways:

- Views (eager, when a tile side of at least `tile` and at most twice it divides each axis): K and V are copied
  once into column strips (region-wide, 2.5x the tensor for tile 4 and kernel 7) laid end to end, and every tile's
  region is a strided view into them at a fixed step, so the matmuls read the regions without a gather. Keys
  of a region outside the grid read the neighbouring strip (or zero padding): they are never in a window.
- Gather (any grid size, and always while exporting): the grid is zero-padded by a constant, every region is moved
  inside the grid at the borders and gathered in one `F.embedding` copy. Nothing in it branches on the grid's size,
  so one exported graph (torch.export, ONNX) serves every input size; the views need the axis divisible by the
  tile, which an exported graph with dynamic height and width cannot assume.

Both compute the same function (tested against a dense masked reference); on this CPU the views are 1.3-1.8x
faster at the Tiny model's grids (512x512 input), and the gather moved 6.25x the tensor per K and V where the
strips move 2.5x. Grids of at most `DENSE_MAX_TOKENS` tokens run as one dense masked attention instead: on a CPU
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
    # min(kernel_size, length) and the clamp as tensor ops: no branch on the length while tracing with symbolic sizes.
    kernel = torch.full_like(positions, kernel_size).clamp(max=length)
    return torch.minimum((positions - kernel // 2).clamp(min=0), length - kernel)


def _window_mask_1d(queries: torch.Tensor, keys: torch.Tensor, length: int, kernel_size: int) -> torch.Tensor:
    """(..., n_queries, n_keys) bool: key index inside the window of the query index (padding never is)."""
    starts = window_starts(queries, length, kernel_size)[..., :, None]
    kernel = torch.full_like(starts, kernel_size).clamp(max=length)
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


def _axis_tiling(length: int, kernel_size: int, tile: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiles along one axis: the key indices each tile reads, (n_tiles, region), and which of them lie in the window
    of each of the tile's queries, (n_tiles, tile, region) bool; region = tile + kernel - 1.

    A tile starting at s reads [s - kernel // 2, s + tile + kernel // 2), moved inside [0, max(length, region)) at the
    borders: that holds the border-shifted window of every query of the tile, and of the padding queries past the
    axis' end (the window of its last position), so no softmax row is empty. Indices past the axis hit zero padding
    and are never in a window.
    """
    region = tile + 2 * (kernel_size // 2)
    # length // tile + 1 tiles (one of padding only when the tile divides the axis) and the bounds below as tensor
    # ops: plain expressions of the length keep tracing with symbolic sizes (torch.export, ONNX) fast.
    tiles = torch.arange(length // tile + 1, device=device) * tile
    last_start = (torch.arange(1, device=device) + (length - region)).clamp(min=0)  # max(length - region, 0)
    starts = torch.minimum((tiles - kernel_size // 2).clamp(min=0), last_start)
    queries = tiles[:, None] + torch.arange(tile, device=device)
    keys = starts[:, None] + torch.arange(region, device=device)
    return keys, _window_mask_1d(queries, keys, length, kernel_size)


@_cached_outside_tracing
def _tiling(height: int, width: int, kernel_size: int, tile: int, device, dtype):
    """The keys every tile reads, as indices into the flattened grid zero-padded to at least a region along each axis,
    (n_y * n_x * region_y * region_x,) in tile-major order, and the additive mask of their windows,
    (n_y, n_x, tile * tile, region_y * region_x): 0 inside a query's window, -inf outside."""
    rows, mask_rows = _axis_tiling(height, kernel_size, tile, device)
    cols, mask_cols = _axis_tiling(width, kernel_size, tile, device)
    index = (rows[:, None, :, None] * (width + cols.shape[1]) + cols[None, :, None, :]).flatten()
    mask = mask_rows[:, None, :, None, :, None] & mask_cols[None, :, None, :, None, :]
    mask = mask.reshape(mask_rows.shape[0], mask_cols.shape[0], tile * tile, -1)
    return index, torch.zeros(mask.shape, device=device, dtype=dtype).masked_fill_(~mask, float("-inf"))


def _query_tiles(x: torch.Tensor, tile: int) -> torch.Tensor:
    """(B, h, H, W, d) -> (B, h, n_y, n_x, tile * tile, d), the grid zero-padded to whole tiles."""
    b, h, height, width, d = x.shape
    x = F.pad(x, (0, 0, 0, tile, 0, tile))  # whole tiles, as many as `_axis_tiling` makes
    blocks = x.unfold(2, tile, tile).unfold(3, tile, tile)  # (B, h, n_y, n_x, d, tile, tile)
    return blocks.permute(0, 1, 2, 3, 5, 6, 4).reshape(b, h, blocks.shape[2], blocks.shape[3], -1, d)


def _key_regions(x: torch.Tensor, index: torch.Tensor, region_side: int, tiles: tuple[int, int]) -> torch.Tensor:
    """(B, h, H, W, d) -> (B, h, n_y, n_x, region_side**2, d): the keys each tile reads (`index` from `_tiling`,
    `tiles` = (n_y, n_x)), gathered in one copy as rows of d channels with `F.embedding`, the fastest gather on a CPU
    (several times faster than `index_select` along a middle dimension)."""
    b, h, height, width, d = x.shape
    x = F.pad(x, (0, 0, 0, region_side, 0, region_side)).reshape(b * h, -1, d)  # (B * h, positions, d)
    rows = (torch.arange(b * h, device=x.device)[:, None] * x.shape[1] + index).flatten()
    return F.embedding(rows, x.reshape(-1, d)).reshape(b, h, *tiles, region_side * region_side, d)


def view_tile_side(length: int, kernel_size: int, tile: int) -> int | None:
    """Side of the view tiles along an axis: the smallest divisor of `length` in [max(tile, kernel // 2 + 1),
    2 * tile] (a tile must be wider than a window's half for its region to hold the border-shifted windows of its
    last queries), or None when there is none (that grid takes the gather)."""
    low = max(tile, kernel_size // 2 + 1)
    return next((side for side in range(low, max(2 * tile, low) + 1) if length % side == 0), None)


@_cached_outside_tracing
def _view_bias(height: int, width: int, kernel_size: int, tile_y: int, tile_x: int, device, dtype):
    """Additive window mask of the view tiles, (n_x * n_y, tile_y * tile_x, region_y * region_x), tiles in
    column-major order (the order of `_key_strips`), or None if some window does not lie inside its tile's region
    (grids smaller than the kernel can be tiled so): then the grid takes the gather."""
    pad = kernel_size // 2

    def axis(length, side):  # (n, side, side + 2 pad): region [start - pad, start + side + pad) of each tile
        starts = torch.arange(0, length, side, device=device)[:, None]
        queries = starts + torch.arange(side, device=device)
        return _window_mask_1d(queries, starts - pad + torch.arange(side + 2 * pad, device=device), length, kernel_size)

    mask_rows, mask_cols = axis(height, tile_y), axis(width, tile_x)
    mask = mask_cols[:, None, None, :, None, :] & mask_rows[None, :, :, None, :, None]  # (n_x, n_y, ty, tx, ry, rx)
    mask = mask.reshape(mask_cols.shape[0] * mask_rows.shape[0], tile_y * tile_x, -1)
    if not bool((mask.sum(-1) == min(kernel_size, height) * min(kernel_size, width)).all()):
        return None
    return torch.zeros(mask.shape, device=device, dtype=dtype).masked_fill_(~mask, float("-inf"))


def _key_strips(x: torch.Tensor, tile_y: int, tile_x: int, pad: int) -> torch.Tensor:
    """(B, h, H, W, d) -> (B * h, n_x * n_y, region_y * region_x, d): every view tile's key region, as a strided view.

    One copy puts the grid's column strips [start - pad, start + tile_x + pad) (zero outside the grid) end to end,
    each strip H rows of region_x keys; a tile's region is then region_y consecutive rows of its strip, starting
    `pad` rows above the tile, so consecutive tiles (down a strip, then across strips) sit tile_y rows apart. Rows
    above a strip's first or below its last row belong to the neighbouring strip or to `pad` rows of zeros at the
    two ends of the buffer: outside the grid, so never in a window."""
    b, h, height, width, d = x.shape
    region_y, region_x = tile_y + 2 * pad, tile_x + 2 * pad
    n_x = width // tile_x
    strips = F.pad(x, (0, 0, pad, pad)).unfold(3, region_x, tile_x)  # (B, h, H, n_x, d, region_x)
    margin = pad * region_x * d
    buffer = x.new_empty(2 * margin + b * h * n_x * height * region_x * d)
    buffer[:margin].zero_()
    buffer[buffer.shape[0] - margin :].zero_()
    buffer[margin : buffer.shape[0] - margin].view(b, h, n_x, height, region_x, d).copy_(strips.permute(0, 1, 3, 2, 5, 4))
    size = (b * h, n_x * (height // tile_y), region_y * region_x, d)
    return buffer.as_strided(size, (n_x * height * region_x * d, tile_y * region_x * d, d, 1))


def _attend_view_tiles(query, key, value, kernel_size: int, tile_y: int, tile_x: int, bias) -> torch.Tensor:
    """Tiled neighbourhood attention over key regions made by `_key_strips`; (B, h, H, W, d) as in
    `neighborhood_attention_torch`, returned as a view of a (B, H, W, h, d) tensor (what attention layers project)."""
    b, h, height, width, d = query.shape
    n_y, n_x = height // tile_y, width // tile_x
    tiles = query.reshape(b * h, n_y, tile_y, n_x, tile_x, d).permute(0, 3, 1, 2, 4, 5)
    tiles = tiles.reshape(b * h, n_x * n_y, tile_y * tile_x, d)
    pad = kernel_size // 2
    # The scale applied to the scores as they meet the mask (one op for both).
    scores = torch.add(bias, tiles @ _key_strips(key, tile_y, tile_x, pad).transpose(-1, -2), alpha=d**-0.5)
    out = scores.softmax(dim=-1) @ _key_strips(value, tile_y, tile_x, pad)  # (B * h, n_x * n_y, ty * tx, d)
    out = out.view(b, h, n_x, n_y, tile_y, tile_x, d).permute(0, 3, 4, 2, 5, 1, 6).reshape(b, height, width, h, d)
    return out.permute(0, 3, 1, 2, 4)


def _attend_gathered_tiles(query, key, value, kernel_size: int, tile: int) -> torch.Tensor:
    """Tiled neighbourhood attention over key regions gathered by `_key_regions` (any grid size, no branch on it)."""
    b, h, height, width, d = query.shape
    index, bias = _tiling(height, width, kernel_size, tile, query.device, query.dtype)
    n_y, n_x = bias.shape[:2]
    region_side = tile + 2 * (kernel_size // 2)
    # Plain matmul-softmax-matmul with an additive mask: on a CPU this is 1.5-2x faster than
    # scaled_dot_product_attention with a boolean mask (which checks and converts the mask on every call).
    keys = _key_regions(key, index, region_side, (n_y, n_x))
    scores = (_query_tiles(query, tile) * d**-0.5) @ keys.transpose(-1, -2)
    values = _key_regions(value, index, region_side, (n_y, n_x))
    out = (scores + bias).softmax(dim=-1) @ values  # (B, h, n_y, n_x, tile * tile, d)
    out = out.reshape(b, h, n_y, n_x, tile, tile, d).permute(0, 1, 2, 4, 3, 5, 6)
    return out.reshape(b, h, n_y * tile, n_x * tile, d)[:, :, :height, :width]


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
        tile: side of the query tiles (the view tiles' smallest side); dense_max_tokens: largest grid attended in
            one dense masked call. Both are speed/memory knobs: the result does not depend on them.

    Returns:
        (B, heads, H, W, head_dim).
    """
    b, h, height, width, d = query.shape
    if height * width <= dense_max_tokens:
        flat = [t.reshape(b, h, height * width, d) for t in (query, key, value)]
        mask = _dense_mask(height, width, kernel_size, query.device)
        return F.scaled_dot_product_attention(*flat, attn_mask=mask).reshape(b, h, height, width, d)
    if not torch.compiler.is_exporting():
        tile_y, tile_x = view_tile_side(height, kernel_size, tile), view_tile_side(width, kernel_size, tile)
        if tile_y is not None and tile_x is not None:
            bias = _view_bias(height, width, kernel_size, tile_y, tile_x, query.device, query.dtype)
            if bias is not None:
                return _attend_view_tiles(query, key, value, kernel_size, tile_y, tile_x, bias)
    return _attend_gathered_tiles(query, key, value, kernel_size, tile)


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
