"""Token-mixer ops: ViG's bidirectional gated linear attention and Vim's bidirectional selective scan.

Each op has one dispatch point (``bigla``, ``bi_selective_scan``) that picks the fused Triton kernel or
the plain-PyTorch reference according to :mod:`vig_kernels.backend`; model code only calls the dispatch point.
"""
from .backend import BACKENDS, get_backend, set_backend, use_backend
from .bigla import bigla, bigla_reference
from .selective_scan import bi_selective_scan, bi_selective_scan_reference

__all__ = ["BACKENDS", "get_backend", "set_backend", "use_backend", "bigla", "bigla_reference",
           "bi_selective_scan", "bi_selective_scan_reference"]
