"""``llama2 plot``: a run's curves from its ``metrics.jsonl`` (see ``metrics``), drawn
with matplotlib (an optional extra: ``pip install 'llama2-mlx[plot]'``).

lora-train and reward-train runs: the training loss per step with the validation loss
(and, for reward models, the held-out accuracy on a second panel). rs-loop runs: the
mean greedy, best and median reward per iteration, and each fine-tune's training loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from llama2_mlx.errors import Llama2Error
from llama2_mlx.training.metrics import METRICS_FILE, read_metrics

PLOT_EXTRA = "pip install 'llama2-mlx[plot]'"


def _series(records: list[dict], kind: str, key: str) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in records if r.get("kind") == kind and key in r]
    return [s for s, _ in points], [v for _, v in points]


def _figure(panels: int):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise Llama2Error(f"llama2 plot needs matplotlib: {PLOT_EXTRA}") from None
    fig = Figure(figsize=(7, 3.2 * panels), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(panels, 1, i + 1) for i in range(panels)]


def _training_panels(records: list[dict], title: str):
    accuracy = _series(records, "val", "val_accuracy")
    fig, axes = _figure(2 if accuracy[0] else 1)
    ax = axes[0]
    ax.plot(*_series(records, "train", "train_loss"), label="train loss", lw=1)
    steps, val = _series(records, "val", "val_loss")
    if steps:
        ax.plot(steps, val, "o-", label="validation loss", ms=4)
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    if accuracy[0]:
        axes[1].plot(*accuracy, "o-", color="C2", ms=4, label="held-out accuracy")
        axes[1].set(xlabel="step", ylabel="accuracy")
        axes[1].legend()
        axes[1].grid(alpha=0.3)
    return fig


def _rs_loop_panels(records: list[dict], title: str):
    fig, (top, bottom) = _figure(2)
    its = [r for r in records if r.get("kind") == "iteration"]
    for key, label in (("mean_greedy_reward", "mean greedy reward"),
                       ("mean_best_reward", "mean best reward (winners)"),
                       ("mean_median_reward", "mean median reward")):
        points = [(r["iteration"], r[key]) for r in its if r.get(key) is not None]
        if points:
            top.plot(*zip(*points), "o-", label=label, ms=4)
    top.set(xlabel="iteration", ylabel="reward", title=title)
    top.legend()
    top.grid(alpha=0.3)
    for it in sorted({r["iteration"] for r in records if r.get("kind") == "train"}):
        mine = [r for r in records if r.get("iteration") == it]
        bottom.plot(*_series(mine, "train", "train_loss"), label=f"iteration {it}", lw=1)
    bottom.set(xlabel="fine-tune step", ylabel="train loss")
    if bottom.lines:
        bottom.legend()
    bottom.grid(alpha=0.3)
    return fig


def plot_run(run_dir, out: Optional[str] = None) -> Path:
    """Draw the curves of the run in ``run_dir`` to ``out`` (default ``run_dir/loss.png``;
    the format follows the suffix: png, svg, pdf); returns the path written."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise Llama2Error(f"{path}: no such file (lora-train, reward-train and rs-loop write "
                          f"{METRICS_FILE} in their output folder)")
    records = read_metrics(path)
    if not records:
        raise Llama2Error(f"{path}: no metrics yet")
    title = str(path.parent.resolve().name)
    if any(r.get("kind") == "iteration" for r in records):
        fig = _rs_loop_panels(records, title)
    else:
        fig = _training_panels(records, title)
    out = Path(out) if out is not None else path.parent / "loss.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
