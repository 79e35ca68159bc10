"""Run records: the contract between the harness, the report and the ledger.

A run directory holds:

- ``config.json``       the full configuration, every default filled in;
- ``summary.json``      a :class:`RunSummary` (``schema_version``, config, environment, carbon, arms, paired);
- ``epochs.csv``        one row per (arm, repeat, epoch), the columns of :class:`EpochRecord` plus ``arm`` and
                        ``repeat`` (a text label ``s<seed>r<repeat>``); epochs are numbered from 0;
- ``power_trace.csv``   one row per power sample: ``arm, repeat, t_s, component, power_w, source, phase``
                        (``t_s`` since that arm-run's meter start; ``phase`` ``train dense``, ``train drop D``,
                        ``eval`` or ``other``);
- ``slices.csv``        one row per slice of training (``--interleave slice``: a fixed number of batches of one
                        arm-run, the arms taking turns; otherwise one slice per epoch): the columns of
                        :class:`SliceRecord` plus ``arm``;
- ``layers.csv``        per-layer FLOPs per arm (``arm, layer, type, flops_forward, flops_backward``): FLOPs per
                        sample of one training step at the arm's nominal drop rate (not the schedule average).

Accuracies are fractions in [0, 1]. A generation run (``task`` ``generation``, the DDPM UNet) has no accuracy:
its accuracy fields are NaN (``null`` in JSON), its losses are the noise-prediction MSE, and its quality figure is
``fid`` (Inception-v3) or ``fid_classifier`` (a small classifier's features; lower is better), with the
extractor, sample count and comparability note in ``quality`` and the end-of-run sampling metered apart
(``sample_wall_s``, ``sample_energy_components``); its sample grids are ``samples_<arm>__s<seed>__r<repeat>.png``.

This module never imports torch. Every write is atomic (temporary file in the same directory, fsync,
rename), so a reader sees either the old file or the whole new one, never half of it.

Provenance vocabulary (``source`` fields): ``counted`` (FLOPs counted at dispatch), ``counter`` (a hardware
energy counter: RAPL, NVML total energy), ``sampled`` (power samples integrated over time), ``estimated``
(a model such as TDP x utilisation), ``fake`` (a synthetic trace from the fake meter: no hardware was
read), ``mixed`` (a total over components of different measured/estimated sources; never used for a single
component, never for a total that holds a ``fake`` component, which is ``fake``).

Version 2 records may also hold, added later without a version change (absent in older files; readers take
defaults): ``measurement`` (warm-up and slice length), per-arm ``headline`` (the clean-pair estimate of the
time and energy change, :class:`Headline`) and per-arm-run ``slices``.

Schema version 2 (this one) adds ``interleave``, per-arm ``interference`` and ``epoch_intervals``, types
``carbon`` and ``paired``, and drops version 1's write-only ``flops_per_sample`` / ``meter_components`` and
its duplicate ``eval_energy_j`` (evaluation energy is ``phases["eval"]``). Version 1 directories still load.
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
from ssprop_energy.layer_coverage import KindCoverage, LayerCoverage

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)

SOURCES = ("counted", "counter", "sampled", "estimated", "fake")
RUN_STATUSES = ("running", "complete", "interrupted", "failed")

# what ``comm_share`` (ArmRun, ArmRecord) measures, for every place that shows it
COMM_SHARE_LABEL = ("timed: training wall time with a gradient all-reduce in flight (it overlaps the backward "
                    "pass), as a share of training time")

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
EPOCHS_FILE = "epochs.csv"
TRACE_FILE = "power_trace.csv"
LAYERS_FILE = "layers.csv"
SLICES_FILE = "slices.csv"


# --------------------------------------------------------------------------------------------- atomic IO

_UMASK = os.umask(0)
os.umask(_UMASK)


class RecordWriteError(RecordError, OSError):
    """A record file could not be written (full disk, read-only folder...): an OSError (callers with a
    fallback still catch it) and a :class:`RecordError` (the CLI prints one line naming the file)."""

    def __init__(self, path: str | os.PathLike[str], exc: OSError) -> None:
        OSError.__init__(self, exc.errno, exc.strerror or str(exc), str(path))

    def __str__(self) -> str:
        return f"{self.filename}: cannot write ({self.strerror})"


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename). Returns the path.

    Raises:
        RecordWriteError: the file cannot be written (full disk, read-only folder...); the message names it.
    """
    path = Path(path)
    tmp = ""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        # mkstemp makes 0600 files; a record should get the usual permissions (0666 less the umask)
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            if tmp:
                os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, RecordWriteError):
            # name the file (the OSError of a write names none): "disk full" alone does not say what is lost
            raise RecordWriteError(path, exc) from exc
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


