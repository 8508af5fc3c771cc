"""groupnorm: fast, accurate Group Normalization for NumPy arrays.

SIMD (AVX2, AVX-512, NEON) + OpenMP C++ kernels behind a NumPy-first API with the semantics of
``torch.nn.functional.group_norm``. See :func:`group_norm`; for training, :func:`group_norm_forward`,
:func:`group_norm_backward` and the :class:`GroupNorm` layer.
"""
import os as _os

from . import _core
from ._core import (__version__, get_num_threads, group_norm, group_norm_backward, group_norm_forward,
                    set_num_threads)
from ._config import config, show_config
from ._layer import GroupNorm

__all__ = ["group_norm", "group_norm_forward", "group_norm_backward", "GroupNorm", "set_num_threads",
           "get_num_threads", "config", "show_config", "__version__"]


def _select_isa_from_environment():
    name = _os.environ.get("GROUPNORM_ISA", "").strip().lower()
    if name:
        _core.set_isa(name)


_select_isa_from_environment()
