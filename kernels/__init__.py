"""Token-mixer ops: ViG's bidirectional gated linear attention and Vim's bidirectional selective scan.

Each op has one dispatch point (``bigla``, ``bi_selective_scan``) that picks the fused Triton kernel or
the plain-PyTorch reference according to :mod:`vig_kernels.backend`; model code only calls the dispatch point.

This folder installs as ``vig_kernels``. Run from the repository root (``python -m eval.zeroshot ...``), Python
also finds it under its folder name, ``kernels``, which belongs to Hugging Face's kernels package, a dependency
of transformers 5 that transformers imports when it is installed. Imported under that name, this module hands
the import over to that package.
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _is_this_project(entry: str) -> bool:  # this checkout's or another one's kernels/ folder
        return os.path.isdir(os.path.join(entry or os.curdir, "kernels", "bigla"))

    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [entry for entry in sys.path if not _is_this_project(entry)])
    if _spec is None:
        raise ImportError(f"'kernels' resolved to {os.path.dirname(os.path.abspath(__file__))}, this project's "
                          "token-mixer ops, which are imported as vig_kernels; Hugging Face's kernels package is "
                          "not installed")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # what the import statement returns once this file has run
    _spec.loader.exec_module(_module)
else:
    from .backend import BACKENDS, get_backend, set_backend, use_backend
    from .bigla import bigla, bigla_reference
    from .selective_scan import bi_selective_scan, bi_selective_scan_reference

    __all__ = ["BACKENDS", "get_backend", "set_backend", "use_backend", "bigla", "bigla_reference",
               "bi_selective_scan", "bi_selective_scan_reference"]
