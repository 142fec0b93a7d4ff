"""The run's summary: ``metrics.json`` and a PNG of the loss and evaluation curves.

A run that failed writes ``metrics.json`` too (``vlmray.api``): ``failed: true`` and ``error``
beside what its history holds."""

from __future__ import annotations

import json
from typing import Any

from vlmray.data.storage import join, open_write


def dedup_by_step(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keeps the last row for each step (a restored run may have logged a step twice)."""
    by_step = {r["step"]: r for r in rows}
    return [by_step[s] for s in sorted(by_step)]


def plot_curves(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(10, 4))
    losses = [r for r in rows if "loss" in r]   # a skipped step's non-finite loss is not logged
    ax_loss.plot([r["step"] for r in losses], [r["loss"] for r in losses], label="train loss")
    ax_loss.set_xlabel("step"), ax_loss.set_ylabel("loss"), ax_loss.legend()
    evals = [r for r in rows if "zero_shot_top1" in r]
    for key in ("zero_shot_top1", "retrieval_i2t_r1", "retrieval_t2i_r1"):
        ax_eval.plot([r["step"] for r in evals], [r[key] for r in evals], marker="o", label=key)
    if evals:
        ax_eval.axhline(evals[-1]["zero_shot_chance"], ls="--", c="grey", label="chance")
    ax_eval.set_xlabel("step"), ax_eval.set_ylabel("held-out"), ax_eval.legend()
    fig.tight_layout()
    with open_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)


def write_json(path: str, data: dict[str, Any]) -> None:
    with open_write(path) as f:
        json.dump(data, f, indent=1, sort_keys=True)


def write_summary(run_dir: str, summary: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    write_json(join(run_dir, "metrics.json"), summary)
    if rows:
        plot_curves(rows, join(run_dir, "curves.png"))


__all__ = ["dedup_by_step", "plot_curves", "write_json", "write_summary"]
