"""What ``compare`` and ``sweep`` share: flags, signal handling, progress, the run header and the result table."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ssprop_energy.errors import ConfigError, RunInterrupted
from ssprop_energy.experiment.config import AA_ARM, INTERLEAVES, METERS, PRESETS, SELECTIONS, ExperimentConfig
from ssprop_energy.fmt import fmt_change, fmt_change_pp, fmt_flops, fmt_run_epoch
from ssprop_energy.records import SUMMARY_FILE
from ssprop_energy.tracking import add_tracking_arguments, tracking_from_args

if TYPE_CHECKING:
    from ssprop_energy.layer_coverage import LayerCoverage

EXIT_INTERRUPTED = 130


def float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_common_flags(p: argparse.ArgumentParser, defaults: ExperimentConfig) -> None:
    """Flags of every experiment command. Defaults are None here so the config's own defaults apply."""
    p.add_argument("--model", help=f"model name (default {defaults.model}; see `ssprop-energy models`); ddpm-unet "
                   "trains the paper's DDPM (generation: AdamW 1e-3, 2 epochs, 32x32 unless flags say otherwise)")
    p.add_argument("--dataset", help=f"dataset (default {defaults.dataset}, embedded and offline); also mnist, "
                   "fashion-mnist, cifar10, cifar100, folder:PATH")
    p.add_argument("--data-dir", help="where downloaded datasets are cached (default: user cache directory)")
    p.add_argument("--image-size", type=int, help="input size in pixels (default: the dataset's)")
    p.add_argument("--selection", choices=SELECTIONS, help=f"channel selection (default {defaults.selection})")
    p.add_argument("--layers", type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
                   help="layer kinds ssProp replaces: conv, linear or conv,linear (default: the model's, listed by "
                   "`ssprop-energy models`: conv for CNNs/ResNets, linear for mlp, conv,linear for vit)")
    p.add_argument("--warmup-epochs", type=int, help="dense warm-up epochs (default 0; public code: warmup)")
    p.add_argument("--schedule-by", choices=("epoch", "iteration"),
                   help="schedule granularity (default epoch; public code: by_epoch)")
    p.add_argument("--period", type=int,
                   help="period T in iterations for --schedule-by iteration (default 10; public code: T)")
    p.add_argument("--start-drop-rate", type=float,
                   help="drop rate where linear / cosine / halves start (default 0 = dense; "
                   "public code: 1 - percentage)")
    p.add_argument("--schedule-interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="alternate dense and sparse epochs after the warm-up, dense first, for any schedule "
                   "(default: on for bar, off otherwise; by epoch only)")
    p.add_argument("--preset", choices=PRESETS,
                   help="paper: the public code's training settings (Adam 0.9/0.999, no weight decay, no LR "
                   "schedule, batch 128, the bar schedule at drop 0.8); explicit flags override it")
    p.add_argument("--epochs", type=int, help=f"epochs per arm (default {defaults.epochs})")
    p.add_argument("--batch-size", type=int, help=f"batch size (default {defaults.batch_size})")
    p.add_argument("--lr", type=float, help=f"learning rate (default {defaults.lr:g})")
    p.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), help=f"optimizer (default {defaults.optimizer})")
    p.add_argument("--weight-decay", type=float, help="weight decay (default 0)")
    p.add_argument("--lr-schedule", choices=("none", "cosine"), help="LR schedule (default none, as the paper)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--seeds", type=int_list, help="several seeds, comma-separated (one pair of arms each)")
    p.add_argument("--repeats", type=int, help="pairs per seed, run in ABBA order (default 1)")
    p.add_argument("--interleave", choices=INTERLEAVES,
                   help="slice (default): the arms take turns every few batches (about 0.75 s), ABBA, and the "
                   "headline time/energy change uses only slice pairs that saw no foreign load; epoch: the arms' "
                   "epochs alternate; none: one arm after the other (one model in memory at a time)")
    p.add_argument("--slice-batches", type=int, metavar="N",
                   help="--interleave slice: batches per slice (default: chosen in the warm-up for about 0.75 s)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps (default auto)")
    p.add_argument("--amp", action="store_true", default=None, help="bfloat16 autocast on CUDA")
    p.add_argument("--meter", choices=METERS, help="energy source (default auto: nvml, then rapl, then estimate)")
    p.add_argument("--sample-period", dest="sample_period_s", type=float,
                   help="power sampling period in s (default 0.1)")
    p.add_argument("--idle", dest="idle_s", type=float,
                   help="measure idle power for this many seconds first (default 0)")
    p.add_argument("--carbon-intensity", type=float, help="grid carbon intensity override, g CO2e/kWh")
    p.add_argument("--country", help="ISO-3 country code for the offline carbon intensity (default: world average)")
    p.add_argument("--pue", type=float, help="data-centre power usage effectiveness (default 1.0)")
    p.add_argument("--eval-noise", type=float_list, help="also test under Gaussian input noise, e.g. 0.1,0.2")
    p.add_argument("--samples", type=int, help="generation models: images sampled per arm-run at the end, for "
                   "the Frechet distance and the grid (default 32)")
    p.add_argument("--timesteps", type=int, help="generation models: diffusion timesteps (default 200, the paper's)")
    p.add_argument("--inception-weights", help="generation models: a local Inception-v3 weights file "
                   "(torch-fidelity's) for the standard FID (default $SSPROP_ENERGY_INCEPTION_WEIGHTS; without "
                   "one, a Frechet distance in a small classifier's features, not comparable to published FIDs)")
    p.add_argument("--threads", type=int, help="torch CPU threads for the run (default: torch's; 1 is much faster "
                   "on a CPU shared with other work)")
    p.add_argument("--project", help="project name for the audit ledger (default $SSPROP_ENERGY_PROJECT or 'default')")
    from ssprop_energy.cli.audit import add_ledger_flag  # the ledger's flag, owned by the audit command

    add_ledger_flag(p)
    p.add_argument("--out", help="run directory (default runs/<timestamp>-<model>-<dataset>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run with its recorded settings "
                   "(other setting flags are refused; --quiet, -v, --log-to and --ledger are allowed)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--nproc-per-node", type=int, metavar="P",
                   help="train on P processes of this machine with DDP (one per GPU; gloo on the CPU), launched "
                   "as torchrun would; --batch-size stays the global batch (each process takes 1/P of it). "
                   "For several nodes run torchrun yourself: torchrun --nnodes N --node-rank R "
                   "--rdzv-endpoint HOST:PORT --nproc-per-node P -m ssprop_energy compare ...")
    add_tracking_arguments(p)


