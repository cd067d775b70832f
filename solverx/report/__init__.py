"""The demo's report: the seed's table, the rates of every run, the ablations and what did or did not reproduce.

Input is a :class:`DemoReport` (filled by :mod:`solverx.demo` from the runs' own ``report.json`` and loss charts);
output is Markdown, one self-contained HTML page and ``report.json``. ``model`` (what a report holds) · ``verdicts``
(the seed's table, the findings) · ``charts`` · ``render`` (Markdown, HTML, the files).
"""

from solverx.report.charts import rates_chart_png
from solverx.report.model import (
    BASE,
    CANDIDATE,
    GROUNDED,
    DemoReport,
    Variant,
    language_of,
    languages_note,
    model_rates,
)
from solverx.report.render import base_description, render_html, render_markdown, report_json, write_report
from solverx.report.verdicts import Finding, SeedRow, findings, seed_table

__all__ = [
    "BASE", "CANDIDATE", "GROUNDED", "DemoReport", "Finding", "SeedRow", "Variant", "base_description", "findings",
    "language_of", "languages_note", "model_rates", "rates_chart_png", "render_html", "render_markdown", "report_json",
    "seed_table", "write_report",
]  # fmt: skip
