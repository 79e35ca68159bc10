"""Self-contained HTML / Markdown reports rendered from run records only.

This package never imports torch and never touches hardware: it reads the files of run directories
(``summary.json``, ``config.json``, ``epochs.csv``, ``power_trace.csv``, ``layers.csv``) and writes one
file. matplotlib draws on an Agg canvas, so no display is needed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ssprop_energy.errors import ConfigError
from ssprop_energy.records import write_text_atomic
from ssprop_energy.report.load import Run, load_run, load_run_dirs

__all__ = ["FORMATS", "MAX_REPORT_BYTES", "Run", "load_run", "load_run_dirs", "render_report", "render_text"]

logger = logging.getLogger(__name__)

FORMATS = ("html", "md", "latex", "model-card")
# The budget for a typical run; larger reports are still written, with a warning.
MAX_REPORT_BYTES = 5 * 1024 * 1024


def render_text(runs: Sequence[Run], fmt: str = "html") -> str:
    """The report for already loaded runs, as a string in ``fmt`` (``html`` or ``md``)."""
    if fmt == "html":
        from ssprop_energy.report.html import render_html

        return render_html(list(runs))
    if fmt == "md":
        from ssprop_energy.report.markdown import render_markdown

        return render_markdown(list(runs))
    if fmt == "latex":
        from ssprop_energy.report.latex import render_latex

        return render_latex(list(runs))
    if fmt == "model-card":
        from ssprop_energy.report.modelcard import render_model_card

        return render_model_card(list(runs))
    raise ConfigError(f"unknown report format {fmt!r} (expected one of: {', '.join(FORMATS)})")


def render_report(
    run_dirs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    out: str | os.PathLike[str],
    fmt: str = "html",
) -> Path:
    """Render one report from one or more run directories and write it atomically to ``out``.

    Args:
        run_dirs: a run directory or a sequence of them (each holding ``summary.json`` etc.).
        out: the output file; its parent directory is created if needed.
        fmt: ``html`` (self-contained page with figures) or ``md`` (the same numbers as Markdown).

    Returns:
        The path written.

    Raises:
        RecordError: a record file is missing or malformed (the message names the file).
        ConfigError: ``fmt`` is unknown.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown report format {fmt!r} (expected one of: {', '.join(FORMATS)})")
    dirs = [run_dirs] if isinstance(run_dirs, (str, os.PathLike)) else list(run_dirs)
    runs = load_run_dirs(dirs)
    text = render_text(runs, fmt)
    size = len(text.encode("utf-8"))
    if size > MAX_REPORT_BYTES:
        logger.warning("report is %.1f MB, above the %.0f MB budget", size / 2**20, MAX_REPORT_BYTES / 2**20)
    path = write_text_atomic(out, text)
    logger.info("wrote %s (%d bytes, %d run(s))", path, size, len(runs))
    return path