def _float_none_to_nan(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with null in ``cls``'s float fields read back as NaN: the writer stores NaN/inf as null (a
    diverged loss, an unmeasured figure), and arithmetic on the loaded record must see a float."""
    floats = {f.name for f in fields(cls) if f.type in ("float", float)}
    return {k: (math.nan if v is None and k in floats else v) for k, v in data.items()}


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
        source: ``counter``, ``sampled``, ``estimated`` or ``fake``.
        device: human-readable hardware name (e.g. ``NVIDIA H100 80GB HBM3``, ``Intel Xeon ...``).
        sampled_energy_j: for components that have both a counter and a sampled integral (NVML), the
            sampled figure kept beside the counter one so that their agreement is visible; else None.
        rank: in a distributed run, the global rank whose meter read it (its GPU, its process's CPU
            estimate); None for a node-wide counter or a single-process run.
        node: in a distributed run, the node (torchrun ``GROUP_RANK``) it belongs to; None single-process.
        below_resolution: the window was shorter than the counter's update period, or held fewer than two
            power samples: the figure is quantisation or interpolation, not a measurement of that window.
    """

    component: str
    energy_j: float
    source: str
    device: str = ""
    sampled_energy_j: float | None = None
    rank: int | None = None
    node: int | None = None
    below_resolution: bool = False

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise RecordError(f"energy component {self.component!r}: unknown source {self.source!r}")
        if not (self.energy_j >= 0.0):
            raise RecordError(f"energy component {self.component!r}: negative or NaN energy {self.energy_j}")


def total_energy(components: Sequence[EnergyComponent]) -> tuple[float, str]:
    """Sum component energies (J) and name the provenance of the sum (over every rank and node).

    Returns:
        ``(energy_j, source)`` where source is the components' common source, or ``mixed`` when they differ
        (a measured and an estimated figure are then added, and the record says so). A synthetic component
        makes the whole sum ``fake``: a total that holds any synthetic joule is synthetic.
    """
    sources = {c.source for c in components}
    energy_j = float(sum(c.energy_j for c in components))
    if not sources:
        return 0.0, "estimated"
    if "fake" in sources:
        return energy_j, "fake"
    return energy_j, sources.pop() if len(sources) == 1 else "mixed"


def add_components(*groups: Iterable[EnergyComponent], scale: float = 1.0) -> list[EnergyComponent]:
    """Sum components over several intervals by (component, source, device, rank, node), each energy x
    ``scale``."""
    sums: dict[tuple[str, str, str, int | None, int | None], float] = {}
    short: dict[tuple[str, str, str, int | None, int | None], bool] = {}
    for group in groups:
        for c in group:
            key = (c.component, c.source, c.device, c.rank, c.node)
            sums[key] = sums.get(key, 0.0) + c.energy_j * scale
            # a sum is below resolution only when every part was (longer totals average the edge reads out)
            short[key] = short.get(key, True) and c.below_resolution
    return [EnergyComponent(component=k[0], source=k[1], device=k[2], energy_j=v, rank=k[3], node=k[4],
                            below_resolution=short[k]) for k, v in sums.items()]


def energy_by(components: Sequence[EnergyComponent], label: str) -> dict[int | None, tuple[float, str]]:
    """Energy (J) and its provenance per ``rank`` or per ``node`` label (``total_energy`` of each group).

    Per node, every component of the node counts (its ranks' GPUs and CPU estimates, and its node-wide
    counters); per rank, the node-wide counters have no rank and fall under None.
    """
    groups: dict[int | None, list[EnergyComponent]] = {}
    for c in components:
        groups.setdefault(getattr(c, label), []).append(c)
    return {k: total_energy(v) for k, v in sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))}


@dataclass
class EpochRecord:
    """One epoch of one arm. FLOPs are counted per epoch (``counted``), energy per the meter's sources.

    ``energy_j`` and ``wall_s`` cover the epoch's training window only (its validation is in the ``eval``
    phase); ``energy_j`` is what the meter's window over that epoch's training returned.
    """

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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EpochRecord:
        return cls(**_float_none_to_nan(cls, data))

    @property
    def diverged(self) -> bool:
        """True when a loss of this epoch is NaN or infinite (the optimisation blew up)."""
        return not (math.isfinite(self.train_loss) and math.isfinite(self.val_loss))


EPOCH_COLUMNS = ["arm", "repeat", *[f.name for f in fields(EpochRecord)]]
_EPOCH_FLOATS = {f.name for f in fields(EpochRecord) if f.type in ("float", float)}


def epoch_from_dict(data: Mapping[str, Any]) -> EpochRecord:
    """An :class:`EpochRecord` from JSON, where ``null`` stands for NaN (a generation run's accuracies)."""
    return EpochRecord(**{k: (math.nan if v is None and k in _EPOCH_FLOATS else v) for k, v in data.items()})


QUALITY_METRICS = ("fid", "fid_classifier")  # generation: Frechet distance by extractor (lower is better)
SAMPLES_FILE = "samples_{name}.png"  # a generation arm-run's sample grid, name = <arm>__s<seed>__r<repeat>
TRACE_COLUMNS = ["arm", "repeat", "t_s", "component", "power_w", "source", "phase"]
LAYER_COLUMNS = ["arm", "layer", "type", "flops_forward", "flops_backward"]


