"""What a unit of work costs: the peak memory of a block of code, as Table 6 reports it."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from pathlib import Path

import torch


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Yields a dict that holds, after the block, ``peak_mb``: the peak memory above the level at
    entry (CUDA: allocated by torch; CPU on Linux: resident set, via /proc's resettable peak), or
    NaN where neither can be measured."""
    result = {"peak_mb": float("nan")}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result["peak_mb"] = (torch.cuda.max_memory_allocated(device) - start) / 2**20
        return
    status = Path("/proc/self/status")
    try:
        _release_freed_memory()  # so that reused heap does not hide what the block allocates
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        start = _status_kb(status, "VmRSS")
    except OSError:
        yield result
        return
    yield result
    result["peak_mb"] = (_status_kb(status, "VmHWM") - start) / 1024


def _release_freed_memory() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _status_kb(status: Path, field: str) -> int:
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in {status}")


def memory_measure(device: torch.device) -> str:
    """What :func:`peak_memory` measures on ``device``, as Table 6 names it."""
    return "cuda allocated" if device.type == "cuda" else "cpu rss"
