"""CUDA only (marked `cuda`, skipped without a GPU): float64 gradcheck of every op on each backend, and opcheck of
every fastnn:: op call the public API makes on CUDA tensors.

The inputs are the cases of tools/gpu_sanitize_driver.py (odd shapes, every option, masks, dropout with a fixed
seed), and opcheck checks the op calls recorded while those cases run forward and backward, so a new op or a
changed schema is picked up without a table here. Each check is a function of the device, so that it can be tried
on the CPU too (``_gradcheck(op, backend, "cpu")``).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "gpu_sanitize_driver", Path(__file__).resolve().parent.parent / "tools" / "gpu_sanitize_driver.py")
driver = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(driver)

OPS = ("softmax", "bce", "cross_entropy", "linear_cross_entropy", "attention", "lstm_cell", "lstm")
BACKENDS = ("native", "triton")


def _gradcheck(op: str, backend: str, device: str) -> int:
    """gradcheck (float64) of every differentiable case of ``op``; the number checked."""
    checked = 0
    for case in driver.cases(device, ("float64",), (op,)):
        if not case.grad or case.raises is not None or case.once:
            continue
        names = [n for n in case.grad if case.inputs[n].is_floating_point()]

        def fn(*xs, case=case, names=names):
            return tuple(driver._flat(case.call(backend, **{**case.inputs, **dict(zip(names, xs))})))

        xs = [case.inputs[n].detach().clone().requires_grad_() for n in names]
        # Past a few hundred elements a random direction (fast mode): the full Jacobian takes 2 calls an element.
        assert torch.autograd.gradcheck(fn, xs, fast_mode=case.numel() > 300, nondet_tol=1e-10), case.label
        checked += 1
    return checked


def _opcheck(op: str, backend: str, device: str) -> int:
    """torch.library.opcheck of the fastnn:: op calls the cases of ``op`` make (forward and backward), the first
    call of each op per input dtype; the number checked."""
    with driver.Recorder(keep=True) as rec:
        for case in driver.cases(device, ("float32", "bfloat16", "float64"), (op,)):
            if case.raises is None:
                driver.launch(case, backend)
    first = {}
    for func, args, kwargs in rec.calls:
        dtype = next((a.dtype for a in driver._flat(list(args)) if isinstance(a, torch.Tensor)
                      and a.is_floating_point()), None)
        first.setdefault((func, dtype), (args, kwargs))
    for func, dtype in first:
        args, kwargs = first[func, dtype]
        torch.library.opcheck(func, args, kwargs)
    return len(first)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_gradcheck_cuda(op, backend):
    assert _gradcheck(op, backend, "cuda") > 0


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_opcheck_cuda(op, backend):
    assert _opcheck(op, backend, "cuda") > 0
