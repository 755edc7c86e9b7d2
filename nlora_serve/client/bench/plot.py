"""The PNG of a benchmark run: CDFs of TTFT, TPOT, ITL and E2E, and throughput over time."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nlora_serve.client.bench.report import LATENCIES, latency_samples
from nlora_serve.client.bench.runner import RunRecord

TITLES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E latency"}


def throughput_over_time(run: RunRecord, bin_s: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bin starts in s, output tokens/s, completed requests/s) per ``bin_s`` bin.

    Output tokens are spread evenly over a request's chunks (a chunk's tokens are not known
    separately); a request counts as completed in the bin where it ended.
    """
    ok = [r for r in run.results if r.ok and r.chunk_s]
    bins = np.arange(0.0, run.duration_s + bin_s, bin_s)
    times = np.concatenate([r.start_s + np.asarray(r.chunk_s) for r in ok]) if ok else np.zeros(0)
    weights = np.concatenate([np.full(len(r.chunk_s), r.output_tokens / len(r.chunk_s)) for r in ok]) \
        if ok else np.zeros(0)
    tokens, _ = np.histogram(times, bins=bins, weights=weights)
    done, _ = np.histogram([r.start_s + r.e2e_s for r in ok], bins=bins)
    return bins[:-1], tokens / bin_s, done / bin_s


def plot_run(run: RunRecord, path: str | Path, title: str = "") -> None:
    """Write the PNG to ``path`` (matplotlib's Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (name, samples) in zip(axes.flat, latency_samples(run.results).items()):
        ms = np.sort(samples * 1000.0)
        ax.plot(ms, np.arange(1, ms.size + 1) / max(ms.size, 1), drawstyle="steps-post")
        ax.set(title=f"{TITLES[name]} CDF", xlabel="ms", ylabel="fraction of samples", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    starts, tokens, done = throughput_over_time(run)
    edges = np.append(starts, starts[-1] + 1.0) if starts.size else np.zeros(1)
    ax = axes.flat[len(LATENCIES)]
    ax.stairs(tokens, edges, label="output tok/s")
    ax.set(title="throughput over time (1 s bins)", xlabel="s since start", ylabel="output tokens / s")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.stairs(done, edges, color="tab:orange", label="completed req/s")
    ax2.set(ylabel="requests / s", ylim=(0, None))
    ax.legend(handles=[*ax.get_legend_handles_labels()[0], *ax2.get_legend_handles_labels()[0]], loc="lower right")
    ax.grid(alpha=0.3)
    axes.flat[-1].axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
