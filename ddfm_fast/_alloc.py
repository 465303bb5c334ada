"""Keep freed memory in the process: glibc ``mallopt`` tuning for the CPU sampler.

Why. Every UNet layer of every sampling step allocates activations of several MB to tens of MB (a 16-channel
float32 map at 480x640 is 19.7 MB) and frees them a moment later. glibc serves blocks above its mmap threshold
(128 KB, raised dynamically up to 32 MB) with a fresh ``mmap`` and gives them back with ``munmap``, and it trims
the heap top once more than 128 KB of it is free; the kernel then zero-fills every page of the next block again
on first touch. On the 2-core development CPU that page-fault and zeroing work was about half of the ``fuse``
command's wall time (system time 27 s of 49-51 s for the README's 640x480 pair with the small prior, 2 threads).

What. :func:`keep_freed_memory` tells glibc, once per process, to serve large blocks from its heap instead of
``mmap`` (``M_MMAP_MAX = 0``) and never to trim the heap (``M_TRIM_THRESHOLD`` at its maximum), so freed blocks
are reused in place. The cost is that the process keeps its peak heap until it exits, which suits a command-line
run. It is what the environment variables ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` would do, set from
inside the package so that users need not know them.

Where glibc is absent (macOS, Windows, musl) nothing is changed and, with ``announce=True`` (the command line),
one line on stderr says so, once per process. ``DDFM_FAST_MALLOC=default`` leaves glibc's malloc as it is, without
a word (the user asked for it). The library never calls this on import: changing the allocator is the command
line's decision (``cli.main``); a program that embeds ddfm-fast keeps its own allocator unless it calls this.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from dataclasses import dataclass
from typing import Optional

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# The largest value mallopt takes for M_TRIM_THRESHOLD is a size_t passed as int: INT_MAX bytes (2 GiB - 1).
_TRIM_NEVER = 2**31 - 1
ENV_SWITCH = "DDFM_FAST_MALLOC"  # "default" leaves glibc's malloc as it is


@dataclass(frozen=True)
class MallocTuning:
    """What :func:`keep_freed_memory` did: ``applied`` and, if not, ``reason`` (one line)."""

    applied: bool
    reason: str


_RESULT: Optional[MallocTuning] = None


def _glibc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def keep_freed_memory(*, announce: bool = False) -> MallocTuning:
    """Tune glibc's malloc to keep freed memory (see the module docstring); idempotent, never raises.

    Returns what was done; when nothing could be done, ``reason`` says why and ``announce=True`` prints it to
    stderr (once per process).
    """
    global _RESULT
    if _RESULT is None:
        _RESULT = _apply()
        if announce and not _RESULT.applied and not _RESULT.reason.startswith(ENV_SWITCH):
            print(f"ddfm-fast: {_RESULT.reason}", file=sys.stderr)
    return _RESULT


def _apply() -> MallocTuning:
    if os.environ.get(ENV_SWITCH, "").strip().lower() == "default":
        return MallocTuning(False, f"{ENV_SWITCH}=default: glibc's malloc left as it is")
    libc = _glibc()
    if libc is None:
        libc_name = platform.libc_ver()[0] or "no glibc"
        return MallocTuning(False, f"malloc tuning skipped ({sys.platform}, {libc_name}): freed memory goes back "
                                   "to the system, which costs page faults on large images")
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, _TRIM_NEVER) == 1
    return MallocTuning(ok, "glibc malloc keeps freed memory (M_MMAP_MAX=0, no trimming)" if ok
                        else "malloc tuning skipped: glibc's mallopt refused M_MMAP_MAX=0 / M_TRIM_THRESHOLD")


def malloc_tuning() -> Optional[MallocTuning]:
    """The result of :func:`keep_freed_memory` in this process, or None if it was not called."""
    return _RESULT


__all__ = ["MallocTuning", "keep_freed_memory", "malloc_tuning", "ENV_SWITCH"]
