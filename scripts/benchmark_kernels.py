"""Benchmark the custom ops: the local grouping step and neighbourhood attention.

For each op and size, time (forward without autograd; forward + backward) and peak memory (forward +
backward, beyond the inputs) of
- `torch`: the PyTorch path the model uses off CUDA (`*_torch` in grouping.py / neighborhood_attention.py);
- `triton`: the Triton kernels (on CUDA only);
- `naive`: a dense-masked implementation (N_in x N_out logits with -inf outside each token's window),
  skipped where its estimated memory exceeds --naive-limit-gb;
with the ratios to the PyTorch path, and on a GPU the achieved fraction of the memory-bandwidth floor: the
bytes the op must move (read its inputs and write its outputs, forward and backward, once each) over the
time, against the GPU's peak bandwidth. Every implementation is first checked against the PyTorch path
(outputs and input gradients; the `err` column is the largest relative error).

Peak memory is that of tensors allocated during forward + backward and alive at once: on a GPU from
`torch.cuda.max_memory_allocated`, on a CPU from the allocation events of the PyTorch profiler.

    python scripts/benchmark_kernels.py                   # 64x64 and 128x128 tokens, C = 64/128, batch 1/8
    python scripts/benchmark_kernels.py --quick           # small sizes, under a minute on a laptop CPU
    python scripts/benchmark_kernels.py --grids 64x64 --channels 128 --batches 8 --ops grouping --threads 1
"""

import argparse
import contextlib
import itertools
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from native_seg_hf.models.grouping import NEIGHBOUR_OFFSETS, dense_grouping_step_torch, local_grouping_step_torch
from native_seg_hf.models.kernels import triton
from native_seg_hf.models.neighborhood_attention import neighborhood_attention_torch, window_starts

FULL_SIZES = ([(64, 64), (128, 128)], [64, 128], [1, 8])  # token grids, channels, batch sizes
QUICK_SIZES = ([(32, 32), (64, 64)], [64], [1, 2])
HEAD_DIM = 32  # every SeNaTra configuration uses 32 channels per head
KERNEL_SIZE = 7  # SeNaTra's default attention window


# --------------------------------------------------------------------------------------------------------
# Naive dense-masked implementations
# --------------------------------------------------------------------------------------------------------


def local_candidates(height: int, width: int, device):
    """For each input token (row-major): the flat index of its 9 candidate output tokens (clamped into the
    grid), whether each candidate really is in the grid, and the token's child index in its cell."""
    h, w = height // 2, width // 2
    offsets = torch.tensor(NEIGHBOUR_OFFSETS, device=device)
    ys = torch.arange(height, device=device)[:, None, None]
    xs = torch.arange(width, device=device)[None, :, None]
    cell_y, cell_x = ys // 2 + offsets[:, 0], xs // 2 + offsets[:, 1]  # (H, W, 9)
    valid = (cell_y >= 0) & (cell_y < h) & (cell_x >= 0) & (cell_x < w)
    index = cell_y.clamp(0, h - 1) * w + cell_x.clamp(0, w - 1)
    child = ((ys % 2) * 2 + xs % 2).expand(height, width, 1)
    return index.reshape(-1, 9), valid.reshape(-1, 9), child.reshape(-1)


