"""Paired dense-vs-ssProp experiments: one engine for ``compare`` (one ssProp arm) and ``sweep`` (a grid).

Pairing: every arm of a (seed, repeat) pair starts from the same initial weights (built once per seed) and
sees the same data order and RNG stream (``Trainer`` re-seeds per epoch). Pairs run in ABBA order (the arm
order is reversed on every other pair) so that slow drift of the machine (thermals, background load) does
not favour one arm.

Run directory (see ``records.py``): ``config.json``, ``summary.json`` (status ``running`` until the end),
``runs/<arm>__s<seed>__r<repeat>.json`` (one finished arm-run each, so ``--resume`` skips them),
``checkpoints/`` (the arm-run in progress), and at the end ``epochs.csv``, ``power_trace.csv``,
``layers.csv``.
"""

from __future__ import annotations

import copy
import logging
import math
import platform
import socket
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ssprop_energy import __version__
from ssprop_energy.data import BatchLoader, load_dataset
from ssprop_energy.energy import EnergyMeter, open_meter
from ssprop_energy.energy.carbon import co2_g, resolve_intensity
from ssprop_energy.errors import ConfigError, RecordError, RunInterrupted
from ssprop_energy.experiment.config import ArmSpec, ExperimentConfig
from ssprop_energy.experiment.stats import paired_stats
from ssprop_energy.flops import FlopMeter
from ssprop_energy.models import get_model
from ssprop_energy.records import (
    CONFIG_FILE, EPOCH_COLUMNS, EPOCHS_FILE, LAYER_COLUMNS, LAYERS_FILE, SUMMARY_FILE, TRACE_COLUMNS, TRACE_FILE,
    ArmRecord, EnergyComponent, EpochRecord, RunSummary, read_json, total_energy, write_csv_atomic,
    write_json_atomic, write_summary,
)
from ssprop_energy.sparse import set_drop_rate, sparsify
from ssprop_energy.sparse.schedules import DropSchedule
from ssprop_energy.train import Callback, TrainConfig, Trainer, resolve_device
from ssprop_energy.train.optim import make_optimizer

log = logging.getLogger(__name__)

PAIRED_METRICS = ("energy_j", "co2_g", "wall_s", "flops_backward", "flops_backward_conv", "flops_total",
                  "test_accuracy")


def _phase_at(phases: Sequence[tuple[float, float, str]], t_s: float) -> str:
    """The label of the phase holding time ``t_s`` (s since meter start); ``other`` between phases."""
    for start, end, label in phases:
        if start <= t_s <= end:
            return label
    return "other"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class ExperimentHooks:
    """What the CLI plugs into a run: progress callbacks per arm-run and a stop flag (signals)."""

    callbacks: Callable[[ArmSpec, int, int], Sequence[Callback]] = lambda arm, seed, repeat: ()
    stop_requested: Callable[[], bool] = lambda: False


def default_run_dir(cfg: ExperimentConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.model}-{cfg.dataset.replace(':', '_').replace('/', '_')}"


def prepare_run_dir(path: Path) -> None:
    """Create the run directory and prove it is writable, before any work starts.

    Raises:
        ConfigError: the directory exists and is not empty, or cannot be created or written.
    """
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"--out {path} already exists and is not an empty directory (use --resume to continue)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--out {path} is not writable ({exc.strerror or exc})") from None


def load_run_config(run_dir: Path) -> ExperimentConfig:
    """Read the configuration of an existing run directory for ``--resume``."""
    if not run_dir.is_dir():
        raise ConfigError(f"--resume {run_dir}: not a directory")
    if not (run_dir / CONFIG_FILE).exists() or not (run_dir / SUMMARY_FILE).exists():
        raise ConfigError(f"--resume {run_dir}: not a run directory (no {CONFIG_FILE} / {SUMMARY_FILE})")
    data = read_json(run_dir / CONFIG_FILE)
    if not isinstance(data, dict):
        raise RecordError(f"{run_dir / CONFIG_FILE}: expected a JSON object")
    status = read_json(run_dir / SUMMARY_FILE).get("status")
    if status == "complete":
        raise ConfigError(f"--resume {run_dir}: the run is already complete")
    cfg = ExperimentConfig.from_dict(data)
    cfg.validate()
    return cfg


