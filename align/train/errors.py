"""Why a training run ended early, importable without torch (the CLI maps each to its exit code)."""

from __future__ import annotations


class TrainingStopped(RuntimeError):
    """The run cannot go on (diverged, no reward signal); the message names the step and the cause.
    Raised by align.train.guards; `align` prints it and exits 1."""
