"""curves.png: training loss (mean of L+ and L-, smoothed) and evaluation accuracy against the step."""
from __future__ import annotations

from .files import read_jsonl, replaced_file


def plot_curves(metrics_path: str, evals_path: str, out_png: str, window: int = 20) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, e = read_jsonl(metrics_path), read_jsonl(evals_path)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    if m:
        steps = [r["step"] for r in m]
        loss = [(r["loss_plus"] + r["loss_minus"]) / 2 for r in m]
        smooth = [sum(loss[max(0, i - window + 1):i + 1]) / len(loss[max(0, i - window + 1):i + 1])
                  for i in range(len(loss))]
        a.plot(steps, loss, alpha=0.25, lw=0.8, label="(L+ + L-)/2")
        a.plot(steps, smooth, lw=1.6, label=f"moving mean ({window})")
        zero = 100 * sum(r["zero_grad"] for r in m) / len(m)
        a.set_title(f"train objective (g = 0 on {zero:.0f}% of steps)")
        a.set_xlabel("step"); a.legend()
    for split in sorted({r["split"] for r in e}):
        pts = [(r["step"], r["accuracy"]) for r in e if r["split"] == split]
        b.plot(*zip(*pts), marker="o", label=split)
    b.set_title("accuracy"); b.set_xlabel("step")
    if e:
        b.legend()
    fig.tight_layout()
    with replaced_file(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
