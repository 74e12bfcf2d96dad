"""Which implementation of a custom op runs: the kernel dispatch contract of DESIGN.md.

Every custom op (the local grouping step, neighbourhood attention) has a Triton path and a pure-PyTorch path
computing the same function. The Triton path runs on CUDA tensors when Triton is importable, the PyTorch
path everywhere else; `NATIVE_SEG_KERNELS=torch|triton` forces one. Forcing Triton on CPU tensors works only
under Triton's interpreter (`TRITON_INTERPRET=1`, set before the kernels are defined), which is how the
kernels are tested on machines without a GPU.

This is the one module that imports Triton. The import sits in a `try` block so that the package, and a
saved model loaded as remote code, import where Triton is missing (Transformers' remote-code import check
skips `try` blocks).
"""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

KERNELS_ENV = "NATIVE_SEG_KERNELS"
BACKENDS = ("torch", "triton")


def triton_interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1).

    Triton reads the variable when a kernel module is imported, so it must be set before the first Triton
    path runs; in practice, before Python starts.
    """
    return triton is not None and bool(triton.knobs.runtime.interpret)


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op on `tensors` runs its Triton path (see the module docstring for the rule)."""
    forced = os.environ.get(KERNELS_ENV, "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f"{KERNELS_ENV}={forced!r}: expected one of {BACKENDS}")
    on_cuda = all(t.is_cuda for t in tensors)
    if forced == "torch":
        return False
    if forced == "triton":
        if triton is None:
            raise RuntimeError(f"{KERNELS_ENV}=triton but Triton is not importable")
        if not (on_cuda or triton_interpreting()):
            raise RuntimeError(
                f"{KERNELS_ENV}=triton on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 before "
                "starting Python (or run on CUDA tensors)"
            )
        return True
    return triton is not None and on_cuda


if triton is not None:
    # Helpers shared by the Triton kernel modules.

    @triton.jit
    def load_rows(ptr, rows, channels, D):
        """(len(rows), len(channels)) block of rows of a row-major (N, D) tensor; channels past D read as 0."""
        return tl.load(ptr + rows[:, None] * D + channels[None, :], mask=channels[None, :] < D, other=0.0)