@dataclass(frozen=True)
class PairedStat:
    """Paired statistics of one metric, an arm against the baseline (``experiment.stats.paired_stats``).

    Attributes:
        n: number of pairs.
        baseline_mean, arm_mean: the two arms' means, in the metric's unit (None in version-1 records that
            did not keep them).
        delta_mean: mean of (arm - baseline), in the metric's unit.
        delta_ci: interval of ``delta_mean`` or None (fewer than 2 pairs).
        saving_fraction: 1 - mean(arm) / mean(baseline), or None when the baseline mean is 0.
        saving_ci: interval of ``saving_fraction`` or None.
        confidence: the intervals' confidence level.
    """

    n: int
    delta_mean: float
    delta_ci: tuple[float, float] | None
    saving_fraction: float | None
    saving_ci: tuple[float, float] | None
    confidence: float = 0.95
    baseline_mean: float | None = None
    arm_mean: float | None = None


WITHIN_RUN_LABEL = "within-run machine noise, not seed-to-seed variation"


@dataclass(frozen=True)
class EpochInterval:
    """A single-run interval of a time or energy change, from per-epoch paired ratios.

    Each epoch e of the arm is paired with epoch e of the baseline (the same schedule phase: a dense epoch of
    a bar schedule pairs with a dense-arm epoch, a sparse one likewise). ``change`` is
    ``sum(arm) / sum(baseline) - 1`` over all paired epochs (negative: the arm spent less); ``ci`` is a
    stratified bootstrap interval that resamples epochs within each drop-rate phase, so the schedule's mix
    of phases is kept. It measures how much the machine's noise within this run moves the figure, not how
    much a different seed would (``--seeds`` measures that).

    Attributes:
        metric: ``wall_s`` or ``energy_j``.
        n_epochs: paired epochs used.
        phases: epochs per phase, e.g. ``{"0": 2, "0.8": 2}`` (phase = the arm's drop rate in that epoch).
        change: the point estimate (fraction).
        ci: ``[low, high]`` of ``change`` or None (fewer than 2 epochs in every phase).
        confidence: the interval's level.
        label: what the interval measures, for every place that shows it.
    """

    metric: str
    n_epochs: int
    phases: dict[str, int]
    change: float
    ci: tuple[float, float] | None
    confidence: float = 0.95
    label: str = WITHIN_RUN_LABEL


@dataclass(frozen=True)
class CarbonBlock:
    """The carbon figures of a run: one intensity and PUE for every CO2 number in it."""

    intensity_g_per_kwh: float
    source: str
    region: str = ""
    pue: float = 1.0
    pue_source: str = ""


@dataclass
class Interference:
    """What else the machine was doing while an arm ran, per epoch window and summarised.

    ``epochs`` holds one reading per (seed, repeat, epoch) window: the monitor's unit-named fields
    (``foreign_cpu_cores_mean``, ``foreign_cpu_cores_max``, ``cpu_freq_mhz_mean``, ``gpu_*``...) plus
    ``seed``, ``repeat`` and ``epoch``. ``affected_epochs`` names the windows where the foreign load was
    material, as ``s<seed>r<repeat>e<epoch>`` labels with epochs counted from 1.
    """

    epochs: list[dict[str, Any]] = field(default_factory=list)
    foreign_cpu_cores_mean: float | None = None
    foreign_cpu_cores_max: float | None = None
    affected_epochs: list[str] = field(default_factory=list)
    threshold_cores: float = 0.25


@dataclass
class RepeatFigures:
    """The headline figures of one (seed, repeat) arm-run, kept beside the arm's means."""

    seed: int
    repeat: int
    test_accuracy: float
    wall_s: float
    energy_j: float
    co2_g: float
    flops_forward: float
    flops_backward: float
    flops_backward_conv: float
    # provenance of energy_j / co2_g ("" in version-1 records, where the arm's energy_source applies)
    energy_source: str = ""
    eval_energy_j: float | None = None  # evaluation windows (validation + final test), not in energy_j
    fid: float | None = None
    fid_classifier: float | None = None
    sample_wall_s: float | None = None
    sample_energy_j: float | None = None
    diverged_epoch: int | None = None


# A slice is clean (usable for the headline's pairs) below both: the mean foreign busy cores over it (the
# monitor's threshold) and the busiest sampled interval inside it.
SLICE_CLEAN_MEAN_CORES = 0.25
SLICE_CLEAN_PEAK_CORES = 0.5


