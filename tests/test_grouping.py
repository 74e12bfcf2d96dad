"""The grouping ops and neighbourhood attention against dense reference implementations written here."""

import pytest
import torch
import torch.nn.functional as F

from native_seg_hf.models.configuration_senatra import UNIFORM_UPSAMPLING
from native_seg_hf.models.grouping import (
    NEIGHBOUR_OFFSETS,
    UNIFORM_ASSIGNMENTS,
    bilinear_assignment,
    dense_grouping_step_torch,
    downsample,
    gather_neighbours,
    hard_segments,
    local_grouping_step_torch,
    parent_assignment,
    scatter_neighbours,
    upsample,
    upsample_through,
)
from native_seg_hf.models import neighborhood_attention as na_module
from native_seg_hf.models.neighborhood_attention import neighborhood_attention_torch, window_starts


def local_to_dense(assignment: torch.Tensor) -> torch.Tensor:
    """Expand a local assignment (B, H, W, 9) into the dense (B, H*W, H/2*W/2) matrix, by explicit loops."""
    b, height, width, _ = assignment.shape
    h, w = height // 2, width // 2
    dense = torch.zeros(b, height * width, h * w, dtype=assignment.dtype)
    for y in range(height):
        for x in range(width):
            for j, (dy, dx) in enumerate(NEIGHBOUR_OFFSETS):
                oy, ox = y // 2 + dy, x // 2 + dx
                if 0 <= oy < h and 0 <= ox < w:
                    dense[:, y * width + x, oy * w + ox] = assignment[:, y, x, j]
    return dense


