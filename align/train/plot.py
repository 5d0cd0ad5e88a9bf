"""`align plot RUN_DIR`: PNG curves of `<run_dir>/metrics.jsonl` (needs matplotlib).

One figure per group: loss (train/loss with eval/loss), rewards (reward/mean with each
rewards/<name>/mean of an RL run), then one per remaining metric key
(train/lr, train/grad_norm, train/tokens_per_s, eval/exact_match, ...). Files go to
`<run_dir>/plots/<name>.png`.
"""

from __future__ import annotations

from pathlib import Path

from align.train.metrics import read_metrics

SKIP = ("step", "time")


def _series(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        for key, value in record.items():
            if key in SKIP or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            steps, values = out.setdefault(key, ([], []))
            steps.append(record["step"])
            values.append(value)
    return out


def _groups(keys: list[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    losses = [k for k in keys if k in ("train/loss", "eval/loss")]
    if losses:
        groups["loss"] = losses
    rewards = [k for k in keys if k == "reward/mean" or (k.startswith("rewards/") and k.endswith("/mean"))]
    if rewards:
        groups["rewards"] = rewards
    for key in keys:
        if key not in losses and key not in rewards:
            groups[key.replace("/", "_")] = [key]
    return groups


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write the PNGs; returns their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ValueError("align plot needs matplotlib: pip install matplotlib") from err
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl records to plot")
    series = _series(records)
    out = Path(out) if out is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, keys in _groups(list(series)).items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in keys:
            steps, values = series[key]
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=key)
        ax.set_xlabel("step")
        ax.set_title(f"{run_dir.name}: {name}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
