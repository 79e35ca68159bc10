"""Read run directories into validated records and pandas tables, for the report only.

The report trusts nothing it reads: a missing or malformed file is a :class:`RecordError` naming the file
(and the line, for CSVs). Required files: ``summary.json``, ``config.json``, ``epochs.csv``. Optional files:
``power_trace.csv`` (an estimate-only meter may record no trace) and ``layers.csv``; their absence is
listed in the report, never guessed around.

Conventions read here (the harness writes them):

- accuracies are fractions in [0, 1]; a value above 1 is rejected rather than shown as 9000%;
- ``ArmRecord.paired`` (each non-baseline arm) maps a metric (``energy_j``, ``co2_g``, ``wall_s``,
  ``flops_backward``, ``flops_backward_conv``, ``flops_total``, ``test_accuracy``) to the output of
  ``experiment.stats.paired_stats``: ``n``, ``baseline_mean``, ``arm_mean``, ``delta_mean`` (arm - baseline),
  ``delta_ci`` ([low, high] or None), ``saving_fraction`` (1 - arm/baseline), ``saving_ci``, ``confidence``.
  An arm without it falls back to ``RunSummary.paired`` when the run has exactly one non-baseline arm
  (a compare run copies its arm's statistics there);
- ``repeat`` in the CSVs is a label (``s0r1``: seed 0, repeat 1), kept as text.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from ssprop_energy.errors import RecordError
from ssprop_energy.records import (
    CONFIG_FILE,
    EPOCH_COLUMNS,
    EPOCHS_FILE,
    LAYER_COLUMNS,
    LAYERS_FILE,
    SLICES_FILE,
    SOURCES,
    SUMMARY_FILE,
    TRACE_COLUMNS,
    TRACE_FILE,
    ArmRecord,
    PairedStat,
    RunSummary,
    load_summary,
    read_csv_rows,
    read_json,
)

logger = logging.getLogger(__name__)

DEFAULT_CI_LEVEL = 0.95


@dataclass
class Run:
    """One run directory, validated.

    Attributes:
        path: the run directory.
        summary: the parsed ``summary.json``.
        config: the parsed ``config.json``.
        epochs: ``epochs.csv`` as a DataFrame (one row per arm, repeat, epoch; numeric columns as floats).
        trace: ``power_trace.csv`` as a DataFrame, or None when the file is absent.
        layers: ``layers.csv`` as a DataFrame, or None when the file is absent.
        paired: arm name -> metric -> :class:`PairedStat` (arms without repeats statistics are absent).
        missing: names of optional files that are absent.
        samples: generation runs: arm name -> ``{"s0r0": PNG bytes}``, the sample grids the arm's record
            names (a named file that is absent is listed in ``missing``, never guessed).
        slices: ``slices.csv`` as a DataFrame, or None for records that predate it.
    """

    path: Path
    summary: RunSummary
    config: dict[str, Any]
    epochs: pd.DataFrame
    trace: pd.DataFrame | None
    layers: pd.DataFrame | None
    paired: dict[str, dict[str, PairedStat]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    samples: dict[str, dict[str, bytes]] = field(default_factory=dict)
    slices: pd.DataFrame | None = None

    @property
    def arms(self) -> dict[str, ArmRecord]:
        return self.summary.arms

    @property
    def is_generation(self) -> bool:
        """A generation run (DDPM): a quality figure (Frechet distance) in place of accuracy."""
        return self.summary.task == "generation"

    @property
    def baseline_name(self) -> str | None:
        """The baseline arm's name, or None when the run has no baseline arm (e.g. interrupted before it)."""
        return self.summary.baseline if self.summary.baseline in self.summary.arms else None

    @property
    def baseline(self) -> ArmRecord | None:
        name = self.baseline_name
        return None if name is None else self.summary.arms[name]

    @property
    def sparse_arm_names(self) -> list[str]:
        """Every arm except the baseline, in record order."""
        return [name for name in self.summary.arms if name != self.summary.baseline]

    @property
    def title(self) -> str:
        """``model on dataset`` from the config, falling back to the directory name."""
        cfg = self.summary.config or self.config
        model, dataset = cfg.get("model"), cfg.get("dataset")
        if model and dataset:
            return f"{model} on {dataset}"
        return self.path.name

    @property
    def planned_epochs(self) -> int | None:
        """Epochs the configuration asked for (None if the config does not say)."""
        cfg = self.summary.config or self.config
        value = cfg.get("epochs")
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# ------------------------------------------------------------------------------------------ CSV readers


