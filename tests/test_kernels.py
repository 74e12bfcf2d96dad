"""Custom ops: the Triton kernels compute the PyTorch reference's function (forward and gradients), the
references' gradients are right, and the dispatch follows DESIGN.md.

The Triton tests (names starting `test_triton_`) run on CUDA where there is a GPU. Without one they need
Triton's interpreter, which is switched on by TRITON_INTERPRET=1 before any kernel is defined and then
holds for the whole process; so `test_triton_tests_under_interpreter` reruns them in a child pytest with
the variable set, and the parent skips them (unless it was itself started with TRITON_INTERPRET=1).
"""

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from native_seg_hf.models import kernels
from native_seg_hf.models.grouping import local_grouping_step, local_grouping_step_torch
from native_seg_hf.models.neighborhood_attention import neighborhood_attention, neighborhood_attention_torch

INTERPRETING = kernels.triton_interpreting()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_RUNS_HERE = kernels.triton is not None and (DEVICE == "cuda" or INTERPRETING)
triton_test = pytest.mark.skipif(
    not TRITON_RUNS_HERE, reason="no GPU: run by test_triton_tests_under_interpreter in a child process"
)
TOLERANCE = 1e-4  # relative error (of the norm) between the two paths, fp32


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    """Norm of the difference over the norm of the reference (which may be 0: a gradient that vanishes)."""
    return ((result.double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-30)).item()


def run_both_paths(op, inputs, output_grads, monkeypatch):
    """Outputs and input gradients of `op` under NATIVE_SEG_KERNELS=torch and =triton.

    On the Triton path every tensor the kernels allocate starts as NaN, so an element a kernel fails to write
    shows up in the comparison. Returns (torch results, triton results, number of poisoned allocations).
    """
    results = {}
    poisoned = 0
    empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        nonlocal poisoned
        poisoned += 1
        return empty(*args, **kwargs).fill_(float("nan"))

    for backend in ("torch", "triton"):
        monkeypatch.setenv(kernels.KERNELS_ENV, backend)
        if backend == "triton":
            monkeypatch.setattr(torch, "empty", poisoned_empty)
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        outputs = op(*leaves)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        loss = sum((out * grad).sum() for out, grad in zip(outputs, output_grads))
        results[backend] = [out.detach() for out in outputs] + list(torch.autograd.grad(loss, leaves))
    monkeypatch.undo()
    return results["torch"], results["triton"], poisoned


def random_tensors(shapes, seed, dtype=torch.float32, device=DEVICE):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=dtype).to(device) for shape in shapes]


def grouping_shapes(batch, height, width, channels):
    """Shapes of keys, values, queries and bias, then of the update and the assignment."""
    tokens, cells = (batch, height, width), (batch, height // 2, width // 2)
    return [(*tokens, channels), (*tokens, channels), (*cells, channels), (4, 9)], [(*cells, channels), (*tokens, 9)]


# --------------------------------------------------------------------------------------------------------
# Triton kernels against the PyTorch path
# --------------------------------------------------------------------------------------------------------

GROUPING_SIZES = [  # (batch, H, W, channels): non-square, 1 x 1 and 1-wide output grids, D not a power of 2
    (2, 6, 10, 20),
    (1, 2, 2, 8),
    (3, 8, 2, 16),
    (1, 12, 8, 33),
]


@triton_test
@pytest.mark.parametrize("batch, height, width, channels", GROUPING_SIZES)
def test_triton_local_grouping_matches_torch(batch, height, width, channels, monkeypatch):
    input_shapes, output_shapes = grouping_shapes(batch, height, width, channels)
    # Gradients reach the kernels through both outputs: the update and the assignment.
    inputs, output_grads = random_tensors(input_shapes, seed=0), random_tensors(output_shapes, seed=1)
    reference, result, poisoned = run_both_paths(local_grouping_step, inputs, output_grads, monkeypatch)
    assert poisoned == 7  # forward: assignment, update, 1/mass; backward: dK, dV, dQ, dlogits
    names = ["update", "assignment", "grad keys", "grad values", "grad queries", "grad bias"]
    for name, expected, got in zip(names, reference, result):
        assert relative_error(got, expected) < TOLERANCE, name


ATTENTION_SIZES = [  # (batch, heads, H, W, head_dim, kernel_size)
    (2, 1, 10, 12, 16, 7),  # several tiles along both axes, border-shifted windows
    (1, 2, 9, 12, 20, 3),  # head_dim not a power of two
    (1, 2, 4, 13, 8, 5),  # H shorter than the kernel: the window is the whole column
    (2, 1, 5, 6, 16, 7),  # grid smaller than the kernel: global attention
]


@triton_test
@pytest.mark.parametrize("batch, heads, height, width, head_dim, kernel_size", ATTENTION_SIZES)
def test_triton_neighborhood_attention_matches_torch(batch, heads, height, width, head_dim, kernel_size, monkeypatch):
    shape = (batch, heads, height, width, head_dim)
    inputs, output_grads = random_tensors([shape] * 3, seed=0), random_tensors([shape], seed=1)

    def attention(query, key, value):
        return neighborhood_attention(query, key, value, kernel_size)

    reference, result, poisoned = run_both_paths(attention, inputs, output_grads, monkeypatch)
    assert poisoned == 5  # forward: output, log-sum-exp; backward: dQ, dK, dV
    for name, expected, got in zip(["output", "grad query", "grad key", "grad value"], reference, result):
        assert relative_error(got, expected) < TOLERANCE, name


@pytest.mark.skipif(TRITON_RUNS_HERE or kernels.triton is None, reason="the Triton tests run in this process")
def test_triton_tests_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop(kernels.KERNELS_ENV, None)
    child = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "test_triton_ and matches"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-2000:]
    passed = re.search(r"(\d+) passed", child.stdout)
    assert passed and int(passed.group(1)) == len(GROUPING_SIZES) + len(ATTENTION_SIZES), child.stdout[-2000:]