# config field -> the flag that sets it, for error messages (the config speaks in domain words)
FLAGS = {"sample_period_s": "--sample-period", "idle_s": "--idle", "seeds": "--seeds", "dropouts": "--dropout"}
FLAGS_BY_KIND = {"compare": {"drop_rates": "--drop-rate", "schedules": "--schedule"},
                 "sweep": {"drop_rates": "--drop-rates", "schedules": "--schedules"}}


def flag_error(exc: ConfigError, kind: str) -> ConfigError:
    """The same error, prefixed with the flag of ``kind``'s command that sets the offending field."""
    if exc.field is None:
        return exc
    flags = {**FLAGS, **FLAGS_BY_KIND.get(kind, {})}
    flag = flags.get(exc.field, "--" + exc.field.replace("_", "-"))
    return ConfigError(f"{flag}: {exc}", field=exc.field)


# flag destinations copied verbatim into the config (unset flags are None)
SCALAR_FLAGS = ("model", "dataset", "data_dir", "image_size", "selection", "layers", "warmup_epochs", "schedule_by",
                "period", "start_drop_rate", "schedule_interleave",
                "epochs", "batch_size", "lr", "optimizer", "weight_decay", "lr_schedule", "repeats", "device", "amp",
                "meter", "sample_period_s", "idle_s", "carbon_intensity", "country", "pue", "eval_noise", "project",
                "out", "interleave", "slice_batches", "aa", "samples", "timesteps", "inception_weights", "threads")


