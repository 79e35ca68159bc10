"""The carbon-audit ledger: every measured run of a lab, in one SQLite file or on a PostgreSQL server.

The harness (``compare``/``sweep``) and ``ssprop-energy audit run`` append themselves::

    from ssprop_energy import ledger

    entry = ledger.start_entry(kind="compare", project="resnet-cifar", tags=["ablation"],
                               command=sys.argv, run_dir=run_dir, redact=False)
    ...                                          # the run; a crash leaves the `running` row as evidence
    entry.finish("complete",                     # or "failed" / "interrupted"
                 components=report.components,   # list[records.EnergyComponent], joules
                 co2_g=None,                     # None: energy x intensity x PUE, computed here
                 intensity_g_per_kwh=ci.g_per_kwh, pue=1.0, intensity_source=ci.source,
                 energy_source=report.source, exit_code=None, note=None)

``start_entry`` writes a ``running`` row at once; ``finish`` completes it. Neither raises when the ledger is
locked or corrupt: the row is written as JSON to ``RUN_DIR/ledger_entry.json`` (or ``<ledger>.pending/``)
with a warning, and ``ssprop-energy audit import`` brings it in later. ``finish`` raises only
:class:`~ssprop_energy.errors.ConfigError` for a bad status, and :class:`~ssprop_energy.errors.LedgerError`
when no file at all could be written.

The ledger is ``$SSPROP_ENERGY_LEDGER`` (or ``--ledger``): a file path (SQLite), or a
``postgresql://user@host:port/dbname`` URL (a lab server; rows that cannot reach it are spooled locally and
sent later, see :mod:`.db` and :func:`sync_pending`); else ``ledger.sqlite`` in the user's data directory
(platformdirs). :func:`locate` resolves and validates the name. The project defaults to ``$SSPROP_ENERGY_PROJECT``, else ``default``; user and host are the
login name and the host name. The ledger stores no environment variables and nothing else the caller did not
pass; with ``redact=True`` the command keeps only its program name.

Statuses are the run records' (:data:`records.RUN_STATUSES`): ``running``, ``complete``, ``failed``,
``interrupted``; readers label a killed run ``partial`` when its running row holds a heartbeat's energy
(:meth:`LedgerEntry.heartbeat`). ``finish`` stores ``energy_j`` as the sum of the components and ``energy_source`` as their
common source (``mixed`` when a measured and an estimated figure are added); a caller's total or CO2 that
disagrees with the parts is replaced by the parts' figure, with a warning. ``finish(..., attribution=...)``
and :class:`AttributedComponent` record the machine-wide figure and the share beside an attributed one.

Reading: :func:`load_entries` (a pandas DataFrame), :func:`summarize`, :func:`export_csv`, and
``ledger.html.render_ledger_html``. Wrapping any command: :func:`run_wrapped` (``ssprop-energy audit run``).
Rows written as JSON while the ledger was unusable: :func:`pending_rows`, :func:`import_fallback`,
:func:`sync_pending`. CodeCarbon runs: :mod:`.codecarbon`. Copying a file ledger to a server: :mod:`.migrate`.
Shared GPUs: :mod:`.gpushare`. Who ran where: the SLURM job metadata of :func:`job_metadata`.
"""

from __future__ import annotations

from ssprop_energy.ledger.attribution import AttributedComponent, CpuAttribution, attribute, cpu_share
from ssprop_energy.ledger.db import SCHEMA_VERSION, LedgerLocation, connect, default_ledger_path, locate, pending_dir
from ssprop_energy.ledger.entries import (
    LedgerEntry,
    import_fallback,
    job_metadata,
    pending_rows,
    redact_command,
    start_entry,
    sync_pending,
)
from ssprop_energy.ledger.summary import export_csv, load_entries, parse_since, summarize
from ssprop_energy.ledger.wrap import WrapResult, run_wrapped

__all__ = [
    "SCHEMA_VERSION",
    "AttributedComponent",
    "CpuAttribution",
    "LedgerEntry",
    "LedgerLocation",
    "WrapResult",
    "attribute",
    "connect",
    "cpu_share",
    "default_ledger_path",
    "export_csv",
    "import_fallback",
    "job_metadata",
    "load_entries",
    "locate",
    "parse_since",
    "pending_dir",
    "pending_rows",
    "redact_command",
    "run_wrapped",
    "start_entry",
    "summarize",
    "sync_pending",
]
