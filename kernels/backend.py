"""Which implementation the token-mixer ops run.

``auto`` (the default) runs the fused Triton kernel on CUDA tensors whenever one exists for the op
and the inputs, and the plain-PyTorch reference everywhere else. ``reference`` forces the reference
and ``triton`` insists on the kernel (an error if it cannot run). The environment variable
``VIG_KERNELS`` sets the starting value, so a whole run can be switched without code changes.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from types import ModuleType
from typing import Iterator

import torch

BACKENDS = ("auto", "triton", "reference")


def _validated(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r} from {source}; expected one of {BACKENDS}")
    return name


# An empty VIG_KERNELS (VIG_KERNELS= in a job script) means the default, like an unset one.
_backend = _validated(os.environ.get("VIG_KERNELS", "").strip().lower() or "auto",
                      "the VIG_KERNELS environment variable")


def get_backend() -> str:
    return _backend


def set_backend(name: str) -> None:
    """Select ``auto``, ``triton`` or ``reference`` for every token-mixer op."""
    global _backend
    _backend = _validated(name, "set_backend()")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily select a backend: ``with vig_kernels.use_backend("reference"): ...``."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def on_device_of(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``tensor``'s CUDA device the current one for a launch: Triton launches on the current device and its
    stream, so a tensor on cuda:1 while cuda:0 is current would otherwise be run on the wrong device."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def import_fused(package: str) -> tuple[ModuleType | None, str | None]:
    """An op's fused-kernel module (``<package>.fused``), or None and why it cannot be imported (no Triton, or
    a broken install: the reference path must still import).

    Call it when the op's package is imported, not inside the op: torch.compile traces the op's dispatch, and
    ``importlib`` inside a traced call breaks a ``fullgraph=True`` compile."""
    try:
        return importlib.import_module(f"{package}.fused"), None
    except Exception as exc:  # pragma: no cover - depends on the environment
        return None, f"{type(exc).__name__}: {exc}"
