"""The user-facing failure kinds that every command turns into one `error:` line (exit 2).

ConfigError (core/config.py) is a bad setting or argument. The two below are about data on disk or
numbers a computation produced; each message names the file or the quantity and what to do.
"""
from __future__ import annotations


class CorruptFileError(ValueError):
    """A file the suite reads is damaged (truncated, garbled, wrong content): the message names its path,
    what is wrong, and how to get a good one (rebuild, delete, re-download)."""


class CheckpointError(ValueError):
    """An official checkpoint file that does not fit the suite model; the message names the offending keys
    (benchmarks/evaluation/importers.py)."""


class NonFiniteError(ValueError):
    """A tensor that would be scored, saved as a statistic or trained on holds NaN or ±inf."""