@dataclass(frozen=True)
class SliceRecord:
    """One slice of an arm-run's training: consecutive batches run without another arm in between.

    Times are seconds (``t_start_s`` since the group's meter started), energy joules over the slice's
    ``train`` window (counters read at its edges; a sampled trace integrated over it; the estimate as
    elsewhere) with its provenance in ``energy_source``. The machine readings come from the interference
    monitor over the slice (None where it did not run: other ranks, ``--no-monitor``): ``cpu_s`` is this
    process tree's CPU time, ``foreign_cpu_cores_*`` the busy cores outside it, ``steal_cpu_cores_mean`` the
    hypervisor's share, ``cpu_freq_mhz_mean`` the mean clock where readable, and the ``gpu_*`` fields as in
    :class:`~ssprop_energy.energy.interference.InterferenceReading`. Slice ``index`` counts within the epoch:
    slice ``index`` of two arms of a pair ran next to each other in time (``order`` counts turns in the group).
    """

    seed: int
    repeat: int
    epoch: int
    index: int
    order: int
    first_batch: int
    batches: int
    samples: int
    drop_rate: float
    t_start_s: float
    wall_s: float
    energy_j: float
    energy_source: str
    cpu_s: float | None = None
    foreign_cpu_cores_mean: float | None = None
    foreign_cpu_cores_max: float | None = None
    steal_cpu_cores_mean: float | None = None
    cpu_freq_mhz_mean: float | None = None
    gpu_foreign_processes_max: int | None = None
    gpu_throttle_reasons: str = ""
    gpu_temperature_c_max: float | None = None

    @property
    def clean(self) -> bool:
        """True when the monitor saw no foreign load in the slice (or did not run: nothing to judge by)."""
        if self.foreign_cpu_cores_mean is None:
            return True
        if self.foreign_cpu_cores_mean >= SLICE_CLEAN_MEAN_CORES:
            return False
        if (self.foreign_cpu_cores_max or 0.0) >= SLICE_CLEAN_PEAK_CORES:
            return False
        return (self.gpu_foreign_processes_max or 0) == 0

    @classmethod
    def from_reading(cls, reading: Any = None, **values: Any) -> SliceRecord:
        """A slice from its own figures and the monitor's reading over it (or None)."""
        if reading is not None:
            values.update(
                cpu_s=reading.own_cpu_cores_mean * reading.wall_s,
                foreign_cpu_cores_mean=reading.foreign_cpu_cores_mean,
                foreign_cpu_cores_max=reading.foreign_cpu_cores_max,
                steal_cpu_cores_mean=reading.steal_cpu_cores_mean, cpu_freq_mhz_mean=reading.cpu_freq_mhz_mean,
                gpu_foreign_processes_max=reading.gpu_foreign_processes_max,
                gpu_throttle_reasons=" ".join(reading.gpu_throttle_reasons),
                gpu_temperature_c_max=reading.gpu_temperature_c_max)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SliceRecord:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if values.get("energy_j") is None:
            values["energy_j"] = math.nan
        return cls(**values)


SLICE_COLUMNS = ["arm", *[f.name for f in fields(SliceRecord)]]  # seed and repeat are fields


@dataclass(frozen=True)
class Measurement:
    """How a run's arms were measured: the interleaving, the warm-up and the slice length.

    Attributes:
        interleave: ``slice``, ``epoch`` or ``none``.
        warmup_rounds: warm-up rounds run before the first measured batch (each: every arm-run's drop rates,
            the short last batch and an evaluation batch, on copies of the models).
        warmup_stable: whether the round times were steady when the warm-up ended (False: it hit its bound).
        warmup_wall_s: the warm-up's wall time (s; not charged to any arm, metered by no arm window).
        step_s: the steady full-batch training step time measured at the warm-up's end (s).
        slice_batches: batches per slice (``slice`` only), chosen once from ``step_s``; the same on every rank.
        slice_target_s: the slice length aimed at (s).
        oversubscribed: set when foreign busy cores plus this run's torch threads exceeded the CPUs during the
            run (the warning it printed, naming the ``--threads`` value to use); None otherwise.
    """

    interleave: str
    warmup_rounds: int = 0
    warmup_stable: bool = False
    warmup_wall_s: float = 0.0
    step_s: float = math.nan
    slice_batches: int | None = None
    slice_target_s: float | None = None
    oversubscribed: str | None = None


HEADLINE_METRICS = ("wall_s", "energy_j")
VERDICTS = ("measured", "inconclusive")


@dataclass(frozen=True)
class Headline:
    """The time or energy change of an arm against the baseline, estimated from clean adjacent slice pairs.

    Field names are a stable contract (``summary.json`` ``arms.<arm>.headline.<metric>``; other tools read
    them). ``change`` is a fraction (negative: the arm spent less), ``ci`` its ``[low, high]`` block-bootstrap
    interval over pairs (None when it cannot be formed), ``clean_share`` the fraction of the run's slice pairs
    that saw no foreign load and were used, ``pairs`` how many were used (of ``pairs_total``), ``method`` how
    it was estimated, and ``verdict`` ``measured`` or ``inconclusive`` (``reason`` says why).
    """

    change: float
    ci: tuple[float, float] | None
    clean_share: float
    pairs: int
    method: str
    verdict: str
    pairs_total: int = 0
    confidence: float = 0.95
    reason: str = ""
    phases: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "headline") -> Headline:
        if not isinstance(data, Mapping):
            raise RecordError(f"{where}: must be an object")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        try:
            values["change"] = math.nan if values.get("change") is None else float(values["change"])
            values["ci"] = _interval(values.get("ci"), f"{where}.ci")
            if values.get("verdict") not in VERDICTS:
                raise RecordError(f"{where}: unknown verdict {values.get('verdict')!r}")
            return cls(**values)
        except TypeError as exc:
            raise RecordError(f"{where}: malformed ({exc})") from None


