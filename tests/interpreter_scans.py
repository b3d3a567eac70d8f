"""Faster user-defined reductions and scans for the Triton interpreter, used by tests/selective_scan_interp_cases.py.

Triton 3.6's interpreter runs ``tl.reduce`` and ``tl.associative_scan`` with a combine function of the user's
(``tl.flip`` is one, through ``xor_sum``) one element at a time: a Python call of the combine function per element.
The selective scan's chunk scans over ``[16, channels, d_state]`` tiles made its interpreter tests about half of the
CI suite's time. :func:`install` replaces the two element loops with loops along the reduced axis only, calling the
combine function on whole slices. The fold runs in the same order, left to right, so with elementwise combine
functions (all of this project's) every result is the same as the element loop's, bit for bit; :func:`install`
checks that on a small kernel before it replaces anything. Import this module with ``TRITON_INTERPRET=1`` already
set: Triton decides between compiling and interpreting when a kernel is defined.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl


def _fold(op, inputs, axis: int, keep_all_steps: bool):
    """Left fold of ``op.combine_fn`` along ``axis``: the last step (a reduction) or every step (a scan)."""
    arrays = [arg.handle.data for arg in inputs]
    dtypes = [arg.dtype for arg in inputs]

    def as_tensors(slices):
        return [op.to_tensor(np.asarray(s), d) for s, d in zip(slices, dtypes)]

    accumulated = [np.take(a, 0, axis=axis) for a in arrays]
    steps = [accumulated]
    for index in range(1, arrays[0].shape[axis]):
        current = [np.take(a, index, axis=axis) for a in arrays]
        result = op.combine_fn.fn(*as_tensors(accumulated), *as_tensors(current))
        result = result if isinstance(result, tuple) else (result,)
        accumulated = [np.asarray(r.handle.data if isinstance(r, tl.core.tensor) else r, dtype=a.dtype)
                       .reshape(c.shape) for r, a, c in zip(result, arrays, current)]
        if keep_all_steps:
            steps.append(accumulated)
    if keep_all_steps:
        return [np.stack([step[j] for step in steps], axis=axis) for j in range(len(arrays))]
    return accumulated


def _reduce(self, inputs):
    original_axis = self.axis
    inputs, axis = self.unravel(inputs, self.axis)
    results = []
    for data, arg in zip(_fold(self, inputs, axis, keep_all_steps=False), inputs):
        if self.keep_dims and original_axis is not None:
            data = np.expand_dims(data, axis)
        elif self.keep_dims:
            data = data.reshape((1,) * arg.handle.data.ndim)
        elif original_axis is None:
            data = data.item()
        results.append(self.to_tensor(data, arg.dtype))
    return results


def _scan(self, inputs):
    return [self.to_tensor(data, arg.dtype) for data, arg in zip(_fold(self, inputs, self.axis, True), inputs)]


@triton.jit
def _linear_recurrence(decay_left, value_left, decay_right, value_right):
    return decay_left * decay_right, value_left * decay_right + value_right


@triton.jit
def _check_kernel(decay_ptr, value_ptr, scan_ptr, reduce_ptr, flip_ptr, ROWS: tl.constexpr, COLS: tl.constexpr):
    offsets = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    decay, value = tl.load(decay_ptr + offsets), tl.load(value_ptr + offsets)
    _, scanned = tl.associative_scan((decay, value), 0, _linear_recurrence, reverse=True)
    _, reduced = tl.reduce((decay, value), 1, _linear_recurrence)
    tl.store(scan_ptr + offsets, scanned)
    tl.store(reduce_ptr + tl.arange(0, ROWS), reduced)
    tl.store(flip_ptr + offsets, tl.flip(value, 0))


def _check_kernel_outputs() -> list[torch.Tensor]:
    """A two-operand reverse scan, a two-operand reduction and ``tl.flip`` of a small tile."""
    decay, value = torch.rand(2, 8, 4, generator=torch.Generator().manual_seed(0))
    outputs = [torch.empty(8, 4), torch.empty(8), torch.empty(8, 4)]
    _check_kernel[(1,)](decay, value, *outputs, ROWS=8, COLS=4)
    return outputs


def install() -> bool:
    """Replaces the interpreter's element loops when this Triton has them and the replacement agrees with them
    on a small case; returns whether it did. Call with ``TRITON_INTERPRET=1`` set."""
    try:
        from triton.runtime.interpreter import ReduceOps, ScanOps
    except ImportError:
        return False
    if not (hasattr(ReduceOps, "generic_reduce") and hasattr(ScanOps, "generic_scan")):
        return False
    element_loops = ReduceOps.generic_reduce, ScanOps.generic_scan
    try:
        expected = _check_kernel_outputs()
        ReduceOps.generic_reduce, ScanOps.generic_scan = _reduce, _scan
        if all(torch.equal(a, b) for a, b in zip(_check_kernel_outputs(), expected)):
            return True
    except Exception:  # an interpreter whose internals changed: keep its own loops
        pass
    ReduceOps.generic_reduce, ScanOps.generic_scan = element_loops
    return False
