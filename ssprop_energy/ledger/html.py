"""The lab-level HTML report of the ledger: totals, per project / month / user / host, a per-month chart of
energy and CO2 per project, and the recent runs with who ran them where (user, host, SLURM job, GPUs).

One self-contained page (inline CSS, figures as ``data:`` URIs, no scripts, no external fetches) in the run
report's style: it reuses ``report/style.css``, the report's figure rendering and its number formatting, so
both pages read alike.
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
from ssprop_energy.energy.carbon import J_PER_KWH
from ssprop_energy.ledger.summary import summarize
from ssprop_energy.report.figures import PHASE_COLOURS, FigureData, new_figure, render_figure
from ssprop_energy.report.text import SOURCE_WORDS, fmt_co2, fmt_energy, fmt_seconds, fmt_si

STYLE_FILE = Path(__file__).resolve().parent.parent / "report" / "style.css"
MAX_RECENT_ROWS = 300
MAX_CHART_PROJECTS = 8  # more projects than this: the smallest are drawn together as "other"

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
        status = ", ".join(f"{int(r[s])} {s}" for s in ("failed", "interrupted", "partial", "running") if r[s])
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
        gpu_share = _num(r.get("gpu_share"))
        gpu = _e(r.get("cuda_visible_devices") or "")
        if math.isfinite(gpu_share):
            gpu += f" <span class='muted'>({100 * gpu_share:.0f}% by {_e(r.get('gpu_share_method'))})</span>"
        where = " ".join(x for x in (_e(r.get("slurm_partition") or ""), _e(r.get("slurm_nodelist") or "")) if x)
        rows.append(
            f"<tr><td>{int(r['id'])}</td><td class='text'>{_e(r['started_at'][:16].replace('T', ' '))}</td>"
            f"<td class='text'>{_e(r['project'])}</td><td class='text'>{_e(r['user'])}</td>"
            f"<td class='text'>{_e(r['host'])}</td><td class='text'>{_e(_job(r))}</td>"
            f"<td class='text'>{where}</td><td class='text'>{gpu}</td><td class='text'>{_e(r['kind'])}</td>"
            f"<td class='text'>{_e(r['status'])}</td><td>{'' if pd.isna(r['exit_code']) else int(r['exit_code'])}</td>"
            f"<td>{_e(fmt_seconds(_num(r['wall_s'])))}</td><td>{_e(fmt_si(_num(r['energy_j']), 'J'))}</td>"
            f"<td class='text'>{_e(r['energy_source'] or '')}</td><td>{attributed}</td>"
            f"<td>{_e(fmt_co2(_num(r['co2_g'])))}</td>"
            f"<td class='text'><code>{_e(command[:80] + ('...' if len(command) > 80 else ''))}</code></td></tr>"
        )
    return (
        "<div class='scroll'><table><thead><tr><th>#</th><th class='text'>started (UTC)</th>"
        "<th class='text'>project</th><th class='text'>user</th><th class='text'>host</th>"
        "<th class='text'>SLURM job</th><th class='text'>partition / nodes</th><th class='text'>GPUs (share)</th>"
        "<th class='text'>kind</th>"
        "<th class='text'>status</th><th>exit</th><th>run time</th><th>energy</th><th class='text'>source</th>"
        "<th>CPU share</th><th>CO2e</th><th class='text'>command</th></tr></thead><tbody>"
        + "".join(rows) + "</tbody></table></div>"
    )


def monthly_table(entries: pd.DataFrame, column: str) -> pd.DataFrame:
    """Sum of ``column`` (``energy_j`` or ``co2_g``) per UTC month (rows) and project (columns), over runs
    with an energy figure; the largest :data:`MAX_CHART_PROJECTS` projects by energy, the rest as ``other``."""
    measured = entries[entries["energy_j"].notna()]
    if measured.empty:
        return pd.DataFrame()
    totals = measured.groupby("project")["energy_j"].sum().sort_values(ascending=False, kind="stable")
    keep = list(totals.index[:MAX_CHART_PROJECTS])
    project = measured["project"].where(measured["project"].isin(keep), "other")
    order = keep + (["other"] if (project == "other").any() else [])
    months = sorted(measured["month"].unique())
    values = pd.to_numeric(measured[column], errors="coerce").astype(float)
    return (measured.assign(p=project, v=values).pivot_table(index="month", columns="p", values="v", aggfunc="sum")
            .reindex(index=months, columns=order).fillna(0.0))


def monthly_chart(entries: pd.DataFrame) -> FigureData | None:
    """Stacked bars per UTC month: energy (kWh) and CO2e (kg) per project; None when nothing was measured."""
    energy = monthly_table(entries, "energy_j")
    if energy.empty:
        return None
    months, order = list(energy.index), list(energy.columns)
    fig, (ax_e, ax_c) = new_figure(4.6, nrows=2, sharex=True)
    x = range(len(months))
    for ax, col, scale, unit in ((ax_e, "energy_j", J_PER_KWH, "energy (kWh)"), (ax_c, "co2_g", 1000.0, "CO2e (kg)")):
        table = monthly_table(entries, col) / scale
        bottom = [0.0] * len(months)
        for k, name in enumerate(order):
            values = list(table[name])
            ax.bar(x, values, bottom=bottom, color=PHASE_COLOURS[k % len(PHASE_COLOURS)], label=name, width=0.7)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_ylabel(unit)
    ax_c.set_xticks(list(x), months, rotation=45 if len(months) > 8 else 0)
    ax_e.legend(loc="upper left", ncols=min(4, len(order)))
    sources = sorted(set(entries.loc[entries["energy_j"].notna(), "energy_source"].dropna()))
    return render_figure(fig, "monthly", "Energy and CO2e per month and project",
                   f"Sum over runs started in each UTC month (energy sources: {', '.join(sources)}); "
                   "runs without an energy figure add nothing.")


def _figure(fig: FigureData) -> str:
    return (f"<figure data-figure='{_e(fig.key)}'><img src='{fig.uri}' alt='{_e(fig.title)}' "
            f"width='{fig.width_px}' height='{fig.height_px}'>"
            f"<figcaption><b>{_e(fig.title)}.</b> {_e(fig.caption)}</figcaption></figure>")


def _job(r: pd.Series) -> str:
    job = r.get("slurm_job_id")
    if not job:
        return ""
    task = r.get("slurm_array_task_id")
    return f"{job}_{task}" if task else str(job)


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
        since: the start of the period shown (named in the page), or None for all time.
        project: the project shown (named in the page), or None for every project.
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
                            f"{int(t['interrupted'])} interrupted, {int(t['partial'])} partial, "
                            f"{int(t['running'])} running")
                    + _card("energy", fmt_energy(_num(t["energy_j"])), SOURCE_WORDS.get(source, source))
                    + _card("CO2e", fmt_co2(_num(t["co2_g"])), "energy x grid intensity x PUE, per run")
                    + _card("run time", fmt_seconds(_num(t["wall_s"])), f"{int(t['unmeasured'])} run(s) unmeasured")
                    + "</div>")
        if source in ("estimated", "mixed"):
            body.append("<div class='banner'>Some energy figures are estimated from a power model, not measured; "
                        "the energy-source columns say which.</div>")
        chart = monthly_chart(entries)
        if chart is not None:
            body.append("<h2>Per month and project</h2>" + _figure(chart))
        groups = [("project", "By project"), ("month", "By month (UTC)"), ("user", "By user"), ("host", "By host")]
        if entries["slurm_partition"].notna().any():
            groups.append(("partition", "By SLURM partition"))
        for by, title in groups:
            body.append(f"<h2>{title}</h2>{_group_table(entries, by)}")
        body.append(f"<h2>Runs</h2><p class='sub'>Most recent first (at most {MAX_RECENT_ROWS}).</p>"
                    + _recent_table(entries))
    body.append(
        "<h2>How these figures are made</h2><p class='note'>Energy is what each run's meter read: hardware "
        "counters (RAPL, NVML) where available, integrated power samples, or an estimate from a power model, as "
        "the source columns say. Runs wrapped by <code>ssprop-energy audit run</code> on a machine-wide source "
        "are charged the share of CPU and memory energy equal to their process tree's share of the machine's busy "
        "CPU time (the CPU-share column); a GPU shared with other processes is charged the command's share from "
        "NVML's per-process utilisation (or its share of the compute processes), otherwise whole. Rows of kind "
        "<code>codecarbon</code> were imported from CodeCarbon's emissions CSV: their energy and CO2e are "
        "CodeCarbon's (source <code>codecarbon</code>, its tracking mode in their tags). CO2e = energy x the grid "
        "carbon intensity recorded with each run x PUE. Runs still running, and runs whose meter failed, count as runs "
        "but add no energy; <code>partial</code> runs were killed and are charged what was measured up to their "
        "last heartbeat. Commands are shown as recorded (redacted where asked).</p>"
    )
    body.append(f"<footer>ssprop-energy {_e(__version__)} carbon-audit ledger report.</footer>")
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'><title>Carbon audit</title>"
        f"<style>{css}</style></head><body>" + "".join(body) + "</body></html>\n"
    )
