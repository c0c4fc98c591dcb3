"""The process's peak memory, reported beside every figure that costs memory (profiles, locate)."""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