# --------------------------------------------------------------------------------------------------------
# The PyTorch references
# --------------------------------------------------------------------------------------------------------


def test_local_grouping_torch_gradcheck():
    shapes, _ = grouping_shapes(1, 4, 6, 3)
    inputs = [x.requires_grad_() for x in random_tensors(shapes, seed=0, dtype=torch.float64, device="cpu")]
    assert torch.autograd.gradcheck(local_grouping_step_torch, inputs)


@pytest.mark.parametrize("height, width, kernel_size", [(6, 7, 3), (3, 8, 5), (3, 4, 5)])
def test_neighborhood_attention_torch_gradcheck(height, width, kernel_size):
    shapes = [(1, 1, height, width, 4)] * 3
    inputs = [x.requires_grad_() for x in random_tensors(shapes, seed=0, dtype=torch.float64, device="cpu")]
    assert torch.autograd.gradcheck(lambda q, k, v: neighborhood_attention_torch(q, k, v, kernel_size), inputs)


# --------------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(INTERPRETING, reason="checks the machine's own dispatch")
@pytest.mark.parametrize("forced", ["", "torch", "triton", "cuda"])  # "cuda" is no backend's name
def test_dispatch(forced, monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, forced)
    cpu = torch.zeros(1)
    if forced == "" and torch.cuda.is_available():
        assert kernels.use_triton(cpu.cuda()) == (kernels.triton is not None)
    if forced == "triton":
        error = "TRITON_INTERPRET=1" if kernels.triton is not None else "not importable"
        with pytest.raises(RuntimeError, match=error):
            kernels.use_triton(cpu)
    elif forced == "cuda":
        with pytest.raises(ValueError, match="expected one of"):
            kernels.use_triton(cpu)
    else:
        assert not kernels.use_triton(cpu)


def test_package_works_without_triton():
    """With Triton not importable, the package imports, the ops run on PyTorch, and forcing Triton says why not."""
    program = textwrap.dedent(
        """
        import os, sys, torch
        sys.modules["triton"] = None  # `import triton` now fails as if Triton were not installed
        from native_seg_hf.models.grouping import local_grouping_step
        from native_seg_hf.models.neighborhood_attention import neighborhood_attention
        x, bias = torch.randn(1, 4, 4, 8), torch.zeros(4, 9)
        neighborhood_attention(x[None], x[None], x[None], 3)
        local_grouping_step(x, x, x[:, ::2, ::2], bias)
        os.environ["NATIVE_SEG_KERNELS"] = "triton"
        try:
            local_grouping_step(x, x, x[:, ::2, ::2], bias)
        except RuntimeError as error:
            print(error)
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in (kernels.KERNELS_ENV, "TRITON_INTERPRET")}
    child = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env)
    assert child.returncode == 0, child.stderr[-3000:]
    assert "Triton is not importable" in child.stdout