def naive_local_grouping_step(keys, values, queries, bias):
    """The local step as the dense step with a bias of -inf outside each token's 9 candidates."""
    b, height, width, _ = keys.shape
    n_in, n_out = height * width, (height // 2) * (width // 2)
    index, valid, child = local_candidates(height, width, keys.device)
    rows = torch.arange(n_in, device=keys.device)[:, None].expand(-1, 9)
    dense_bias = bias.new_full((n_in, n_out), float("-inf")).index_put((rows[valid], index[valid]), bias[child][valid])
    update, dense_assignment = dense_grouping_step_torch(keys, values, queries, dense_bias)
    assignment = dense_assignment.reshape(b, n_in, n_out).gather(2, index.expand(b, -1, -1)) * valid
    return update, assignment.reshape(b, height, width, 9)


def naive_neighborhood_attention(query, key, value, kernel_size):
    """Neighbourhood attention as global attention with an (N, N) mask of the windows."""
    b, heads, height, width, d = query.shape

    def in_window(length):  # (queries, keys) along one axis
        positions = torch.arange(length, device=query.device)
        starts = window_starts(positions, length, kernel_size)[:, None]
        return (positions[None, :] >= starts) & (positions[None, :] < starts + min(kernel_size, length))

    rows, cols = in_window(height), in_window(width)
    mask = (rows[:, None, :, None] & cols[None, :, None, :]).reshape(height * width, height * width)
    flat = [t.reshape(b, heads, height * width, d) for t in (query, key, value)]
    return F.scaled_dot_product_attention(*flat, attn_mask=mask).reshape(query.shape)


# --------------------------------------------------------------------------------------------------------
# The ops and their sizes
# --------------------------------------------------------------------------------------------------------


def with_kernel_size(attention):
    """The attention function as a function of (q, k, v) only, returning a 1-tuple like the grouping step."""
    return lambda query, key, value: (attention(query, key, value, KERNEL_SIZE),)


@dataclass
class Case:
    op: str
    height: int
    width: int
    channels: int
    batch: int

    def input_shapes(self):
        b, hh, ww, c = self.batch, self.height, self.width, self.channels
        if self.op == "grouping":
            return [(b, hh, ww, c), (b, hh, ww, c), (b, hh // 2, ww // 2, c), (4, 9)]
        return [(b, c // HEAD_DIM, hh, ww, HEAD_DIM)] * 3

    def output_shapes(self):
        b, hh, ww, c = self.batch, self.height, self.width, self.channels
        if self.op == "grouping":
            return [(b, hh // 2, ww // 2, c), (b, hh, ww, 9)]
        return [(b, c // HEAD_DIM, hh, ww, HEAD_DIM)]

    def implementations(self, device):
        """name -> function of the inputs, returning a tuple of outputs."""
        if self.op == "grouping":
            impls = {"torch": local_grouping_step_torch, "naive": naive_local_grouping_step}
            if device == "cuda" and triton is not None:
                from native_seg_hf.models.grouping_triton import local_grouping_step_triton

                impls["triton"] = local_grouping_step_triton
            return impls
        impls = {"torch": neighborhood_attention_torch, "naive": naive_neighborhood_attention}
        if device == "cuda" and triton is not None:
            from native_seg_hf.models.neighborhood_attention_triton import neighborhood_attention_triton

            impls["triton"] = neighborhood_attention_triton
        return {name: with_kernel_size(attention) for name, attention in impls.items()}

    def bytes_floor(self, element_size: int) -> int:
        """Bytes forward + backward must move at least: inputs and outputs once each, then output gradients
        and input gradients once each (so twice the sum of input and output sizes)."""
        sizes = [torch.Size(s).numel() for s in self.input_shapes() + self.output_shapes()]
        return 2 * sum(sizes) * element_size

    def naive_bytes(self, element_size: int) -> int:
        """Rough peak of the naive implementation: a few dense (N_in x N_out) tensors (or (N x N) per head)."""
        n = self.height * self.width
        if self.op == "grouping":
            return 4 * self.batch * n * (n // 4) * element_size
        return 3 * self.batch * (self.channels // HEAD_DIM) * n * n * element_size

    def label(self) -> str:
        name = "local grouping" if self.op == "grouping" else f"NA k={KERNEL_SIZE}"
        return f"{name:15} {self.height}x{self.width:<4} C={self.channels:<4} B={self.batch:<2}"


# --------------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------------


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


@contextlib.contextmanager
def stderr_silenced():
    """Send file descriptor 2 to /dev/null: the profiler's C++ side logs every start and stop there."""
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class CpuPeakMemory:
    """Peak bytes of CPU tensors alive at once during a `with` block, beyond those alive at its start.

    Replays the allocation and free events the PyTorch profiler records (`profile_memory=True`) in order.
    """

    def __enter__(self):
        self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        with stderr_silenced():
            self._profiler.__enter__()
        return self

    def __exit__(self, *exc):
        with stderr_silenced():
            self._profiler.__exit__(*exc)
        events = [e for e in self._profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
        live = self.peak_bytes = 0
        for event in sorted(events, key=lambda e: e.start_ns()):
            live += event.nbytes()  # negative for a free
            self.peak_bytes = max(self.peak_bytes, live)


class CudaPeakMemory:
    """Peak allocated CUDA memory beyond what was allocated at the start of a `with` block."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.peak_bytes = torch.cuda.max_memory_allocated() - self.base


def peak_bandwidth(device) -> float | None:
    """Bytes per second of the GPU's memory (double data rate x bus width), None on a CPU."""
    if device != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8


def forward_backward(fn, inputs, output_grads):
    leaves = [x.detach().requires_grad_() for x in inputs]
    outputs = fn(*leaves)
    loss = sum((out * grad).sum() for out, grad in zip(outputs, output_grads))
    return [out.detach() for out in outputs] + list(torch.autograd.grad(loss, leaves))


def relative_error(result, reference) -> float:
    return ((result.double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-30)).item()


def measure(case: Case, device, dtype, repeats: int, naive_limit: float):
    """Rows (implementation, fwd ms, fwd+bwd ms, peak bytes, max relative error) of one case."""
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(s, generator=generator, dtype=dtype).to(device) for s in case.input_shapes()]
    output_grads = [torch.randn(s, generator=generator, dtype=dtype).to(device) for s in case.output_shapes()]
    peak_memory = CudaPeakMemory if device == "cuda" else CpuPeakMemory
    element_size = torch.finfo(dtype).bits // 8
    reference = None
    rows = []
    for name, fn in case.implementations(device).items():
        if name == "naive" and case.naive_bytes(element_size) > naive_limit:
            rows.append((name, None, None, None, None))
            continue
        results = forward_backward(fn, inputs, output_grads)  # also the warm-up (compilation, caches)
        if reference is None:
            reference = results
        error = max(relative_error(r, ref) for r, ref in zip(results, reference))
        with torch.no_grad():
            forward_ms = median_ms(lambda: fn(*inputs), device, repeats)
        train_ms = median_ms(lambda: forward_backward(fn, inputs, output_grads), device, repeats)
        with peak_memory() as memory:
            forward_backward(fn, inputs, output_grads)
        rows.append((name, forward_ms, train_ms, memory.peak_bytes, error))
        del results
    return rows


def format_rows(case: Case, rows, bandwidth, element_size) -> list[str]:
    torch_row = rows[0]
    lines = []
    for name, forward_ms, train_ms, peak, error in rows:
        if forward_ms is None:
            lines.append(f"{case.label()} {name:6} skipped: needs ~{case.naive_bytes(element_size) / 2**30:.0f} GiB")
            continue
        line = (
            f"{case.label()} {name:6} {forward_ms:9.2f} {train_ms:10.2f} {peak / 2**20:9.1f}"
            f" {torch_row[2] / train_ms:8.2f}x {peak / torch_row[3]:8.2f}x {error:8.1e}"
        )
        if bandwidth:
            achieved = case.bytes_floor(element_size) / (train_ms * 1e-3)
            line += f" {achieved / 1e9:8.0f} {achieved / bandwidth:7.0%}"
        lines.append(line)
    return lines


def parse_grid(text: str) -> tuple[int, int]:
    height, width = text.lower().split("x")
    return int(height), int(width)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", choices=["grouping", "attention"], default=["grouping", "attention"])
    parser.add_argument("--grids", nargs="+", type=parse_grid, help="token grids HxW (default 64x64 128x128)")
    parser.add_argument("--channels", nargs="+", type=int, help="token width C (default 64 128)")
    parser.add_argument("--batches", nargs="+", type=int, help="batch sizes (default 1 8)")
    parser.add_argument("--quick", action="store_true", help="small sizes: 32x32 and 64x64 tokens, C=64, batch 1/2")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--naive-limit-gb", type=float, default=8.0, help="skip naive runs needing more memory")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, help="CPU threads (1 gives steady figures on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = QUICK_SIZES if args.quick else FULL_SIZES
    grids, channels, batches = args.grids or defaults[0], args.channels or defaults[1], args.batches or defaults[2]

    dtype = torch.float32
    element_size = torch.finfo(dtype).bits // 8
    bandwidth = peak_bandwidth(args.device)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"# {where}, torch {torch.__version__}, triton {triton.__version__ if triton else 'not installed'}, fp32")
    print("# fwd: forward without autograd; fwd+bwd: forward and backward; peak: fwd+bwd memory beyond inputs;")
    print("# speedup: torch-path time / this time; memory: this peak / torch-path peak;")
    print("# err: largest relative error of outputs and input gradients against the torch path")
    header = f"{'op':15} {'grid':9} {'C':6} {'B':4} {'impl':6} {'fwd ms':>9} {'fwd+bwd ms':>10} {'peak MiB':>9}"
    header += f" {'speedup':>9} {'memory':>9} {'err':>8}"
    if bandwidth:
        header += f" {'GB/s':>8} {'of peak':>7}"
    print(header)
    for op, grid, c, b in itertools.product(args.ops, grids, channels, batches):
        case = Case(op, *grid, c, b)
        rows = measure(case, args.device, dtype, args.repeats, args.naive_limit_gb * 2**30)
        print("\n".join(format_rows(case, rows, bandwidth, element_size)), flush=True)


if __name__ == "__main__":
    main()