@dataclass
class ArmRun:
    """One arm trained once (one seed, one repeat): what ``runs/<arm>__s<seed>__r<repeat>.json`` holds.

    Energy is the sum of the meter's training windows of this arm (``energy_components``); ``phases`` maps
    the meter's window names (``train``, ``eval``, ``data``, ``forward``, ``backward``, ``optimizer``) to
    ``{"energy_j", "wall_s", "count"}``. ``trace`` rows are ``[t_s, component, power_w, source, phase]``
    (t_s since the meter started), ``layers`` per-layer FLOPs per sample at the arm's nominal drop rate.

    Generation (``task == "generation"``): ``test_accuracy`` / ``best_val_accuracy`` are NaN, ``test_loss`` is
    the fixed-noise MSE on the test split at the best epoch; ``fid`` or ``fid_classifier`` is the Frechet
    distance of the end-of-run samples (``quality`` holds the extractor, its provenance, the sample counts and
    the comparability note); ``sample_wall_s`` and ``sample_energy_components`` are the sampling window's own
    time and energy, NOT part of ``energy_components`` (training); ``sampling`` says how the samples were drawn
    and names their grid file.

    A distributed run (``world_size`` > 1 processes on ``nodes`` nodes) is one record: FLOPs and energy
    summed over ranks (each energy component labelled with its ``rank`` / ``node``), accuracy and losses
    reduced over ranks, ``ranks`` one entry per rank (node, host, device, meter sources, FLOPs, energy,
    all-reduce time), ``comm_share`` the mean over ranks of the training time with a gradient all-reduce
    in flight (``timed``); trace components are prefixed ``r<rank>:``.

    ``layer_coverage`` (ssProp arms; None for the dense one) counts the sparsified layers per kind and their
    backward FLOPs in a *dense* step (drop rate 0), i.e. the share of the backward ssProp can reach.
    ``diverged_epoch`` is the first epoch (from 0) whose loss was NaN/inf, or None (see :func:`diverged_epoch`).
    """

    arm: str
    seed: int
    repeat: int
    test_accuracy: float
    test_loss: float
    best_epoch: int
    best_val_accuracy: float
    wall_s: float
    eval_wall_s: float
    flops_forward: float
    flops_backward: float
    flops_backward_conv: float
    average_drop_rate: float
    energy_components: list[EnergyComponent]
    epochs: list[EpochRecord]
    phases: dict[str, dict[str, float]] = field(default_factory=dict)
    noise_accuracy: dict[str, float] = field(default_factory=dict)
    interference: list[dict[str, Any]] = field(default_factory=list)
    trace: list[list[Any]] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    world_size: int = 1
    nodes: int = 1
    ranks: list[dict[str, Any]] = field(default_factory=list)
    comm_share: float | None = None
    layer_coverage: LayerCoverage | None = None
    task: str = "classification"
    fid: float | None = None
    fid_classifier: float | None = None
    quality: dict[str, Any] = field(default_factory=dict)
    sample_wall_s: float | None = None
    sample_energy_components: list[EnergyComponent] = field(default_factory=list)
    sampling: dict[str, Any] = field(default_factory=dict)
    diverged_epoch: int | None = None
    slices: list[SliceRecord] = field(default_factory=list)

    @property
    def energy_j(self) -> float:
        return total_energy(self.energy_components)[0]

    @property
    def energy_source(self) -> str:
        return total_energy(self.energy_components)[1]

    @property
    def sample_energy_j(self) -> float | None:
        """Energy of the sampling window (J), or None for a run that did not sample."""
        return total_energy(self.sample_energy_components)[0] if self.sample_energy_components else None

    @property
    def quality_metric(self) -> str | None:
        """``fid`` or ``fid_classifier`` (whichever this run has), or None for classification."""
        return next((m for m in QUALITY_METRICS if getattr(self, m) is not None), None)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self, default=_json_default))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "arm-run") -> ArmRun:
        try:
            kwargs = {k: (math.nan if v is None and k in _ARM_RUN_FLOATS else v)
                      for k, v in data.items() if k in _ARM_RUN_FIELDS}
            kwargs["energy_components"] = [EnergyComponent(**c) for c in data.get("energy_components", [])]
            kwargs["sample_energy_components"] = [EnergyComponent(**c) for c in data.get("sample_energy_components", [])]
            kwargs["epochs"] = [epoch_from_dict(e) for e in data.get("epochs", [])]
            kwargs["layer_coverage"] = layer_coverage_from_dict(data.get("layer_coverage"), where)
            kwargs["slices"] = [SliceRecord.from_dict(x) for x in data.get("slices", [])]
            run = cls(**kwargs)
        except (TypeError, AttributeError) as exc:
            raise RecordError(f"{where}: malformed arm-run record ({exc})") from None
        if run.diverged_epoch is None:  # records written before the field existed
            run.diverged_epoch = diverged_epoch(run.epochs, run.test_loss)
        return run

    @property
    def diverged(self) -> bool:
        return self.diverged_epoch is not None