def refuse_flags_with_resume(args: argparse.Namespace, kind: str, lists: dict[str, Any]) -> None:
    """``--resume`` continues a run with the settings in its ``config.json``; a setting flag given with it
    would be ignored, so it is refused (``--quiet`` and ``-v`` only change what is printed: allowed)."""
    given = [name for name in (*SCALAR_FLAGS, "seed", "seeds", "preset") if getattr(args, name, None) is not None]
    given += [name for name, value in lists.items() if value is not None]
    if not given:
        return
    flags = {**FLAGS, **FLAGS_BY_KIND.get(kind, {})}
    names = sorted({flags.get(n, "--" + n.replace("_", "-")) for n in given})
    raise ConfigError(f"--resume continues the run with its recorded settings; remove {', '.join(names)} "
                      "(start a new run with --out to change them)")


def config_from_args(args: argparse.Namespace, kind: str, **lists: Any) -> ExperimentConfig:
    """Build and validate a config from parsed flags; unset flags keep the config defaults."""
    from ssprop_energy.experiment.runner import task_of

    cfg = ExperimentConfig(kind=kind)
    if getattr(args, "model", None) is not None:
        cfg.model = args.model
    task = task_of(cfg.model)
    cfg.apply_task_defaults(task)  # the model's task defaults, then the preset, then flags
    if getattr(args, "preset", None) is not None:
        cfg.apply_preset(args.preset)
        if task == "generation":
            cfg.optimizer = "adamw"  # the preset's Adam is the classifier script's; the DDPM script uses AdamW
    for name in SCALAR_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            setattr(cfg, name, value)
    if args.seeds is not None:
        cfg.seeds = args.seeds
    elif args.seed is not None:
        cfg.seeds = [args.seed]
    for name, value in lists.items():
        if value is not None:
            setattr(cfg, name, value)
    try:
        cfg.validate()
    except ConfigError as exc:
        raise flag_error(exc, kind) from None
    return cfg


def _say(text: str) -> None:
    """Write to stderr, ignoring a closed terminal (SIGHUP: the ssh session is gone)."""
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopFlag:
    """SIGINT, SIGTERM and SIGHUP stop a run in any phase within about a second; a second signal exits at once.

    The first signal raises KeyboardInterrupt in the main thread wherever it is (setup, FLOP counting,
    warm-up, the idle measurement, a training batch, an evaluation, finalisation): the experiment saves what
    finished as ``interrupted`` (every record on disk is written atomically, and a partial epoch is redone on
    resume anyway). The trainer also polls the flag after each batch. A second signal, typically while the
    record is being saved, ends the process at once (``os._exit``): every file on disk is whole, and the
    run directory stays resumable.
    """

    def __init__(self, run_dir: Path | None = None, kind: str = "compare", immediate: bool = True) -> None:
        self.raised = False
        # a distributed run stops where its ranks agree (the flag, polled after each batch and reduced over
        # ranks): an exception in one rank alone would leave the others waiting in a collective
        self.immediate = immediate
        self.run_dir = run_dir
        self.kind = kind
        self._old: dict[int, Any] = {}

    def __call__(self) -> bool:
        return self.raised

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.raised:
            hint = f"; resume with `ssprop-energy {self.kind} --resume {self.run_dir}`" if self.run_dir else ""
            _say(f"\n{name} again: exiting now{hint}\n")
            os._exit(EXIT_INTERRUPTED)
        self.raised = True
        if not self.immediate:
            _say(f"\n{name}: stopping after this batch and saving the record (a second signal exits at once)...\n")
            return
        _say(f"\n{name}: stopping and saving the record (a second signal exits at once)...\n")
        raise KeyboardInterrupt

    def __enter__(self) -> StopFlag:
        for sig in STOP_SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def print_header(cfg: ExperimentConfig, run_dir: Path, resumed: bool, layer_kinds: Sequence[str] = (),
                 coverage: LayerCoverage | None = None) -> None:
    """Every setting, defaults included, so that a log of the run says exactly what ran; then the layers
    ssProp replaces and the share of the backward FLOPs they hold."""
    verb = "resuming" if resumed else "starting"
    print(f"ssprop-energy {cfg.kind}: {verb} run in {run_dir}")
    items = [f"{k}={v}" for k, v in cfg.to_dict().items() if k not in ("kind", "out")]
    if layer_kinds:
        shown = ",".join(layer_kinds) + (" (the model's default)" if cfg.layers is None else "")
        items = [f"layers={shown}" if item.startswith("layers=") else item for item in items]
    line = ""
    for item in items:
        if len(line) + len(item) > 100:
            print("  " + line.rstrip())
            line = ""
        line += item + "  "
    if line:
        print("  " + line.rstrip())
    if coverage is not None:
        print(f"  ssProp layers: {coverage.describe()} (dense step)")


