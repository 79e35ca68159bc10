"""Run records: the contract between the harness, the report and the ledger.

A run directory holds:

- ``config.json``       the full configuration, every default filled in;
- ``summary.json``      a :class:`RunSummary` (``schema_version``, config, environment, carbon, arms, paired);
- ``epochs.csv``        one row per (arm, repeat, epoch), the columns of :class:`EpochRecord` plus ``arm`` and
                        ``repeat`` (a text label ``s<seed>r<repeat>``); epochs are numbered from 0;
- ``power_trace.csv``   one row per power sample: ``arm, repeat, t_s, component, power_w, source, phase``
                        (``t_s`` since that arm-run's meter start; ``phase`` ``train dense``, ``train drop D``,
                        ``eval`` or ``other``);
- ``layers.csv``        per-layer FLOPs per arm (``arm, layer, type, flops_forward, flops_backward``): FLOPs per
                        sample of one training step at the arm's nominal drop rate (not the schedule average).

Accuracies are fractions in [0, 1].

This module never imports torch. Every write is atomic (temporary file in the same directory, fsync,
rename), so a reader sees either the old file or the whole new one, never half of it.

Provenance vocabulary (``source`` fields): ``counted`` (FLOPs counted at dispatch), ``counter`` (a hardware
energy counter: RAPL, NVML total energy), ``sampled`` (power samples integrated over time), ``estimated``
(a model such as TDP x utilisation), ``mixed`` (a total over components of different sources; never used
for a single component).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ssprop_energy.errors import RecordError

SCHEMA_VERSION = 1

SOURCES = ("counted", "counter", "sampled", "estimated")
RUN_STATUSES = ("running", "complete", "interrupted", "failed")

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
EPOCHS_FILE = "epochs.csv"
TRACE_FILE = "power_trace.csv"
LAYERS_FILE = "layers.csv"


# --------------------------------------------------------------------------------------------- atomic IO

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes 0600 files; a record should get the usual permissions (0666 less the umask)
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 text atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def _finite(obj: Any) -> Any:
    """Replace NaN/inf by None: JSON has no such numbers and a reader must not guess."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """Serialise ``obj`` (dicts, lists, dataclasses) as indented JSON, atomically."""
    plain = json.loads(json.dumps(obj, default=_json_default))
    text = json.dumps(_finite(plain), indent=2, sort_keys=False, allow_nan=False)
    return write_text_atomic(path, text + "\n")


def write_csv_atomic(
    path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]], columns: Sequence[str]
) -> Path:
    """Write dict rows as CSV with a fixed column order, atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return write_text_atomic(path, buf.getvalue())


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file; a missing or malformed file is a :class:`RecordError` naming the path."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecordError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordError(f"{path}: cannot read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise RecordError(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno})") from None


# --------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class EnergyComponent:
    """Energy of one hardware component over a measured interval.

    Attributes:
        component: ``gpu:0``, ``cpu:package-0``, ``dram:package-0``, ``cpu``, ``ram``, ...
        energy_j: energy in joules, never negative.
        source: ``counter``, ``sampled`` or ``estimated``.
        device: human-readable hardware name (e.g. ``NVIDIA H100 80GB HBM3``, ``Intel Xeon ...``).
        sampled_energy_j: for components that have both a counter and a sampled integral (NVML), the
            sampled figure kept beside the counter one so that their agreement is visible; else None.
    """

    component: str
    energy_j: float
    source: str
    device: str = ""
    sampled_energy_j: float | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise RecordError(f"energy component {self.component!r}: unknown source {self.source!r}")
        if not (self.energy_j >= 0.0):
            raise RecordError(f"energy component {self.component!r}: negative or NaN energy {self.energy_j}")


def total_energy(components: Sequence[EnergyComponent]) -> tuple[float, str]:
    """Sum component energies (J) and name the provenance of the sum.

    Returns:
        ``(energy_j, source)`` where source is the components' common source, or ``mixed`` when they differ
        (a measured and an estimated figure are then added, and the record says so).
    """
    sources = {c.source for c in components}
    energy_j = float(sum(c.energy_j for c in components))
    if not sources:
        return 0.0, "estimated"
    return energy_j, sources.pop() if len(sources) == 1 else "mixed"


@dataclass
class EpochRecord:
    """One epoch of one arm. FLOPs are counted per epoch (``counted``), energy per the meter's sources."""

    epoch: int
    drop_rate: float
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    flops_forward: float
    flops_backward: float
    energy_j: float
    wall_s: float
    lr: float = 0.0


EPOCH_COLUMNS = ["arm", "repeat", *[f.name for f in fields(EpochRecord)]]
TRACE_COLUMNS = ["arm", "repeat", "t_s", "component", "power_w", "source", "phase"]
LAYER_COLUMNS = ["arm", "layer", "type", "flops_forward", "flops_backward"]


