"""Peak extra memory of one call, from the kernel's high-water mark (Linux).

``peak_extra_mib(fn)`` resets this process's peak RSS (``VmHWM``) to its current RSS by writing
``5`` to ``/proc/self/clear_refs``, runs ``fn``, and returns ``(result, MiB)`` where MiB is the
peak RSS during the call minus the RSS before it: every temporary the call allocated at its worst
moment, including its output, as the kernel counted it (CPU tensors; not CUDA memory).

Importing this module fixes glibc's mmap threshold at 128 KiB (``mallopt``): every large tensor
is then its own mapping, returned to the kernel when freed, so a call cannot hide its temporaries
in heap pages that an earlier call left resident (glibc's default threshold grows after frees).
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
_STATUS = Path("/proc/self/status")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_libc = ctypes.CDLL("libc.so.6")
_libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
_libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)


def _kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.M).group(1))


def peak_extra_mib(fn: Callable[[], T]) -> tuple[T, float]:
    """Run ``fn``; return its result and the peak RSS above the starting RSS, in MiB."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _kib("VmRSS")
    out = fn()
    return out, (_kib("VmHWM") - before) / 1024


__all__ = ["peak_extra_mib"]
