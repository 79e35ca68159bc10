"""The lab-level HTML report of the ledger: totals, per project / month / user / host, the recent runs.

One self-contained page (inline CSS, no scripts, no external fetches) in the run report's style: it reuses
``report/style.css`` and the report's number formatting, so both pages read alike.
"""

from __future__ import annotations

import html
import math
import shlex
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from ssprop_energy import __version__
from ssprop_energy.ledger.summary import summarize
from ssprop_energy.report.text import SOURCE_WORDS, fmt_co2, fmt_energy, fmt_seconds, fmt_si

STYLE_FILE = Path(__file__).resolve().parent.parent / "report" / "style.css"
MAX_RECENT_ROWS = 300

# additions to the run report's style: a bar drawn behind a share of a total
_EXTRA_CSS = """
td.bar { position: relative; min-width: 8rem; }
td.bar span { position: absolute; left: 0; top: 15%; height: 70%; background: #cfe0f3; z-index: 0; }
td.bar b { position: relative; z-index: 1; font-weight: 400; }
.muted { color: var(--muted); }
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value


def _group_table(entries: pd.DataFrame, by: str) -> str:
    table = summarize(entries, by)
    total_co2 = _num(table["co2_g"].sum(min_count=1))
    rows = []
    for key, r in table.iterrows():
        co2 = _num(r["co2_g"])
        share = co2 / total_co2 if total_co2 > 0 and math.isfinite(co2) else 0.0
        status = ", ".join(f"{int(r[s])} {s}" for s in ("failed", "interrupted", "running") if r[s])
        source = r["energy_source"] or "none"
        rows.append(
            f"<tr><td class='text'>{_e(key)}</td><td>{int(r['runs'])}</td>"
            f"<td class='text'>{_e(status) or '<span class=muted>all complete</span>'}</td>"
            f"<td>{_e(fmt_energy(_num(r['energy_j'])))}</td><td class='text'>{_e(source)}</td>"
            f"<td class='bar'><span style='width:{100 * share:.1f}%'></span><b>{_e(fmt_co2(co2))}</b></td>"
            f"<td>{_e(fmt_seconds(_num(r['wall_s'])))}</td>"
            f"<td>{int(r['unmeasured']) or ''}</td></tr>"
        )
    return (
        f"<table><thead><tr><th class='text'>{_e(by)}</th><th>runs</th><th class='text'>not complete</th>"
        "<th>energy</th><th class='text'>energy source</th><th class='text'>CO2e (bar: share of total)</th>"
        "<th>run time</th><th>unmeasured</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def _recent_table(entries: pd.DataFrame) -> str:
    recent = entries.sort_values("id", ascending=False).head(MAX_RECENT_ROWS)
    rows = []
    for _, r in recent.iterrows():
        command = shlex.join(r["command"])
        share = _num(r["cpu_share"])
        attributed = f"{100 * share:.1f}%" if math.isfinite(share) else ""
        rows.append(
            f"<tr><td>{int(r['id'])}</td><td class='text'>{_e(r['started_at'][:16].replace('T', ' '))}</td>"
            f"<td class='text'>{_e(r['project'])}</td><td class='text'>{_e(r['user'])}</td>"
            f"<td class='text'>{_e(r['host'])}</td><td class='text'>{_e(r['kind'])}</td>"
            f"<td class='text'>{_e(r['status'])}</td><td>{'' if pd.isna(r['exit_code']) else int(r['exit_code'])}</td>"
            f"<td>{_e(fmt_seconds(_num(r['wall_s'])))}</td><td>{_e(fmt_si(_num(r['energy_j']), 'J'))}</td>"
            f"<td class='text'>{_e(r['energy_source'] or '')}</td><td>{attributed}</td>"
            f"<td>{_e(fmt_co2(_num(r['co2_g'])))}</td>"
            f"<td class='text'><code>{_e(command[:80] + ('...' if len(command) > 80 else ''))}</code></td></tr>"
        )
    return (
        "<div class='scroll'><table><thead><tr><th>#</th><th class='text'>started (UTC)</th>"
        "<th class='text'>project</th><th class='text'>user</th><th class='text'>host</th><th class='text'>kind</th>"
        "<th class='text'>status</th><th>exit</th><th>run time</th><th>energy</th><th class='text'>source</th>"
        "<th>CPU share</th><th>CO2e</th><th class='text'>command</th></tr></thead><tbody>"
        + "".join(rows) + "</tbody></table></div>"
    )


def _card(label: str, value: str, detail: str = "") -> str:
    return (f"<div class='card'><div class='label'>{_e(label)}</div><div class='value'>{_e(value)}</div>"
            f"<div class='detail'>{_e(detail)}</div></div>")


def render_ledger_html(
    entries: pd.DataFrame,
    *,
    ledger_path: str | Path,
    since: datetime | None = None,
    project: str | None = None,
    pending: Sequence[Path] = (),
) -> str:
    """The ledger report as one HTML page.

    Args:
        entries: rows from :func:`summary.load_entries` (already filtered by ``since``/``project``).
        ledger_path: the ledger file, named in the page.
        since, project: the filters applied, stated in the page.
        pending: JSON fallback rows not yet imported, mentioned so that nobody reads the totals as complete.
    """
    css = STYLE_FILE.read_text(encoding="utf-8") + _EXTRA_CSS
    total = summarize(entries, None)
    scope = []
    if project:
        scope.append(f"project {project}")
    if since is not None:
        scope.append(f"runs started since {since.isoformat(timespec='minutes')}")
    body = [f"<h1>Carbon audit</h1><p class='sub'>Ledger {_e(ledger_path)}; "
            f"{_e(', '.join(scope) or 'all runs')}; generated "
            f"{_e(datetime.now(timezone.utc).isoformat(timespec='minutes'))} by ssprop-energy {_e(__version__)}.</p>"]
    if pending:
        body.append(f"<div class='banner'>{len(pending)} run(s) could not be written to the ledger and wait as JSON "
                    f"files in {_e(pending[0].parent)}; they are not in these totals "
                    "(<code>ssprop-energy audit import</code> adds them).</div>")
    if entries.empty:
        body.append("<p>No runs recorded.</p>")
    else:
        t = total.iloc[0]
        source = t["energy_source"] or "none"
        body.append("<div class='cards'>"
                    + _card("runs", f"{int(t['runs'])}",
                            f"{int(t['complete'])} complete, {int(t['failed'])} failed, "
                            f"{int(t['interrupted'])} interrupted, {int(t['running'])} running")
                    + _card("energy", fmt_energy(_num(t["energy_j"])), SOURCE_WORDS.get(source, source))
                    + _card("CO2e", fmt_co2(_num(t["co2_g"])), "energy x grid intensity x PUE, per run")
                    + _card("run time", fmt_seconds(_num(t["wall_s"])), f"{int(t['unmeasured'])} run(s) unmeasured")
                    + "</div>")
        if source in ("estimated", "mixed"):
            body.append("<div class='banner'>Some energy figures are estimated from a power model, not measured; "
                        "the energy-source columns say which.</div>")
        for by, title in (("project", "By project"), ("month", "By month (UTC)"), ("user", "By user"),
                          ("host", "By host")):
            body.append(f"<h2>{title}</h2>{_group_table(entries, by)}")
        body.append(f"<h2>Runs</h2><p class='sub'>Most recent first (at most {MAX_RECENT_ROWS}).</p>"
                    + _recent_table(entries))
    body.append(
        "<h2>How these figures are made</h2><p class='note'>Energy is what each run's meter read: hardware "
        "counters (RAPL, NVML) where available, integrated power samples, or an estimate from a power model, as "
        "the source columns say. Runs wrapped by <code>ssprop-energy audit run</code> on a machine-wide source "
        "are charged the share of CPU and memory energy equal to their process tree's share of the machine's busy "
        "CPU time (the CPU-share column); GPU energy is charged whole. CO2e = energy x the grid carbon "
        "intensity recorded with each run x PUE. Runs still running, and runs whose meter failed, count as runs "
        "but add no energy. Commands are shown as recorded (redacted where asked).</p>"
    )
    body.append(f"<footer>ssprop-energy {_e(__version__)} carbon-audit ledger report.</footer>")
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'><title>Carbon audit</title>"
        f"<style>{css}</style></head><body>" + "".join(body) + "</body></html>\n"
    )
