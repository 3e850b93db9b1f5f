"""Rounding sizes up to a bucket, so kernels that are cached per shape see only a few shapes."""

from __future__ import annotations


def round_up(n: int, bucket: int) -> int:
    """The smallest multiple of ``bucket`` that is at least ``n``."""
    return -(-n // bucket) * bucket