def diverged_epoch(epochs: Sequence[EpochRecord], test_loss: float) -> int | None:
    """The first epoch (from 0) whose training or validation loss was NaN/inf; the last epoch when only
    the final test loss was; None when every loss is finite."""
    for e in epochs:
        if e.diverged:
            return e.epoch
    if not math.isfinite(test_loss):
        return epochs[-1].epoch if epochs else 0
    return None


_ARM_RUN_FIELDS = {f.name for f in fields(ArmRun)}
_ARM_RUN_FLOATS = {f.name for f in fields(ArmRun) if f.type in ("float", float)}


@dataclass
class ArmRecord:
    """The result of one arm (dense, or one ssProp setting), averaged over its (seed, repeat) runs.

    FLOPs are whole-run totals (training steps only; evaluation is reported separately), energy in joules
    over the training windows, CO2 in grams CO2e (energy x intensity x PUE). A generation arm carries its
    quality figure (``fid`` / ``fid_classifier``, mean over runs, details in ``quality``) where classification
    carries ``test_accuracy`` (NaN here), and its sampling window's mean time and energy (``sample_*``, apart
    from the training energy, with their own provenance). ``repeats`` holds the per-run
    figures; ``paired`` (non-baseline arms) maps a metric to its :class:`PairedStat` against the dense
    baseline; ``epoch_intervals`` maps ``wall_s`` / ``energy_j`` to the single-run :class:`EpochInterval`.
    A distributed arm (``world_size`` processes on ``nodes`` nodes) sums FLOPs and energy over processes, its
    components labelled ``rank`` / ``node``; ``comm_share`` is the mean over its runs of ``ArmRun.comm_share``
    (:data:`COMM_SHARE_LABEL`), None single-process.
    ``phases`` holds the meter's windows (``train``, ``eval``, and ``data`` / ``forward`` / ``backward`` /
    ``optimizer`` nested in ``train``); ``unattributed_energy_j`` is the training energy outside the nested
    step windows (version 1: the meter's energy outside every top-level window).
    ``layer_coverage`` (ssProp arms) says how many layers of each kind were sparsified and what share of a
    dense step's backward FLOPs they hold (None for the dense arm and in records that predate it).

    ``diverged_runs`` labels the arm-runs whose loss became NaN/inf, ``s<seed>r<repeat>e<epoch>`` (epoch from
    1, the first diverged one): they are left out of the means, pairs and intervals. When every arm-run
    diverged, ``status`` is ``diverged`` and the figures are those of the diverged runs (the time, FLOPs and
    energy they spent; accuracy and loss NaN).
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
    idle_power_w: dict[str, float] = field(default_factory=dict)
    repeats: list[RepeatFigures] = field(default_factory=list)
    paired: dict[str, PairedStat] = field(default_factory=dict)
    epoch_intervals: dict[str, EpochInterval] = field(default_factory=dict)
    interference: Interference | None = None
    status: str = "complete"
    diverged_runs: list[str] = field(default_factory=list)
    world_size: int = 1
    nodes: int = 1
    comm_share: float | None = None
    layer_coverage: LayerCoverage | None = None
    task: str = "classification"
    fid: float | None = None
    fid_classifier: float | None = None
    quality: dict[str, Any] = field(default_factory=dict)
    sample_wall_s: float | None = None
    sample_energy_j: float | None = None
    sample_energy_source: str | None = None
    sample_energy_components: list[EnergyComponent] = field(default_factory=list)
    sampling: dict[str, Any] = field(default_factory=dict)
    headline: dict[str, Headline] = field(default_factory=dict)

    @property
    def quality_metric(self) -> str | None:
        """``fid`` or ``fid_classifier`` (whichever this arm has), or None for classification."""
        return next((m for m in QUALITY_METRICS if getattr(self, m) is not None), None)

    @property
    def quality_value(self) -> float | None:
        """The arm's mean Frechet distance (lower is better), or None for classification."""
        metric = self.quality_metric
        return None if metric is None else float(getattr(self, metric))

    @property
    def flops_total(self) -> float:
        return self.flops_forward + self.flops_backward

    @property
    def eval_energy_j(self) -> float:
        """Energy of the evaluation windows (validation each epoch and the final test), J; not in ``energy_j``."""
        return float(self.phases.get("eval", {}).get("energy_j", 0.0))


@dataclass
class RunSummary:
    """Everything ``summary.json`` holds. ``arms`` maps arm name (``dense``, ``ssprop``, ``ssprop-d0.4-bar``...)
    to its :class:`ArmRecord`; ``paired`` maps a metric to paired-delta statistics of (ssprop - dense).

    ``world_size`` / ``nodes``: processes and nodes of a distributed run (1 / 1 otherwise; the ranks' hosts,
    devices and meters are in ``environment["distributed"]``).

    ``interleave`` says how arms were ordered in time: ``epoch`` (each epoch of every arm back to back, the
    order alternating ABBA epoch by epoch) or ``none`` (one arm-run after the other, ABBA by pair).
    ``layer_kinds`` are the layer kinds ssProp replaced: ``--layers``, or the model's default when the
    config's ``layers`` is null (empty in records that predate it).
    """

    kind: str
    status: str
    created_at: str
    config: dict[str, Any]
    environment: dict[str, Any]
    carbon: CarbonBlock
    arms: dict[str, ArmRecord]
    baseline: str = "dense"
    paired: dict[str, PairedStat] = field(default_factory=dict)
    interleave: str = "none"
    failure_reason: str | None = None
    finished_at: str | None = None
    layer_kinds: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
    world_size: int = 1
    nodes: int = 1
    task: str = "classification"
    generation: dict[str, Any] | None = None  # generation runs: the diffusion, sampling and extractor settings
    measurement: Measurement | None = None  # warm-up and slice length (absent in older records)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self, default=_json_default))


