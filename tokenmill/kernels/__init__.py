"""Optional native kernels, compiled on first use with torch's C++ extension builder (g++ + ninja).

A kernel that cannot be built (no compiler, an unsupported platform) is reported once in the log and
its caller falls back to the pure-PyTorch path, which gives the same results more slowly.
"""

from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_cache: dict[str, object] = {}


def load(name: str):
    """The compiled module `name` (tokenmill/kernels/NAME.cpp), or None if it cannot be built here."""
    with _lock:
        if name in _cache:
            return _cache[name]
        module = None
        try:
            from torch.utils.cpp_extension import load as build

            source = os.path.join(os.path.dirname(__file__), f"{name}.cpp")
            module = build(name=f"tokenmill_{name}", sources=[source], verbose=False,
                           extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                           extra_ldflags=["-fopenmp"])
        except Exception as e:  # a missing compiler or ninja must not stop the engine
            logger.warning("native kernel %s unavailable, using the PyTorch fallback: %s", name, e)
        _cache[name] = module
        return module
