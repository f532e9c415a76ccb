"""The comparison plot (``comparison.png``): what decides, drawn as it decides. Accuracy with its
95 % interval as error bars; time per question (a batched question counts its share of the batch's
wall time, not the whole batch's, so a batched model is not drawn slower than it is); tokens/s."""

from __future__ import annotations

from phi3mlflow.summary import Candidate

PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860"]


def plot(candidates: list[Candidate]):
    """A matplotlib figure for mlflow.log_figure."""
    import matplotlib  # heavy: only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: as above

    keys = [c.key for c in candidates]
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(keys))]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(6 + 2 * len(keys), 3.6))
    acc = [c.accuracy for c in candidates]
    low = [c.accuracy - (c.accuracy_low if c.accuracy_low is not None else c.accuracy) for c in candidates]
    high = [(c.accuracy_high if c.accuracy_high is not None else c.accuracy) - c.accuracy for c in candidates]
    ax1.bar(keys, acc, color=colors, yerr=[low, high], capsize=4)
    ax1.set_ylim(0, 1.05)
    ax1.set_title("accuracy, 95 % interval (higher is better)")
    ax2.bar(keys, [c.ms_per_question for c in candidates], color=colors)
    ax2.set_title("ms per question (lower is better)")
    ax3.bar(keys, [c.tokens_per_s for c in candidates], color=colors)
    ax3.set_title("generated tokens/s (higher is better)")
    for ax in (ax1, ax2, ax3):
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    plt.close(fig)
    return fig