def local_mask(height: int, width: int) -> torch.Tensor:
    """(H*W, H/2*W/2) bool: output tokens within the 3x3 cells around each input token's parent cell."""
    yi = torch.arange(height).repeat_interleave(width)
    xi = torch.arange(width).repeat(height)
    h, w = height // 2, width // 2
    yo = torch.arange(h).repeat_interleave(w)
    xo = torch.arange(w).repeat(h)
    return ((yi[:, None] // 2 - yo[None]).abs() <= 1) & ((xi[:, None] // 2 - xo[None]).abs() <= 1)


def local_bias_dense(bias: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The (4, 9) local bias laid out on the dense (H*W, N_out) matrix (zero outside the window)."""
    b = torch.zeros(height * width, (height // 2) * (width // 2), dtype=bias.dtype)
    w = width // 2
    for y in range(height):
        for x in range(width):
            child = (y % 2) * 2 + x % 2
            for j, (dy, dx) in enumerate(NEIGHBOUR_OFFSETS):
                oy, ox = y // 2 + dy, x // 2 + dx
                if 0 <= oy < height // 2 and 0 <= ox < w:
                    b[y * width + x, oy * w + ox] = bias[child, j]
    return b


def dense_masked_reference(keys, values, queries, bias_dense, mask):
    """The brief's dense-masked grouping step: logits + bias + mask, row softmax, column-normalised update."""
    b, height, width, d = keys.shape
    h, w = queries.shape[1:3]
    logits = keys.reshape(b, -1, d) @ queries.reshape(b, -1, d).transpose(1, 2) + bias_dense
    logits = logits.masked_fill(~mask, float("-inf"))
    a_ups = logits.softmax(-1)
    a_down = a_ups / a_ups.sum(1, keepdim=True)
    update = a_down.transpose(1, 2) @ values.reshape(b, -1, d)
    return update.reshape(b, h, w, d), a_ups


@pytest.mark.parametrize("size", [(2, 4), (6, 10), (8, 8), (10, 4)])
def test_local_step_equals_dense_masked_reference(size):
    torch.manual_seed(0)
    height, width = size
    b, d = 2, 5
    keys, values = torch.randn(b, height, width, d), torch.randn(b, height, width, d)
    queries = torch.randn(b, height // 2, width // 2, d)
    bias = torch.randn(4, 9)
    update, assignment = local_grouping_step_torch(keys, values, queries, bias)
    ref_update, ref_ups = dense_masked_reference(
        keys, values, queries, local_bias_dense(bias, height, width), local_mask(height, width)
    )
    assert torch.allclose(update, ref_update, atol=1e-5)
    assert torch.allclose(local_to_dense(assignment), ref_ups, atol=1e-5)


def test_local_assignment_sparsity_and_stochasticity():
    torch.manual_seed(1)
    keys = torch.randn(1, 12, 8, 4)
    _, assignment = local_grouping_step_torch(keys, keys, torch.randn(1, 6, 4, 4), torch.zeros(4, 9))
    dense = local_to_dense(assignment)
    assert (dense != 0).sum(-1).max() <= 9
    assert not (dense.bool() & ~local_mask(12, 8)).any(), "weight outside the 3x3 cells around the parent"
    assert torch.allclose(dense.sum(-1), torch.ones(1, 96), atol=1e-6)
    assert torch.allclose(assignment.sum(-1), torch.ones(1, 12, 8), atol=1e-6)


def test_dense_step_matches_reference_without_mask():
    torch.manual_seed(2)
    keys, values, queries = torch.randn(2, 6, 4, 3), torch.randn(2, 6, 4, 3), torch.randn(2, 3, 2, 3)
    bias = torch.randn(24, 6)
    update, assignment = dense_grouping_step_torch(keys, values, queries, bias)
    ref_update, ref_ups = dense_masked_reference(keys, values, queries, bias, torch.ones(24, 6, dtype=torch.bool))
    assert torch.allclose(update, ref_update, atol=1e-5)
    assert torch.allclose(assignment.reshape(2, 24, 6), ref_ups, atol=1e-6)


def test_scatter_is_adjoint_of_gather():
    torch.manual_seed(3)
    y, z = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 9, 4)
    assert torch.allclose((gather_neighbours(y) * z).sum(), (y * scatter_neighbours(z)).sum(), atol=1e-5)


@pytest.mark.parametrize("kind", ["local", "dense"])
def test_upsample_and_downsample_match_dense_matrices(kind):
    torch.manual_seed(4)
    height, width = 6, 8
    if kind == "local":
        keys = torch.randn(1, height, width, 3)
        _, assignment = local_grouping_step_torch(keys, keys, torch.randn(1, 3, 4, 3), torch.zeros(4, 9))
        matrix = local_to_dense(assignment)
    else:
        assignment = torch.randn(1, height, width, 12).softmax(-1)
        matrix = assignment.reshape(1, 48, 12)
    coarse, fine = torch.randn(1, 3, 4, 7), torch.randn(1, height, width, 7)
    assert torch.allclose(upsample(coarse, assignment, kind).reshape(1, 48, 7), matrix @ coarse.reshape(1, 12, 7), atol=1e-5)
    a_down = matrix / matrix.sum(1, keepdim=True)
    assert torch.allclose(a_down.sum(1), torch.ones(1, 12), atol=1e-5)  # columns of A_down sum to 1
    expected = a_down.transpose(1, 2) @ fine.reshape(1, 48, 7)
    assert torch.allclose(downsample(fine, assignment, kind).reshape(1, 12, 7), expected, atol=1e-5)


def test_parent_assignment_is_nearest_unpooling():
    coarse = torch.randn(2, 3, 4, 5)
    up = upsample(coarse, parent_assignment(2, 6, 8), "none")
    assert torch.equal(up, coarse.repeat_interleave(2, 1).repeat_interleave(2, 2))


@pytest.mark.parametrize("height, width", [(6, 8), (2, 2), (10, 4), (4, 14)])
def test_bilinear_assignment_is_bilinear_interpolation(height, width):
    """`upsample` through it is F.interpolate's 2x bilinear (align_corners=False, edges replicated), its rows
    are distributions, and its largest weight is the parent cell's (its hard segments are the grid)."""
    coarse = torch.randn(2, height // 2, width // 2, 5, dtype=torch.float64)
    assignment = bilinear_assignment(2, height, width, dtype=torch.float64)
    expected = F.interpolate(coarse.permute(0, 3, 1, 2), scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(upsample(coarse, assignment, "none"), expected.permute(0, 2, 3, 1))
    torch.testing.assert_close(assignment.sum(-1), torch.ones(2, height, width, dtype=torch.float64))
    assert torch.equal(assignment.argmax(-1), parent_assignment(2, height, width).argmax(-1))
    # The config accepts exactly the un-poolings the model knows.
    assert set(UNIFORM_UPSAMPLING) == set(UNIFORM_ASSIGNMENTS)


def test_composed_chain_is_row_stochastic_and_hard_segments_are_its_argmax():
    torch.manual_seed(5)
    kinds = ["local", "local", "dense"]
    grids = [(16, 12), (8, 6), (4, 3)]
    assignments = []
    for (height, width), kind in zip(grids, kinds):
        keys = torch.randn(2, height, width, 4)
        queries = torch.randn(2, height // 2, width // 2, 4)
        step = local_grouping_step_torch if kind == "local" else dense_grouping_step_torch
        bias = torch.zeros(4, 9) if kind == "local" else torch.zeros(height * width, (height // 2) * (width // 2))
        assignments.append(step(keys, keys, queries, bias)[1])
    n_groups = 2 * 1
    identity = torch.eye(n_groups).reshape(1, 2, 1, n_groups).expand(2, -1, -1, -1)
    composed = upsample_through(identity, assignments, kinds)  # (B, 16, 12, n_groups)
    assert torch.allclose(composed.sum(-1), torch.ones(2, 16, 12), atol=1e-5)
    segments = hard_segments(assignments, kinds, chunk_size=1)  # chunking must not change the answer
    assert torch.equal(segments, composed.argmax(-1))


def dense_neighbourhood_reference(q, k, v, kernel_size):
    b, h, height, width, d = q.shape
    ys, xs = torch.arange(height), torch.arange(width)
    sy, sx = window_starts(ys, height, kernel_size), window_starts(xs, width, kernel_size)
    ky, kx = min(kernel_size, height), min(kernel_size, width)
    my = (ys[None] >= sy[:, None]) & (ys[None] < sy[:, None] + ky)
    mx = (xs[None] >= sx[:, None]) & (xs[None] < sx[:, None] + kx)
    mask = (my[:, None, :, None] & mx[None, :, None, :]).reshape(height * width, height * width)
    flat = [t.reshape(b, h, -1, d) for t in (q, k, v)]
    return F.scaled_dot_product_attention(*flat, attn_mask=mask).reshape(q.shape)


@pytest.mark.parametrize(
    "height,width,kernel,tile",
    [(13, 21, 7, 8), (7, 7, 7, 8), (5, 30, 7, 8), (9, 17, 3, 4), (16, 16, 7, 16), (3, 3, 5, 8), (26, 12, 7, 8),
     (24, 40, 5, 4), (12, 6, 11, 8)],
)
@pytest.mark.parametrize("dense_max_tokens", [0, 10_000])  # the tiled path, and one dense masked call
def test_neighborhood_attention_equals_dense_masked_reference(height, width, kernel, tile, dense_max_tokens):
    torch.manual_seed(6)
    q, k, v = (torch.randn(2, 3, height, width, 8, dtype=torch.float64) for _ in range(3))
    out = neighborhood_attention_torch(q, k, v, kernel, tile=tile, dense_max_tokens=dense_max_tokens)
    assert torch.allclose(out, dense_neighbourhood_reference(q, k, v, kernel), atol=1e-10)


def test_neighborhood_attention_gradients_match_reference():
    torch.manual_seed(7)
    q, k, v = (torch.randn(1, 2, 19, 10, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = neighborhood_attention_torch(q, k, v, 5, tile=4, dense_max_tokens=0)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = dense_neighbourhood_reference(q, k, v, 5)
    for g, r in zip(grads, torch.autograd.grad(ref.square().sum(), (q, k, v))):
        assert torch.allclose(g, r, atol=1e-10)


NEIGHBOURHOOD_GRIDS = [(13, 21, 7, 8), (7, 7, 7, 8), (5, 30, 7, 8), (9, 17, 3, 4), (16, 16, 7, 16), (3, 3, 5, 8),
                       (26, 12, 7, 8), (24, 40, 5, 4), (12, 6, 11, 8), (32, 32, 7, 4), (12, 20, 7, 4), (30, 15, 7, 4)]


@pytest.mark.parametrize("height,width,kernel,tile", NEIGHBOURHOOD_GRIDS)
def test_neighborhood_attention_key_region_forms_equal_dense_masked_reference(height, width, kernel, tile):
    # The two ways of making key regions separately: strided views of column strips (eager, axes divisible by a
    # tile side) and the branch-free gather (every grid; the only form while exporting).
    torch.manual_seed(6)
    q, k, v = (torch.randn(2, 3, height, width, 8, dtype=torch.float64) for _ in range(3))
    ref = dense_neighbourhood_reference(q, k, v, kernel)
    assert torch.allclose(na_module._attend_gathered_tiles(q, k, v, kernel, tile), ref, atol=1e-10)
    tile_y, tile_x = (na_module.view_tile_side(n, kernel, tile) for n in (height, width))
    if tile_y is not None and tile_x is not None:
        bias = na_module._view_bias(height, width, kernel, tile_y, tile_x, q.device, q.dtype)
        if bias is not None:
            assert torch.allclose(na_module._attend_view_tiles(q, k, v, kernel, tile_y, tile_x, bias), ref, atol=1e-10)


def test_neighborhood_attention_takes_views_in_eager_and_the_gather_while_exporting(monkeypatch):
    torch.manual_seed(8)
    q, k, v = (torch.randn(1, 2, 32, 32, 8, dtype=torch.float64) for _ in range(3))
    calls = []
    for name in ("_attend_view_tiles", "_attend_gathered_tiles"):
        original = getattr(na_module, name)
        monkeypatch.setattr(na_module, name, lambda *args, _f=original, _n=name: calls.append(_n) or _f(*args))
    eager = neighborhood_attention_torch(q, k, v, 7)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    exporting = neighborhood_attention_torch(q, k, v, 7)
    assert calls == ["_attend_view_tiles", "_attend_gathered_tiles"]
    assert torch.allclose(eager, exporting, atol=1e-12)


def test_neighborhood_attention_view_tiles_gradients_match_reference():
    torch.manual_seed(9)
    q, k, v = (torch.randn(2, 2, 12, 20, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = na_module._view_bias(12, 20, 7, 4, 4, q.device, q.dtype)
    out = na_module._attend_view_tiles(q, k, v, 7, 4, 4, bias)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = dense_neighbourhood_reference(q, k, v, 7)
    for g, r in zip(grads, torch.autograd.grad(ref.square().sum(), (q, k, v))):
        assert torch.allclose(g, r, atol=1e-10)


def test_neighborhood_attention_windows_shift_inside_at_borders():
    # At a corner the window is the top-left kernel x kernel block, not a truncated one.
    starts = window_starts(torch.arange(10), 10, 7)
    assert starts.tolist() == [0, 0, 0, 0, 1, 2, 3, 3, 3, 3]