def _frame(
    path: Path, columns: Sequence[str], numeric: Sequence[str], integer: Sequence[str] = ()
) -> pd.DataFrame:
    """Read a record CSV, check its header and convert numeric columns, naming the file and line on error."""
    rows = read_csv_rows(path)
    header = _header(path)
    absent = [c for c in columns if c not in header]
    if absent:
        raise RecordError(f"{path}: missing column(s) {', '.join(absent)}")
    for lineno, row in enumerate(rows, start=2):
        if None in row or any(row.get(c) is None for c in columns):
            raise RecordError(f"{path}: line {lineno}: wrong number of fields")
        for col in numeric:
            try:
                value = float(row[col])
            except ValueError:
                raise RecordError(f"{path}: line {lineno}: column {col!r} is not a number ({row[col]!r})") from None
            if col in integer and not (math.isfinite(value) and value == int(value)):
                raise RecordError(f"{path}: line {lineno}: column {col!r} is not an integer ({row[col]!r})")
    frame = pd.DataFrame(rows, columns=list(header)) if rows else pd.DataFrame(columns=list(header))
    frame = frame[list(columns)].copy()
    for col in numeric:
        # every value passed float() above; "nan" (a generation run's accuracies, a diverged loss) is one pd.to_numeric refuses
        frame[col] = frame[col].map(float).astype(float)
    for col in integer:
        frame[col] = frame[col].astype(int)
    return frame


def _header(path: Path) -> list[str]:
    """The CSV's column names (``read_csv_rows`` returns none for a file with no data rows)."""
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            return next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise RecordError(f"{path}: cannot read ({exc})") from None


def read_epochs(path: Path, arms: Mapping[str, ArmRecord]) -> pd.DataFrame:
    """``epochs.csv`` as a DataFrame; every row's arm must exist in the summary."""
    numeric = [c for c in EPOCH_COLUMNS if c not in ("arm", "repeat")]
    frame = _frame(path, EPOCH_COLUMNS, numeric, integer=("epoch",))
    _check_arms(path, frame, arms)
    for col in ("train_accuracy", "val_accuracy"):
        bad = frame[(frame[col] < 0) | (frame[col] > 1)]
        if len(bad):
            lineno = int(bad.index[0]) + 2
            raise RecordError(f"{path}: line {lineno}: {col} {bad[col].iloc[0]} is not a fraction in [0, 1]")
    return frame


def read_trace(path: Path, arms: Mapping[str, ArmRecord]) -> pd.DataFrame:
    """``power_trace.csv`` as a DataFrame; sources must be in the provenance vocabulary."""
    frame = _frame(path, TRACE_COLUMNS, ["t_s", "power_w"])
    _check_arms(path, frame, arms)
    bad = frame[~frame["source"].isin(SOURCES)]
    if len(bad):
        raise RecordError(f"{path}: line {int(bad.index[0]) + 2}: unknown source {bad['source'].iloc[0]!r}")
    return frame


def read_layers(path: Path, arms: Mapping[str, ArmRecord]) -> pd.DataFrame:
    """``layers.csv`` as a DataFrame."""
    frame = _frame(path, LAYER_COLUMNS, ["flops_forward", "flops_backward"])
    _check_arms(path, frame, arms)
    return frame


