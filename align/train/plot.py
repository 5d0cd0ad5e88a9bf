"""`align plot RUN_DIR`: PNG curves of `<run_dir>/metrics.jsonl` (needs matplotlib).

One figure per group: loss (train/loss with eval/loss), rewards (reward/mean with each
rewards/<name>/mean of an RL run), then one per remaining metric key
(train/lr, train/grad_norm, train/tokens_per_s, eval/exact_match, ...). An RL run on an MoE model also
gets the router panel (`router.png`): per-layer expert load (busiest / mean), per-layer load entropy and
the routing agreement (align.train.moe_metrics). Files go to `<run_dir>/plots/<name>.png`.
"""

from __future__ import annotations

from pathlib import Path

from align.train.metrics import read_metrics

SKIP = ("step", "time")
ROUTER = "moe/"  # keys drawn in the router panel, not one figure each
ROUTER_AXES = (("expert load: busiest / mean", "moe/load_max_over_mean/"),
               ("expert load entropy / log E", "moe/load_entropy/"),
               ("routing agreement (engine vs training)", "moe/routing_agreement"))


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
        if key not in losses and key not in rewards and not key.startswith(ROUTER):
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
        _draw(ax, series, keys, f"{run_dir.name}: {name}")
        written.append(_save(plt, fig, out / f"{name}.png"))
    router = [[k for k in series if k.startswith(prefix)] for _, prefix in ROUTER_AXES]
    if any(router):
        fig, axes = plt.subplots(1, len(ROUTER_AXES), figsize=(6 * len(ROUTER_AXES), 4))
        for ax, (title, _), keys in zip(axes, ROUTER_AXES, router, strict=True):
            _draw(ax, series, sorted(keys, key=_layer_order), f"{run_dir.name}: {title}")
        written.append(_save(plt, fig, out / "router.png"))
    return written


def _layer_order(key: str) -> tuple[int, str]:
    tail = key.rsplit("_", 1)[-1]
    return (int(tail), key) if tail.isdigit() else (-1, key)


def _draw(ax, series: dict, keys: list[str], title: str) -> None:
    for key in keys:
        steps, values = series[key]
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=key.rsplit("/", 1)[-1])
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if keys:
        ax.legend(fontsize="small")


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