# --------------------------------------------------------------------------------------------- parsing


def _number(value: Any, where: str) -> float | None:
    """A finite number, or None for null/NaN/inf (the JSON writer turns non-finite numbers into null)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(f"{where}: expected a number, got {value!r}")
    return float(value) if math.isfinite(value) else None


def _interval(value: Any, where: str) -> tuple[float, float] | None:
    if value is None:
        return None
    if not (isinstance(value, (list, tuple)) and len(value) == 2):
        raise RecordError(f"{where}: expected [low, high] or null, got {value!r}")
    low, high = _number(value[0], where), _number(value[1], where)
    if low is None or high is None:
        return None
    if low > high:
        raise RecordError(f"{where}: low {low} is above high {high}")
    return (low, high)


def paired_stat_from_dict(data: Any, where: str) -> PairedStat:
    """Validate one paired statistic; raises :class:`RecordError` naming ``where``."""
    if not isinstance(data, Mapping):
        raise RecordError(f"{where}: expected an object of paired statistics, got {data!r}")
    delta = _number(data.get("delta_mean"), f"{where}.delta_mean")
    if delta is None:
        raise RecordError(f"{where}: 'delta_mean' is missing or not finite")
    n = data.get("n")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RecordError(f"{where}: 'n' must be a positive integer, got {n!r}")
    level = _number(data.get("confidence", 0.95), f"{where}.confidence")
    if level is None or not 0.0 < level < 1.0:
        raise RecordError(f"{where}: confidence must be in (0, 1), got {data.get('confidence')!r}")
    return PairedStat(
        n=n,
        delta_mean=delta,
        delta_ci=_interval(data.get("delta_ci"), f"{where}.delta_ci"),
        saving_fraction=_number(data.get("saving_fraction"), f"{where}.saving_fraction"),
        saving_ci=_interval(data.get("saving_ci"), f"{where}.saving_ci"),
        confidence=level,
        baseline_mean=_number(data.get("baseline_mean"), f"{where}.baseline_mean"),
        arm_mean=_number(data.get("arm_mean"), f"{where}.arm_mean"),
    )


def _paired_from_dict(data: Any, where: str) -> dict[str, PairedStat]:
    if not isinstance(data, Mapping):
        raise RecordError(f"{where}: expected an object mapping metrics to statistics")
    return {metric: paired_stat_from_dict(stat, f"{where}.{metric}") for metric, stat in data.items()}


def _epoch_interval_from_dict(data: Any, where: str) -> EpochInterval:
    if not isinstance(data, Mapping) or "change" not in data:
        raise RecordError(f"{where}: expected an epoch interval object, got {data!r}")
    change = _number(data["change"], f"{where}.change")
    if change is None:
        raise RecordError(f"{where}: 'change' is not a finite number")
    try:
        return EpochInterval(
            metric=str(data["metric"]), n_epochs=int(data["n_epochs"]), phases=dict(data.get("phases", {})),
            change=change, ci=_interval(data.get("ci"), f"{where}.ci"),
            confidence=float(data.get("confidence", 0.95)), label=str(data.get("label", WITHIN_RUN_LABEL)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise RecordError(f"{where}: malformed epoch interval ({exc})") from None


_V1_REPEAT_DROPPED = ("meter_components",)  # written by version 1, never read


def layer_coverage_from_dict(data: Any, where: str) -> LayerCoverage | None:
    """A record's ``layer_coverage`` (``{"kinds": {kind: {"layers", "flops_backward"}}, "flops_backward"}``)
    as a :class:`~ssprop_energy.layer_coverage.LayerCoverage`; None stays None."""
    if data is None:
        return None
    if isinstance(data, LayerCoverage):
        return data
    try:
        kinds = {str(k): KindCoverage(int(v["layers"]), float(v["flops_backward"])) for k, v in data["kinds"].items()}
        total = float(data["flops_backward"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RecordError(f"{where}: malformed layer_coverage ({type(exc).__name__}: {exc})") from None
    if not total >= 0.0 or any(not (c.layers >= 0 and c.flops_backward >= 0.0) for c in kinds.values()):
        raise RecordError(f"{where}: layer_coverage holds a negative or missing count")
    return LayerCoverage(kinds=kinds, flops_backward=total)


def _arm_from_dict(name: str, data: Mapping[str, Any], where: str, version: int) -> ArmRecord:
    if not isinstance(data, Mapping):
        raise RecordError(f"{where}: arm {name!r} must be an object")
    try:
        comps = [EnergyComponent(**c) for c in data.get("energy_components", [])]
        sample_comps = [EnergyComponent(**c) for c in data.get("sample_energy_components", [])]
        epochs = [epoch_from_dict(e) for e in data.get("epochs", [])]
        repeat_fields = {f.name for f in fields(RepeatFigures)}
        repeats = [RepeatFigures(**_float_none_to_nan(RepeatFigures, {k: v for k, v in r.items() if k in repeat_fields}))
                   for r in data.get("repeats", [])]
        interference = None
        if data.get("interference") is not None:
            interference = Interference(**data["interference"])
        coverage = layer_coverage_from_dict(data.get("layer_coverage"), f"{where}: arms.{name}")
        kwargs = {k: v for k, v in data.items() if k in _ARM_FIELDS and k not in _ARM_NESTED}
        kwargs = {k: (float("nan") if v is None and k in _FLOAT_FIELDS else v) for k, v in kwargs.items()}
        record = ArmRecord(energy_components=comps, epochs=epochs, repeats=repeats, interference=interference,
                           sample_energy_components=sample_comps, layer_coverage=coverage, **kwargs)
    except TypeError as exc:
        raise RecordError(f"{where}: arm {name!r} is malformed ({exc})") from None
    record.paired = _paired_from_dict(data.get("paired") or {}, f"{where}: arms.{name}.paired")
    record.epoch_intervals = {
        m: _epoch_interval_from_dict(v, f"{where}: arms.{name}.epoch_intervals.{m}")
        for m, v in (data.get("epoch_intervals") or {}).items()
    }
    record.headline = {m: Headline.from_dict(v, f"{where}: arms.{name}.headline.{m}")
                       for m, v in (data.get("headline") or {}).items()}
    if version == 1 and "eval" not in record.phases and data.get("eval_energy_j"):
        # version 1 kept evaluation energy twice; when its phases lack it, keep the duplicate's figure
        record.phases["eval"] = {"energy_j": float(data["eval_energy_j"]), "wall_s": math.nan, "count": math.nan}
    return record


_ARM_FIELDS = {f.name for f in fields(ArmRecord)}
_ARM_NESTED = {"energy_components", "epochs", "repeats", "paired", "epoch_intervals", "interference",
               "sample_energy_components", "layer_coverage", "headline"}
_FLOAT_FIELDS = {f.name for f in fields(ArmRecord) if f.type in ("float", float)}


def _carbon_from_dict(data: Any, where: str) -> CarbonBlock:
    if isinstance(data, CarbonBlock):
        return data
    if not isinstance(data, Mapping):
        raise RecordError(f"{where}: 'carbon' must be an object")
    intensity = data.get("intensity_g_per_kwh", data.get("g_per_kwh"))
    value = _number(intensity, f"{where}: carbon.intensity_g_per_kwh")
    pue = _number(data.get("pue"), f"{where}: carbon.pue")
    return CarbonBlock(
        intensity_g_per_kwh=math.nan if value is None else value, source=str(data.get("source") or ""),
        region=str(data.get("region") or data.get("country") or ""), pue=math.nan if pue is None else pue,
        pue_source=str(data.get("pue_source") or ""),
    )


def summary_from_dict(data: Any, where: str = "summary.json") -> RunSummary:
    """Validate and convert a parsed ``summary.json`` (schema version 1 or 2); raises :class:`RecordError`.

    Version 1 (before the typed records) is read into the same types: its write-only fields are dropped,
    its duplicate evaluation energy folded into ``phases``, and ``interleave`` is ``none`` (it had none).
    """
    if not isinstance(data, dict):
        raise RecordError(f"{where}: expected a JSON object")
    version = data.get("schema_version")
    if version not in READABLE_SCHEMA_VERSIONS:
        raise RecordError(
            f"{where}: unsupported schema_version {version!r} (this version reads "
            f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))})"
        )
    missing = [k for k in ("kind", "status", "created_at", "config", "environment", "carbon", "arms") if k not in data]
    if missing:
        raise RecordError(f"{where}: missing field(s) {', '.join(missing)}")
    if data["status"] not in RUN_STATUSES:
        raise RecordError(f"{where}: unknown status {data['status']!r}")
    if not isinstance(data["arms"], dict):
        raise RecordError(f"{where}: 'arms' must be an object")
    arms = {name: _arm_from_dict(name, arm, where, version) for name, arm in data["arms"].items()}
    known = {f.name for f in fields(RunSummary)}
    rest = {k: v for k, v in data.items()
            if k in known and k not in ("arms", "carbon", "paired", "schema_version", "measurement")}
    measurement = None
    if isinstance(data.get("measurement"), Mapping):
        mfields = {f.name for f in fields(Measurement)}
        try:
            measurement = Measurement(**{k: v for k, v in data["measurement"].items() if k in mfields})
        except TypeError as exc:
            raise RecordError(f"{where}: measurement is malformed ({exc})") from None
    return RunSummary(
        measurement=measurement,
        arms=arms, carbon=_carbon_from_dict(data["carbon"], where),
        paired=_paired_from_dict(data.get("paired") or {}, f"{where}: paired"), schema_version=version,
        **rest,
    )


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