def read_slices(path: Path, arms: Mapping[str, ArmRecord]) -> pd.DataFrame:
    """``slices.csv`` as a DataFrame (machine readings that were not taken are NaN)."""
    readings = ("foreign_cpu_cores_mean", "foreign_cpu_cores_max", "gpu_foreign_processes_max")
    frame = _frame(path, ["arm", "seed", "repeat", "epoch", "index", "order", "t_start_s", "wall_s", "batches",
                          "samples", "drop_rate", "energy_j", *readings],
                   ["t_start_s", "wall_s", "drop_rate", "energy_j"],
                   ["seed", "repeat", "epoch", "index", "order", "batches", "samples"])
    for col in readings:  # empty where the monitor did not run
        frame[col] = pd.to_numeric(frame[col].replace("", None), errors="coerce")
    _check_arms(path, frame, arms)
    return frame


def _check_arms(path: Path, frame: pd.DataFrame, arms: Mapping[str, ArmRecord]) -> None:
    unknown = frame[~frame["arm"].isin(list(arms))]
    if len(unknown):
        raise RecordError(
            f"{path}: line {int(unknown.index[0]) + 2}: arm {unknown['arm'].iloc[0]!r} is not in {SUMMARY_FILE}"
        )


# ------------------------------------------------------------------------------------------ paired stats


def parse_paired(summary: RunSummary, where: str = "") -> dict[str, dict[str, PairedStat]]:
    """Every non-baseline arm's paired statistics as ``{arm: {metric: PairedStat}}`` (see module docstring);
    ``records.summary_from_dict`` has validated them already."""
    out: dict[str, dict[str, PairedStat]] = {}
    sparse = [name for name in summary.arms if name != summary.baseline]
    for name in sparse:
        if summary.arms[name].paired:
            out[name] = dict(summary.arms[name].paired)
    if summary.paired and len(sparse) == 1 and sparse[0] not in out:
        out[sparse[0]] = dict(summary.paired)
    return out


# ------------------------------------------------------------------------------------------ loading


def _check_arm_values(where: str, arms: Mapping[str, ArmRecord]) -> None:
    for name, arm in arms.items():
        for label in ("test_accuracy", "best_val_accuracy"):
            value = getattr(arm, label)
            if value is not None and math.isfinite(value) and not 0.0 <= value <= 1.0:
                raise RecordError(f"{where}: arm {name!r}: {label} {value} is not a fraction in [0, 1]")
        for label in ("wall_s", "flops_forward", "flops_backward", "flops_backward_conv", "energy_j", "co2_g"):
            value = getattr(arm, label)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RecordError(f"{where}: arm {name!r}: {label} must be a number, got {value!r}")
            if not value >= 0.0:
                raise RecordError(f"{where}: arm {name!r}: {label} {value} is negative or missing")
        if arm.energy_source not in (*SOURCES, "mixed"):  # SOURCES holds "fake"
            raise RecordError(f"{where}: arm {name!r}: unknown energy_source {arm.energy_source!r}")


