"""Run feedback: `<run_dir>/metrics.jsonl`, a progress bar, accelerate's trackers.

metrics.jsonl holds one JSON object per record: {"step": int, "time": seconds since start, and
metric keys such as "train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
"eval/loss", "eval/exact_match"}. Only the main process writes it.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Appends records to metrics.jsonl; on resume, drops records past the resumed step first."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        self.start = time.time()
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is None:
                self.path.write_text("")
            else:
                keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
                self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time() - self.start, 3)}
        record.update({k: _clean(v) for k, v in metrics.items()})
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _clean(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl file (or of `<run_dir>/metrics.jsonl` given a run directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def progress_bar(total: int, initial: int, enabled: bool, desc: str = "sft") -> tqdm:
    """The step bar (stderr); redrawn every 0.1 s on a terminal, every 10 s into a log file."""
    interval = 0.1 if sys.stderr.isatty() else 10.0
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True,
                mininterval=interval)


# (metric key, progress-bar label, format) shown when the key is present
BAR_FIELDS = (
    ("train/loss", "loss", ".4f"), ("train/lr", "lr", ".2e"), ("train/tokens_per_s", "tok/s", ",.0f"),
    ("reward/mean", "reward", ".3f"), ("train/kl", "kl", ".4f"), ("completions/mean_length", "len", ".1f"),
)


def bar_postfix(metrics: Mapping[str, float]) -> dict[str, str]:
    return {label: format(metrics[key], fmt) for key, label, fmt in BAR_FIELDS if key in metrics}


def check_trackers(names: list[str]) -> None:
    """Fail early (with the install hint) when a requested accelerate tracker is not installed."""
    if not names:
        return
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ValueError(
                f"output.trackers: unknown tracker {name!r}; accelerate supports {', '.join(LOGGER_TYPE_TO_CLASS)}"
            )
        if name not in available:
            raise ValueError(f"output.trackers: {name!r} is not installed (pip install {name})")