@dataclass
class ArmRecord:
    """The result of one arm (dense, or one ssProp setting), averaged over its repeats.

    FLOPs are whole-run totals (training steps only; evaluation is reported separately), energy in joules
    over the training phase, CO2 in grams CO2e (energy x intensity x PUE). ``repeats`` holds the per-run
    figures (one dict per (seed, repeat)); ``paired`` (non-baseline arms) maps a metric to
    ``experiment.stats.paired_stats`` of this arm against the dense baseline: ``n``, ``baseline_mean``,
    ``arm_mean``, ``delta_mean``, ``delta_ci``, ``saving_fraction``, ``saving_ci`` (CIs None below 2 pairs).
    """

    name: str
    drop_rate: float
    schedule: str
    average_drop_rate: float
    test_accuracy: float
    wall_s: float
    flops_forward: float
    flops_backward: float
    flops_backward_conv: float
    energy_j: float
    energy_source: str
    energy_components: list[EnergyComponent]
    co2_g: float
    carbon_intensity_g_per_kwh: float
    pue: float
    epochs: list[EpochRecord]
    test_loss: float = float("nan")
    best_val_accuracy: float = float("nan")
    best_epoch: int = -1
    dropout: float = 0.0
    noise_accuracy: dict[str, float] = field(default_factory=dict)
    phases: dict[str, dict[str, float]] = field(default_factory=dict)
    unattributed_energy_j: float = 0.0
    eval_energy_j: float = 0.0
    idle_power_w: dict[str, float] = field(default_factory=dict)
    repeats: list[dict[str, Any]] = field(default_factory=list)
    paired: dict[str, dict[str, Any]] = field(default_factory=dict)
    status: str = "complete"

    @property
    def flops_total(self) -> float:
        return self.flops_forward + self.flops_backward


@dataclass
class RunSummary:
    """Everything ``summary.json`` holds. ``arms`` maps arm name (``dense``, ``ssprop``, ``ssprop-d0.4-bar``...)
    to its :class:`ArmRecord`; ``paired`` maps a metric to paired-delta statistics of (ssprop - dense)."""

    kind: str
    status: str
    created_at: str
    config: dict[str, Any]
    environment: dict[str, Any]
    carbon: dict[str, Any]
    arms: dict[str, ArmRecord]
    baseline: str = "dense"
    paired: dict[str, dict[str, Any]] = field(default_factory=dict)
    failure_reason: str | None = None
    finished_at: str | None = None
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self, default=_json_default))


def _arm_from_dict(name: str, data: Mapping[str, Any], where: str) -> ArmRecord:
    try:
        comps = [EnergyComponent(**c) for c in data.get("energy_components", [])]
        epochs = [EpochRecord(**e) for e in data.get("epochs", [])]
        known = {f.name for f in fields(ArmRecord)}
        kwargs = {k: v for k, v in data.items() if k in known and k not in ("energy_components", "epochs")}
        kwargs = {k: (float("nan") if v is None and k in _FLOAT_FIELDS else v) for k, v in kwargs.items()}
        return ArmRecord(energy_components=comps, epochs=epochs, **kwargs)
    except TypeError as exc:
        raise RecordError(f"{where}: arm {name!r} is malformed ({exc})") from None


_FLOAT_FIELDS = {f.name for f in fields(ArmRecord) if f.type in ("float", float)}


def summary_from_dict(data: Any, where: str = "summary.json") -> RunSummary:
    """Validate and convert a parsed ``summary.json``; raises :class:`RecordError` naming ``where``."""
    if not isinstance(data, dict):
        raise RecordError(f"{where}: expected a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RecordError(f"{where}: unsupported schema_version {version!r} (expected {SCHEMA_VERSION})")
    missing = [k for k in ("kind", "status", "created_at", "config", "environment", "carbon", "arms") if k not in data]
    if missing:
        raise RecordError(f"{where}: missing field(s) {', '.join(missing)}")
    if data["status"] not in RUN_STATUSES:
        raise RecordError(f"{where}: unknown status {data['status']!r}")
    if not isinstance(data["arms"], dict):
        raise RecordError(f"{where}: 'arms' must be an object")
    arms = {name: _arm_from_dict(name, arm, where) for name, arm in data["arms"].items()}
    known = {f.name for f in fields(RunSummary)}
    rest = {k: v for k, v in data.items() if k in known and k != "arms"}
    return RunSummary(arms=arms, **rest)


def load_summary(run_dir: str | os.PathLike[str]) -> RunSummary:
    """Load ``RUN_DIR/summary.json`` as a validated :class:`RunSummary`."""
    path = Path(run_dir) / SUMMARY_FILE
    return summary_from_dict(read_json(path), where=str(path))


def write_summary(run_dir: str | os.PathLike[str], summary: RunSummary) -> Path:
    """Write ``RUN_DIR/summary.json`` atomically."""
    return write_json_atomic(Path(run_dir) / SUMMARY_FILE, summary.to_dict())


def read_csv_rows(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Read a record CSV as string rows; a missing file is a :class:`RecordError` naming the path."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except FileNotFoundError:
        raise RecordError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise RecordError(f"{path}: cannot read ({exc})") from None