class Experiment:
    """Runs all arm-runs of a configuration into a run directory and writes the summary."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, hooks: ExperimentHooks | None = None) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.hooks = hooks or ExperimentHooks()
        # Everything that can reject user input happens here, before the run directory is touched.
        self.device = resolve_device(cfg.device)
        self.carbon = resolve_intensity(country=cfg.country, override_g_per_kwh=cfg.carbon_intensity)
        # The split is fixed (seed 0) whatever the training seeds: every seed is tested on the same images.
        self.data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, image_size=cfg.image_size, seed=0)
        # Unknown model names, or a model with no layer of the kinds to sparsify, fail now, not mid-run.
        self._sparse_model(cfg.seeds[0], 0.0)
        for arm in cfg.arms():
            if arm.sparse:
                self._schedule(arm)
        self.created_at = now_iso()
        self.environment: dict[str, Any] = {}
        self.idle_power_w: dict[str, float] = {}
        # (component, source, device) -> J metered by this process, finished or not: what the ledger charges
        self._spent_j: dict[tuple[str, str, str], float] = {}
        self._meters_opened = 0
        # An unavailable --meter is a user error: find out now (its fallback warnings show once, here).
        self._open_meter().close()

    # ------------------------------------------------------------------------------------------ building

    def _build_model(self, seed: int, dropout: float) -> torch.nn.Module:
        torch.manual_seed(seed)  # identical initial weights for every arm of a seed
        return get_model(
            self.cfg.model, num_classes=self.data.num_classes, in_channels=self.data.in_channels,
            image_size=self.data.image_size, dropout=dropout,
        )

    def _sparse_model(self, seed: int, dropout: float) -> torch.nn.Module:
        # Built at drop 0; the schedule sets the rate each epoch/iteration.
        return sparsify(self._build_model(seed, dropout), drop_rate=0.0, layers=tuple(self.cfg.layers),
                        selection=self.cfg.selection)

    def _schedule(self, arm: ArmSpec) -> DropSchedule:
        return self.cfg.drop_schedule(arm.schedule, arm.drop_rate)

    def _open_meter(self) -> EnergyMeter:
        if self._meters_opened == 0:
            meter = open_meter(self.cfg.meter, sample_period_s=self.cfg.sample_period_s)
        else:
            # Every arm-run gets a fresh meter; its fallback warnings were already shown for the first one.
            energy_log = logging.getLogger("ssprop_energy.energy")
            level = energy_log.level
            energy_log.setLevel(logging.ERROR)
            try:
                meter = open_meter(self.cfg.meter, sample_period_s=self.cfg.sample_period_s)
            finally:
                energy_log.setLevel(level)
        self._meters_opened += 1
        return meter

    # ------------------------------------------------------------------------------------------ running

    def plan(self) -> list[tuple[ArmSpec, int, int]]:
        """All arm-runs in execution order: pairs by (seed, repeat), ABBA-alternated."""
        arms = self.cfg.arms()
        order: list[tuple[ArmSpec, int, int]] = []
        pair = 0
        for seed in self.cfg.seeds:
            for repeat in range(self.cfg.repeats):
                seq = arms if pair % 2 == 0 else list(reversed(arms))
                order.extend((arm, seed, repeat) for arm in seq)
                pair += 1
        return order

    def run(self) -> RunSummary:
        """Run (or resume) every arm-run; returns the final summary, also written to the run directory.

        Raises:
            RunInterrupted: the stop flag was raised; the summary is saved with status ``interrupted``.
        """
        (self.run_dir / "runs").mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_dir / CONFIG_FILE, self.cfg.to_dict())
        self._write_summary("running")
        try:
            if self.cfg.idle_s > 0:
                meter = self._open_meter()
                try:
                    self.idle_power_w = dict(meter.measure_idle(self.cfg.idle_s))
                finally:
                    meter.close()
            results = {}
            for arm, seed, repeat in self.plan():
                path = self._result_path(arm, seed, repeat)
                if path.exists():
                    results[(arm.name, seed, repeat)] = read_json(path)
                    continue
                results[(arm.name, seed, repeat)] = self._run_arm(arm, seed, repeat)
                write_json_atomic(path, results[(arm.name, seed, repeat)])
                ckpt = self._checkpoint_path(arm, seed, repeat)
                ckpt.unlink(missing_ok=True)  # the result is saved; the checkpoint only served resume
        except RunInterrupted:
            self._write_summary("interrupted", self._partial_arms())
            raise
        except BaseException as exc:
            reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, KeyboardInterrupt) else "KeyboardInterrupt"
            self._write_summary("failed", self._partial_arms(), failure_reason=reason)
            raise
        summary = self._finalise(results)
        try:
            (self.run_dir / "checkpoints").rmdir()  # empty once every arm-run finished
        except OSError:
            pass
        return summary

    def spent_components(self) -> list[EnergyComponent]:
        """Energy metered by this process over every arm-run it ran (training, evaluation, interrupted runs
        included): what the audit ledger charges to this invocation."""
        return [EnergyComponent(component=k[0], source=k[1], device=k[2], energy_j=v) for k, v in self._spent_j.items()]

    def _result_path(self, arm: ArmSpec, seed: int, repeat: int) -> Path:
        return self.run_dir / "runs" / f"{arm.name}__s{seed}__r{repeat}.json"

    def _checkpoint_path(self, arm: ArmSpec, seed: int, repeat: int) -> Path:
        return self.run_dir / "checkpoints" / f"{arm.name}__s{seed}__r{repeat}.pt"

    def _run_arm(self, arm: ArmSpec, seed: int, repeat: int) -> dict[str, Any]:
        cfg = self.cfg
        model = self._sparse_model(seed, arm.dropout) if arm.sparse else self._build_model(seed, arm.dropout)
        schedule = self._schedule(arm) if arm.sparse else None
        input_shape = (self.data.in_channels, self.data.image_size, self.data.image_size)
        flop_meter = FlopMeter(copy.deepcopy(model), input_shape, self.data.num_classes)
        train_cfg = TrainConfig(
            epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, optimizer=cfg.optimizer,
            weight_decay=cfg.weight_decay, lr_schedule=cfg.lr_schedule, seed=seed, amp=cfg.amp,
            eval_noise=tuple(cfg.eval_noise),
        )
        # Count FLOPs for every drop rate the schedule will apply, and warm up, before the meter starts: a
        # count or a first-call initialisation inside the measured window would be charged to the arm.
        n_batches = math.ceil(len(self.data.train) / cfg.batch_size)
        rates = sorted({schedule.rate(e, i) for e in range(cfg.epochs) for i in range(n_batches)}) if schedule else [0.0]
        for rate in rates:
            flop_meter.per_sample(rate)
        self._warm_up(model, rates if arm.sparse else [])
        meter = self._open_meter()
        if not self.environment:
            self.environment = self._environment(meter)
        meter.start()
        t_start = time.perf_counter()  # the meter's clock: trace times are seconds since its start
        trainer = Trainer(
            model, self.data, train_cfg, self.device, schedule=schedule, meter=meter, flop_meter=flop_meter,
            callbacks=self.hooks.callbacks(arm, seed, repeat), checkpoint_path=self._checkpoint_path(arm, seed, repeat),
            stop_requested=self.hooks.stop_requested,
        )
        try:
            result = trainer.fit()
        finally:
            report = meter.stop()
            for c in report.components:
                key = (c.component, c.source, c.device)
                self._spent_j[key] = self._spent_j.get(key, 0.0) + c.energy_j
        wall_total_s = time.perf_counter() - t_start
        phases = [(a - t_start, b - t_start, label) for a, b, label in trainer.phase_log]

        # Snapshots and the report name the same components; each keeps the provenance the meter gave it.
        comp_info = {c.component: c for c in report.components}
        components = [
            EnergyComponent(component=name, energy_j=energy_j, source=comp_info[name].source,
                            device=comp_info[name].device)
            for name, energy_j in sorted(result.train_energy_by_component_j.items())
        ]
        energy_j, energy_source = total_energy(components)
        layer_step = flop_meter.per_sample(arm.drop_rate if arm.sparse else 0.0)
        return {
            "arm": arm.name, "seed": seed, "repeat": repeat,
            "test_accuracy": result.test_accuracy, "test_loss": result.test_loss,
            "best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy,
            "noise_accuracy": result.noise_accuracy,
            "wall_s": result.train_wall_s, "eval_wall_s": result.eval_wall_s, "wall_total_s": wall_total_s,
            "flops_forward": result.flops_forward, "flops_backward": result.flops_backward,
            "flops_backward_conv": result.flops_backward_conv,
            "average_drop_rate": schedule.average_drop_rate(cfg.epochs, len(trainer.train_loader)) if schedule else 0.0,
            "energy_j": energy_j, "energy_source": energy_source,
            "energy_components": [asdict(c) for c in components],
            "meter_components": [asdict(c) for c in report.components],
            "eval_energy_j": result.eval_energy_j,
            "phases": {k: dict(v) for k, v in report.windows.items()},
            "unattributed_energy_j": report.unattributed_energy_j,
            "epochs": [asdict(e) for e in result.epochs],
            "trace": [[s.t_s, s.component, s.power_w, s.source, _phase_at(phases, s.t_s)] for s in report.trace],
            "layers": [
                {"layer": layer.name, "type": layer.type, "flops_forward": layer.forward, "flops_backward": layer.backward}
                for layer in layer_step.layers
            ],
            "flops_per_sample": {"forward": layer_step.forward, "backward": layer_step.backward,
                                 "convention": getattr(layer_step, "convention", "")},
        }

    def _warm_up(self, model: torch.nn.Module, sparse_rates: Sequence[float]) -> None:
        """One forward+backward per configuration on a copy of the model (the model itself is untouched), so
        that one-off costs (thread pools, allocator growth, kernel selection) fall outside the measurement."""
        twin = copy.deepcopy(model).to(self.device).train()
        loader = BatchLoader(self.data.train, self.cfg.batch_size, shuffle=False, mean=self.data.mean,
                             std=self.data.std, device=self.device)
        optimizer = make_optimizer(self.cfg.optimizer, twin.parameters(), self.cfg.lr, self.cfg.weight_decay)
        x, y = next(iter(loader))
        for rate in sparse_rates or [None]:
            if rate is not None:
                set_drop_rate(twin, rate)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(twin(x), y).backward()
            optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _environment(self, meter: Any) -> dict[str, Any]:
        env = {
            "ssprop_energy": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "hostname": socket.gethostname(),
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "meter": meter.describe(),
            "dataset": getattr(self.data, "info", {}),
        }
        return env

    # ------------------------------------------------------------------------------------------ summary

    def _co2_g(self, energy_j: float) -> float:
        return co2_g(energy_j, self.carbon.g_per_kwh, self.cfg.pue)

    def _arm_record(self, arm: ArmSpec, runs: list[dict[str, Any]]) -> ArmRecord:
        def mean(key: str) -> float:
            return sum(float(r[key]) for r in runs) / len(runs)

        comps: dict[tuple[str, str, str], float] = {}
        for r in runs:
            for c in r["energy_components"]:
                key = (c["component"], c["source"], c["device"])
                comps[key] = comps.get(key, 0.0) + c["energy_j"] / len(runs)
        components = [EnergyComponent(component=k[0], source=k[1], device=k[2], energy_j=v) for k, v in comps.items()]
        energy_j, source = total_energy(components)
        n_epochs = min(len(r["epochs"]) for r in runs)
        epochs = [
            EpochRecord(**{
                k: (sum(r["epochs"][i][k] for r in runs) / len(runs) if k != "epoch" else i)
                for k in runs[0]["epochs"][i]
            })
            for i in range(n_epochs)
        ]
        phases: dict[str, dict[str, float]] = {}
        for r in runs:
            for name, w in r["phases"].items():
                p = phases.setdefault(name, {})
                for k, v in w.items():
                    p[k] = p.get(k, 0.0) + float(v) / len(runs)
        noise = {k: sum(r["noise_accuracy"][k] for r in runs) / len(runs) for k in runs[0]["noise_accuracy"]}
        return ArmRecord(
            name=arm.name, drop_rate=arm.drop_rate, schedule=arm.schedule, average_drop_rate=mean("average_drop_rate"),
            test_accuracy=mean("test_accuracy"), wall_s=mean("wall_s"), flops_forward=mean("flops_forward"),
            flops_backward=mean("flops_backward"), flops_backward_conv=mean("flops_backward_conv"),
            energy_j=energy_j, energy_source=source, energy_components=components, co2_g=self._co2_g(energy_j),
            carbon_intensity_g_per_kwh=self.carbon.g_per_kwh, pue=self.cfg.pue, epochs=epochs,
            test_loss=mean("test_loss"), best_val_accuracy=mean("best_val_accuracy"),
            best_epoch=int(round(mean("best_epoch"))), dropout=arm.dropout, noise_accuracy=noise, phases=phases,
            unattributed_energy_j=mean("unattributed_energy_j"), eval_energy_j=mean("eval_energy_j"),
            idle_power_w=self.idle_power_w,
            repeats=[{k: r[k] for k in ("seed", "repeat", "test_accuracy", "wall_s", "energy_j", "flops_forward",
                                        "flops_backward", "flops_backward_conv", "eval_energy_j", "meter_components")}
                     | {"co2_g": self._co2_g(r["energy_j"])} for r in runs],
        )

    def _paired(self, base: list[dict[str, Any]], arm: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        def values(runs: list[dict[str, Any]], metric: str) -> list[float]:
            if metric == "co2_g":
                return [self._co2_g(r["energy_j"]) for r in runs]
            if metric == "flops_total":
                return [r["flops_forward"] + r["flops_backward"] for r in runs]
            return [float(r[metric]) for r in runs]

        return {m: paired_stats(values(base, m), values(arm, m)) for m in PAIRED_METRICS}

    def _runs_by_arm(self, results: dict[tuple[str, int, int], dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        by_arm: dict[str, list[dict[str, Any]]] = {}
        for (name, seed, repeat), r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][2])):
            by_arm.setdefault(name, []).append(r)
        return by_arm

    def _partial_arms(self) -> dict[str, ArmRecord]:
        results = {}
        for arm, seed, repeat in self.plan():
            path = self._result_path(arm, seed, repeat)
            if path.exists():
                results[(arm.name, seed, repeat)] = read_json(path)
        specs = {a.name: a for a in self.cfg.arms()}
        return {name: self._arm_record(specs[name], runs) for name, runs in self._runs_by_arm(results).items()}

    def _finalise(self, results: dict[tuple[str, int, int], dict[str, Any]]) -> RunSummary:
        specs = {a.name: a for a in self.cfg.arms()}
        by_arm = self._runs_by_arm(results)
        arms = {name: self._arm_record(specs[name], runs) for name, runs in by_arm.items()}
        for name, record in arms.items():
            if name != "dense":
                record.paired = self._paired(by_arm["dense"], by_arm[name])
        epoch_rows, trace_rows, layer_rows = [], [], []
        for name, runs in by_arm.items():
            for r in runs:
                epoch_rows += [{"arm": name, "repeat": f"s{r['seed']}r{r['repeat']}", **e} for e in r["epochs"]]
                trace_rows += [
                    {"arm": name, "repeat": f"s{r['seed']}r{r['repeat']}", "t_s": t, "component": c, "power_w": p,
                     "source": s, "phase": ph}
                    for t, c, p, s, ph in r["trace"]
                ]
            layer_rows += [{"arm": name, **row} for row in runs[0]["layers"]]
        write_csv_atomic(self.run_dir / EPOCHS_FILE, epoch_rows, EPOCH_COLUMNS)
        write_csv_atomic(self.run_dir / TRACE_FILE, trace_rows, TRACE_COLUMNS)
        write_csv_atomic(self.run_dir / LAYERS_FILE, layer_rows, LAYER_COLUMNS)
        paired = arms["ssprop"].paired if self.cfg.kind == "compare" and "ssprop" in arms else {}
        return self._write_summary("complete", arms, paired=paired)

    def _write_summary(
        self, status: str, arms: dict[str, ArmRecord] | None = None, paired: dict[str, Any] | None = None,
        failure_reason: str | None = None,
    ) -> RunSummary:
        summary = RunSummary(
            kind=self.cfg.kind, status=status, created_at=self.created_at, config=self.cfg.to_dict(),
            environment=self.environment,
            carbon={"intensity_g_per_kwh": self.carbon.g_per_kwh, "source": self.carbon.source,
                    "region": self.carbon.region, "pue": self.cfg.pue,
                    "pue_source": "--pue" if self.cfg.pue != 1.0 else "default 1.0 (no data-centre overhead)"},
            arms=arms or {}, paired=paired or {}, failure_reason=failure_reason,
            finished_at=None if status == "running" else now_iso(),
        )
        write_summary(self.run_dir, summary)
        return summary