class _Progress:
    """How far an invocation got, for the message after a signal."""

    def __init__(self) -> None:
        self.run_dir: Path | None = None  # known once the experiment exists (None: a default folder, not made yet)
        self.main = True  # this process prints (rank 0 of a distributed run)
        self.immediate = True  # a signal raises at once (one process); False: stop after the batch
        self.started = False  # Experiment.run() was entered: the record says what finished
        self.complete = False  # the run finished; only printing remained


def run_with_signals(body: Callable[[StopFlag, _Progress], int], progress: _Progress, kind: str = "compare",
                     created: bool = False) -> int:
    """Run ``body`` with the stop signals handled; map an interruption in any phase to one message and 130.

    ``created``: this invocation starts a new run (the runner removes its directory again if a stop left it
    bare: the message then says nothing was saved).
    """
    with StopFlag(progress.run_dir, kind, immediate=progress.immediate) as stop:
        try:
            return body(stop, progress)
        except (RunInterrupted, KeyboardInterrupt):
            run_dir = progress.run_dir
            if not progress.main:
                return EXIT_INTERRUPTED
            if progress.complete:
                _say(f"ssprop-energy {kind}: interrupted after the run completed in {run_dir} "
                     f"(render its report with `ssprop-energy report {run_dir}`)\n")
            elif progress.started and run_dir is not None and (run_dir / SUMMARY_FILE).exists():
                _say(f"ssprop-energy {kind}: run interrupted; record saved as 'interrupted' in {run_dir}. "
                     f"Continue with `ssprop-energy {kind} --resume {run_dir}`\n")
            else:
                _say(f"ssprop-energy {kind}: interrupted before the run started; nothing was "
                     + ("changed" if not created else "saved") + "\n")
            return EXIT_INTERRUPTED


def _change(stat: Any, percent_points: bool = False) -> str:
    """A paired statistic as a signed change beside a figure (relative to dense), with its interval."""
    if stat is None:
        return ""
    if percent_points:
        return fmt_change_pp(stat.delta_mean, stat.delta_ci)
    if stat.saving_fraction is None:
        return ""
    ci = stat.saving_ci
    return fmt_change(-stat.saving_fraction, None if ci is None else (-ci[1], -ci[0]))


def _measured_change(arm: Any, metric: str) -> str:
    """The change shown under a raw time/energy/CO2 total: the clean-pair headline (CO2 follows energy) when
    the run has one, ``inconclusive`` when it says so, else the paired statistic over seeds/repeats."""
    h = arm.headline.get("energy_j" if metric == "co2_g" else metric)
    if h is not None:
        return "\ninconclusive" if h.verdict != "measured" else f"\n{fmt_change(h.change, h.ci)}"
    stat = arm.paired.get(metric) if arm.paired else None
    return f"\n{_change(stat)}" if stat is not None else ""


def interference_warnings(summary: Any) -> list[str]:
    """One line per arm whose time/energy figures were taken while other work loaded the machine."""
    lines = []
    for name, arm in summary.arms.items():
        inter = arm.interference
        if inter is None or not inter.affected_epochs:
            continue
        mean = inter.foreign_cpu_cores_mean
        lines.append(
            f"warning: {name}: foreign CPU load (busy cores not this run's) was material (>= {inter.threshold_cores:g} "
            f"core, or different between the arms) in {'; '.join(fmt_run_epoch(x) for x in inter.affected_epochs)}"
            + (f"; mean {mean:.2f} core over the arm" if mean is not None else "")
            + (": its raw time and energy totals include other work's slowdown" if not arm.headline else
               ": its raw totals include other work's slowdown (the headline uses clean slice pairs only)")
        )
    return lines


def diverged_warnings(summary: Any) -> list[str]:
    """One line per arm with arm-runs whose loss became NaN/inf (they are left out of means and pairs)."""
    from ssprop_energy.report.text import diverged_parts

    return [f"warning: {part} (loss NaN/inf; s<seed>r<repeat>e<epoch>)" for part in diverged_parts(summary.arms)]


