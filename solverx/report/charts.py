"""The demo report's chart: the rates of the base and every run, as a PNG (matplotlib, no display needed)."""

from __future__ import annotations

import io

from solverx.report.model import BASE, CANDIDATE, RATE_NAMES, DemoReport


def rates_chart_png(report: DemoReport) -> bytes:
    """Grouped bars: domain accuracy, retention and leakage for the base and every fine-tuned variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = report.main
    columns: list[tuple[str, dict]] = []
    if main is not None and BASE in main.rates:
        columns.append(("base", main.rates[BASE]))
    columns += [(v.key, v.rates[CANDIDATE]) for v in report.variants if v.ok]
    fig, ax = plt.subplots(figsize=(7.5, 3.4), dpi=100)
    width = 0.8 / max(len(columns), 1)
    for i, (name, rates) in enumerate(columns):
        values = [rates.get(r) or 0.0 for r in RATE_NAMES]
        xs = [j + (i - (len(columns) - 1) / 2) * width for j in range(len(RATE_NAMES))]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, labels=[f"{v:.0%}" for v in values], fontsize=6, padding=1)
    ax.set_xticks(range(len(RATE_NAMES)), [f"{label}\n({'lower' if r == 'leakage_rate' else 'higher'} is better)"
                                           for r, label in RATE_NAMES.items()])  # fmt: skip
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("share of probes")
    ax.legend(fontsize=7, ncol=min(len(columns), 5), loc="upper center", bbox_to_anchor=(0.5, -0.2))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
