"""Giving freed CPU memory back between the stages of a circuit run."""
import ctypes
import ctypes.util

import torch


def _libc_trim():
    """glibc's malloc_trim, or None elsewhere (macOS, musl, Windows)."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_TRIM = _libc_trim()


def release_freed_memory(device=None):
    """Give the pages of freed CPU tensors back to the operating system (glibc's malloc_trim; nothing
    elsewhere, or for a CUDA device, whose memory torch's caching allocator manages).

    Why: glibc raises its mmap threshold after the first large free, so later tensors of up to 32 MB come
    from a heap it keeps after they are freed; between the stages of a circuit run that kept memory grew to
    about 1 GB on the issue-14 workload (BENCHMARKS.md, "Memory profile"). Calling this between stages
    returns it without changing any allocation setting of the process."""
    if _TRIM is not None and (device is None or torch.device(device).type == "cpu"):
        _TRIM(0)