def generation_lines(summary: Any) -> list[str]:
    """A generation run's quality provenance and its sampling windows (time and energy apart from training)."""
    from ssprop_energy.experiment.summarize import MATERIAL_CORES  # the epochs' rule, for the sampling window

    lines = []
    first = next(iter(summary.arms.values()), None)
    if first is not None and first.quality:
        q = first.quality
        info = q.get("extractor_info") or {}
        acc = info.get("test_accuracy")
        lines.append(
            f"{q.get('metric')}: Frechet distance of {q.get('n_generated')} samples to {q.get('n_real')} test images "
            f"in the features of {q.get('extractor')}" + (f" (its test accuracy {acc:.1%})" if acc is not None else "")
            + f"; lower is better. {q.get('note', '')}"
        )
    for arm in summary.arms.values():
        if arm.sample_wall_s is None:
            continue
        energy = ("n/a" if arm.sample_energy_j is None
                  else f"{arm.sample_energy_j:,.0f} J ({arm.sample_energy_source})")
        readings = [r for r in (arm.sampling.get("interference") or {}).values() if r]
        busy = max((r.get("foreign_cpu_cores_mean") or 0.0 for r in readings), default=None)
        load = "" if busy is None else (
            f" (foreign CPU load {busy:.2f} core" + (": includes other work's slowdown)" if busy >= MATERIAL_CORES
                                                      else ")"))
        lines.append(f"{arm.name}: sampling {arm.sampling.get('n_samples')} images x {arm.sampling.get('timesteps')} "
                     f"steps took {arm.sample_wall_s:.1f} s, {energy}{load}; not in the training figures above")
    return lines


def distributed_lines(summary: Any) -> list[str]:
    """Energy per process and per node, and the communication share, for a distributed run."""
    from ssprop_energy.report import distributed as report_distributed

    if not report_distributed.is_distributed(summary):
        return []
    lines = []
    for name in summary.arms:
        rows = [r for r in report_distributed.energy_rows(summary) if r["arm"] == name]
        lines.append(f"{name}: " + ", ".join(f"{r['scope']} {r['energy_j']:,.0f} J ({r['source']})" for r in rows))
    comm = report_distributed.comm_text(summary)
    return lines + ([comm] if comm else [])


def coverage_warnings(summary: Any) -> list[str]:
    """One line per distinct low layer coverage of the ssProp arms (every arm of a run shares its layers)."""
    lines: dict[str, list[str]] = {}
    for name, arm in summary.arms.items():
        cov = arm.layer_coverage
        if cov is not None and cov.warning:
            lines.setdefault(cov.warning, []).append(name)
    return [f"warning: {', '.join(names)}: {text}" for text, names in lines.items()]


def interleave_words(summary: Any) -> str:
    """How the arms shared the machine, in words (with the slice length and warm-up when recorded)."""
    m = summary.measurement
    if summary.interleave == "slice":
        size = f"{m.slice_batches} batches" if m is not None and m.slice_batches else "a few batches"
        words = f"slices of {size}, ABBA"
    elif summary.interleave == "epoch":
        words = "epoch by epoch, ABBA"
    else:
        words = "one arm-run after another"
    if m is not None:
        words += (f"; warm-up {m.warmup_rounds} rounds, " + ("steady" if m.warmup_stable else "not steady at its bound")
                  + f", {m.step_s * 1e3:.0f} ms per step")
    return words


def headline_lines(summary: Any) -> list[str]:
    """One line per compared arm: the clean-pair estimate of its time and energy change, or its verdict."""
    lines = []
    for name, arm in summary.arms.items():
        hs = arm.headline
        if not hs:
            continue
        parts = []
        for metric, label in (("wall_s", "time"), ("energy_j", "energy")):
            h = hs.get(metric)
            if h is None:
                continue
            if h.verdict == "measured":
                parts.append(f"{label} {fmt_change(h.change, h.ci)}")
            else:
                parts.append(f"{label} inconclusive ({h.reason})")
        h = next(iter(hs.values()))
        what = "slice pairs" if "slice" in h.method else "epoch pairs"
        aa = " [A/A: the machine's noise floor]" if name == AA_ARM else ""
        lines.append(f"{name}: headline (clean-pair estimate, {h.confidence:.0%} interval){aa}: {'; '.join(parts)}; "
                     f"{h.clean_share:.0%} of {h.pairs_total} {what} clean; verdict {h.verdict}")
    return lines