def load_run(run_dir: str | Path) -> Run:
    """Load and validate one run directory. Raises :class:`RecordError` naming the offending file."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RecordError(f"{path}: not a run directory (no such directory)")
    summary = load_summary(path)
    where = str(path / SUMMARY_FILE)
    _check_arm_values(where, summary.arms)
    paired = parse_paired(summary, where)
    config = read_json(path / CONFIG_FILE)
    if not isinstance(config, dict):
        raise RecordError(f"{path / CONFIG_FILE}: expected a JSON object")
    missing: list[str] = []
    if summary.status != "complete" and not (path / EPOCHS_FILE).exists():
        # an unfinished run (stopped before any arm-run finished, or by a full disk): report what it has
        epochs = pd.DataFrame({c: pd.Series(dtype=str if c in ("arm", "repeat") else float) for c in EPOCH_COLUMNS})
        epochs["epoch"] = epochs["epoch"].astype(int)
        missing.append(EPOCHS_FILE)
    else:
        epochs = read_epochs(path / EPOCHS_FILE, summary.arms)
    trace = layers = None
    if (path / TRACE_FILE).exists():
        trace = read_trace(path / TRACE_FILE, summary.arms)
    else:
        missing.append(TRACE_FILE)
    if (path / LAYERS_FILE).exists():
        layers = read_layers(path / LAYERS_FILE, summary.arms)
    else:
        missing.append(LAYERS_FILE)
    slices = read_slices(path / SLICES_FILE, summary.arms) if (path / SLICES_FILE).exists() else None
    samples = read_samples(path, summary.arms, missing)
    if missing:
        logger.info("%s: optional record file(s) absent: %s", path, ", ".join(missing))
    return Run(path, summary, config, epochs, trace, layers, paired, missing, samples, slices)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_samples(path: Path, arms: Mapping[str, ArmRecord], missing: list[str]) -> dict[str, dict[str, bytes]]:
    """The sample grids named by generation arms (``sampling.grid_files``), as PNG bytes.

    A named file that is absent goes to ``missing``; one that is not a PNG, or a name that leaves the run
    directory, is a :class:`RecordError`.
    """
    out: dict[str, dict[str, bytes]] = {}
    for name, arm in arms.items():
        for label, file in (arm.sampling.get("grid_files") or {}).items():
            if not file:
                continue
            if Path(file).name != file:
                raise RecordError(f"{path / SUMMARY_FILE}: arm {name!r}: sample grid {file!r} is not a file name")
            target = path / file
            if not target.exists():
                missing.append(file)
                continue
            data = target.read_bytes()
            if not data.startswith(PNG_SIGNATURE):
                raise RecordError(f"{target}: not a PNG image")
            out.setdefault(name, {})[label] = data
    return out


def load_run_dirs(run_dirs: Sequence[str | Path]) -> list[Run]:
    """Load several run directories for the report, in the order given (``ssprop_energy.load_runs`` is the
    DataFrame loader for users)."""
    if not run_dirs:
        raise RecordError("no run directory given")
    return [load_run(d) for d in run_dirs]


def repeat_count(arm: ArmRecord) -> int:
    """How many repeats an arm's averages cover (1 when the record lists none)."""
    return max(1, len(arm.repeats))


def arm_table(run: Run) -> pd.DataFrame:
    """One row per arm with the record's headline fields (the report's per-arm summary table)."""
    rows = []
    for name, arm in run.arms.items():
        row: dict[str, Any] = {
            "arm": name,
            "drop_rate": arm.drop_rate,
            "schedule": arm.schedule,
            "average_drop_rate": arm.average_drop_rate,
            "dropout": arm.dropout,
            "test_accuracy": arm.test_accuracy,
            "best_val_accuracy": arm.best_val_accuracy,
            "best_epoch": arm.best_epoch,
            "wall_s": arm.wall_s,
            "flops_forward": arm.flops_forward,
            "flops_backward": arm.flops_backward,
            "flops_backward_conv": arm.flops_backward_conv,
            "energy_j": arm.energy_j,
            "energy_source": arm.energy_source,
            "co2_g": arm.co2_g,
            "repeats": repeat_count(arm),
            "epochs": len(arm.epochs),
            "status": arm.status,
            # the layers ssProp replaced and their share of a dense step's backward FLOPs (NaN: not recorded)
            "sparsified_layers": arm.layer_coverage.layers if arm.layer_coverage is not None else math.nan,
            "sparsified_backward_share": arm.layer_coverage.share if arm.layer_coverage is not None else math.nan,
        }
        for level, acc in sorted(arm.noise_accuracy.items()):
            row[f"noise_accuracy_{level}"] = acc
        if run.is_generation:
            # no accuracy: the quality figure, the test noise MSE and the sampling window instead
            for key in ("test_accuracy", "best_val_accuracy"):
                row.pop(key)
            row = {"arm": name, **({arm.quality_metric: arm.quality_value} if arm.quality_metric else {}),
                   "test_noise_mse": arm.test_loss, **{k: v for k, v in row.items() if k != "arm"},
                   "sample_wall_s": arm.sample_wall_s, "sample_energy_j": arm.sample_energy_j,
                   "sample_energy_source": arm.sample_energy_source}
        rows.append(row)
    return pd.DataFrame(rows)