def print_results(summary: Any) -> None:
    """The short dense-vs-ssProp table: accuracy, time, backward FLOPs, energy and CO2 with their sources,
    then the single-run intervals, interference warnings and provenance notes."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    base = summary.arms.get("dense")
    others = [a for name, a in summary.arms.items() if name != "dense"]
    generation = summary.task == "generation"
    quality = next((a.quality_metric for a in summary.arms.values() if a.quality_metric), None)
    table = Table(title=f"{summary.kind}: {summary.config['model']} on {summary.config['dataset']}", show_lines=False)
    table.add_column("arm")
    table.add_column("drop rate (avg)", justify="right")
    # generation: the quality figure (a Frechet distance, lower is better) in accuracy's place; wide enough
    # for its name and "(lower = better)" whole, whatever the other columns' values take (rich shrinks the
    # widest columns first, which split the header mid-word in some runs)
    quality_label = quality or "FID"
    table.add_column(f"{quality_label}\n(lower = better)" if generation else "test acc", justify="right",
                     min_width=max(len(quality_label), len("(lower = better)")) if generation else None)
    table.add_column("train time", justify="right")
    table.add_column("bwd FLOPs (counted)", justify="right")
    table.add_column("energy", justify="right")
    table.add_column("CO2e", justify="right")
    for arm in [a for a in [base] if a is not None] + others:
        p = arm.paired
        if generation:
            value = arm.quality_value
            first = "n/a" if value is None else f"{value:.4g}"
            first += f"\n{_change(p.get(quality))}" if p and quality else ""
        else:
            acc = f"{arm.test_accuracy:.2%}" if arm.status != "diverged" else f"diverged ({arm.diverged_runs[0]})"
            first = acc + (f"\n{_change(p.get('test_accuracy'), True)}" if p else "")
        table.add_row(
            arm.name,
            "dense" if arm.name == "dense" else f"{arm.drop_rate:g} {arm.schedule} ({arm.average_drop_rate:.2f})",
            first,
            f"{arm.wall_s:.1f} s" + _measured_change(arm, "wall_s"),
            fmt_flops(arm.flops_backward) + (f"\n{_change(p.get('flops_backward'))}" if p else ""),
            f"{arm.energy_j:,.0f} J ({arm.energy_source})" + _measured_change(arm, "energy_j"),
            f"{arm.co2_g:.3g} g" + _measured_change(arm, "co2_g"),
        )
    console = Console(width=120)
    console.print(table)
    carbon = summary.carbon
    console.print(
        f"carbon intensity {carbon.intensity_g_per_kwh:.0f} g/kWh ({escape(carbon.source)}), PUE {carbon.pue:g}; "
        "changes are relative to dense" + (" with 95% bootstrap CIs over seeds/repeats" if any(
            (a.paired.get("energy_j") and a.paired["energy_j"].saving_ci) for a in others) else "")
    )
    for line in headline_lines(summary):
        console.print(escape(line) if "inconclusive" not in line else f"[yellow]{escape(line)}[/]")
    for arm in others:
        iv = arm.epoch_intervals
        if not iv or arm.headline:  # the headline has its own interval
            continue
        parts = [f"{label} {fmt_change(iv[m].change, iv[m].ci)}"
                 for m, label in (("wall_s", "time"), ("energy_j", "energy")) if m in iv]
        n = next(iter(iv.values())).n_epochs
        console.print(f"{arm.name}: single-run 95% interval from {n} paired epochs: {'; '.join(parts)} "
                      f"({next(iter(iv.values())).label})")
    if generation:
        for line in generation_lines(summary):
            console.print(escape(line))
    console.print(f"arms interleaved in time: {summary.interleave} ({interleave_words(summary)})")
    for line in interference_warnings(summary) + diverged_warnings(summary):
        console.print(f"[yellow]{escape(line)}[/]")
    for line in distributed_lines(summary):
        console.print(escape(line))
    for line in coverage_warnings(summary):
        console.print(f"[yellow]{escape(line)}[/]")
    sources = {c.source for a in summary.arms.values() for c in a.energy_components}
    if "fake" in sources:
        console.print("[yellow]note: energy is SYNTHETIC (--meter fake): no hardware was read; "
                      "the energy and CO2 figures measure nothing.[/]")
    elif "estimated" in sources:
        what = "is estimated" if sources == {"estimated"} else "includes estimated components"
        console.print(f"[yellow]note: energy {what} from a power model, not a hardware counter; see the report.[/]")


def execute(args: argparse.Namespace, kind: str, **lists: Any) -> int:
    """Run a compare or sweep from parsed flags (or resume one) and print the result table."""
    from ssprop_energy.distributed.context import from_env

    if getattr(args, "nproc_per_node", None) is not None:
        if from_env() is not None:
            raise ConfigError("--nproc-per-node: this process is already a worker of torchrun; drop the flag "
                              "(torchrun's own --nproc-per-node sets the processes)")
        from ssprop_energy.distributed.launch import launch, strip_flag

        return launch(strip_flag(args.raw_argv, "--nproc-per-node"), args.nproc_per_node)
    from ssprop_energy.experiment.runner import resume_config

    tracking = tracking_from_args(args)  # an unknown --log-to target fails before anything runs
    if args.resume:
        refuse_flags_with_resume(args, kind, lists)
        run_dir: Path | None = Path(args.resume)
        cfg = resume_config(run_dir)  # read by rank 0 (under torchrun this joins the process group)
    else:
        cfg = config_from_args(args, kind, **lists)
        run_dir = Path(cfg.out) if cfg.out else None
    progress = _Progress()
    progress.run_dir = run_dir
    # a distributed run stops where its ranks agree (the flag, polled after each batch and reduced over ranks)
    progress.immediate = from_env() is None

    def body(stop: StopFlag, progress: _Progress) -> int:
        return _execute(args, cfg, tracking, stop, progress)

    return run_with_signals(body, progress, kind, created=not args.resume)


def _execute(args: argparse.Namespace, cfg: ExperimentConfig, tracking: Any, stop: StopFlag,
             progress: _Progress) -> int:
    from ssprop_energy.cli.progress import RichProgress
    from ssprop_energy.experiment.execute import out_of_memory_error
    from ssprop_energy.experiment.runner import Experiment, ExperimentHooks

    def callbacks(arm: Any, seed: int, repeat: int) -> list[Any]:
        if args.quiet or not progress.main:
            return []
        return [RichProgress(f"{arm.name} s{seed}" + (f" r{repeat}" if cfg.repeats > 1 else ""), cfg.epochs)]

    hooks = ExperimentHooks(callbacks=callbacks, stop_requested=stop, command=sys.argv, tracking=tracking)
    try:
        experiment = Experiment(cfg, progress.run_dir, hooks, resume=bool(args.resume))
    except (MemoryError, RuntimeError) as exc:
        oom = out_of_memory_error(exc, cfg)
        if oom is None:
            raise
        raise oom from None
    run_dir = progress.run_dir = stop.run_dir = experiment.run_dir
    progress.main = main = experiment.ranks.is_main
    if main:
        print_header(cfg, run_dir, resumed=bool(args.resume), layer_kinds=experiment.layer_kinds,
                     coverage=experiment.layer_coverage)
        if experiment.ranks.distributed:
            ctx = experiment.dist
            print(f"  distributed: {ctx.world_size} process(es) on {ctx.nodes} node(s), backend {ctx.backend}; "
                  f"global batch {cfg.batch_size} = {cfg.batch_size // ctx.world_size} per process")
    progress.started = True
    # the loggers, the audit-ledger row, report.html and the process group are the run's own (runner hooks)
    summary = experiment.run()
    progress.complete = True
    if not main:  # only global rank 0 prints
        return 0
    print_results(summary)
    print(f"run record: {run_dir}", flush=True)
    if experiment.report is not None and experiment.report.path is not None:
        print(f"report: {experiment.report.path}")
    for logger in experiment.tracking.loggers if experiment.tracking else ():
        if logger.name == "tensorboard":
            print(f"tensorboard: tensorboard --logdir {logger.log_dir}")
    return 0
