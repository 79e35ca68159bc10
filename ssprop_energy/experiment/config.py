"""Experiment configuration: every knob of a compare or sweep, with its default, validated up front.

Validation happens before anything is written, so bad input never leaves a half-made run directory.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ssprop_energy.energy.select import KINDS as METERS
from ssprop_energy.errors import ConfigError
from ssprop_energy.sparse.schedules import BY, SCHEDULES, DropSchedule
from ssprop_energy.sparse.vocab import LAYER_KIND_NAMES as LAYER_KINDS
from ssprop_energy.sparse.vocab import SELECTIONS

# Each vocabulary has one owner (the schedules, selections, layer kinds and meters are the sparse and energy
# packages' own); the names are re-exported here for the CLI's choices.
__all__ = ["AA_ARM", "INTERLEAVES", "LAYER_KINDS", "METERS", "PRESETS", "SCHEDULES", "SELECTIONS", "ArmSpec",
           "ExperimentConfig"]

# How arms share the machine in time: ``slice`` (default) lets the arms take turns every few batches (about
# 0.75 s of work, ABBA order slice by slice), so a load edge touches one pair of slices and slow changes of
# the machine hit every arm alike; ``epoch`` runs epoch e of every arm back to back (ABBA epoch by epoch);
# ``none`` runs each arm-run to the end before the next (needs one model in memory at a time).
INTERLEAVES = ("slice", "epoch", "none")
AA_ARM = "dense-aa"  # the second baseline arm of an A/A run (--aa): the same layers and seed as ``dense``

PRESETS = ("paper",)

# Defaults chosen so that `compare --model resnet18` on the embedded digits data finishes in a few minutes on a
# 2-core CPU: 4 epochs (an even number, so the bar schedule has 2 dense and 2 sparse epochs), batch 64, Adam.
# ResNet-18 reaches about 98% validation accuracy on digits by its fourth dense epoch (measured).
# The paper trains 300 epochs at lr 2e-4 with batch 128; a short run needs a larger step to converge.
# Bounds that keep a value meaningful: seeds go to numpy/torch generators (32-bit for numpy); an idle
# measurement of more than a day or a sampling period of more than a minute is a typo, not a measurement.
MAX_SEED = 2**32 - 1
MAX_IDLE_S = 86400.0
MAX_SAMPLE_PERIOD_S = 60.0


def _finite(value: Any) -> bool:
    """A real number (not a bool) that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


DEFAULT_EPOCHS = 4
DEFAULT_BATCH_SIZE = 64
DEFAULT_LR = 1e-3

# The generation task (a model whose registry entry says ``task="generation"``: the DDPM UNet) starts from these
# instead, before a preset and explicit flags (``apply_task_defaults``). AdamW at 1e-3 and 32x32 inputs are the
# paper's DDPM settings (public code ``train_ddpm.py``); 2 epochs (one dense, one sparse under ``bar``) keep the
# default compare on digits, sampling included, at a few minutes on a 2-core CPU (BENCHMARKS.md). Batch 32: on
# that CPU a UNet step costs the same per sample at 32 as at 64 (measured), so twice the optimizer updates for
# the same time; 16 costs ~25% more per sample.
GENERATION_DEFAULTS: dict[str, Any] = {"optimizer": "adamw", "lr": 1e-3, "epochs": 2, "image_size": 32,
                                       "batch_size": 32}


@dataclass(frozen=True)
class ArmSpec:
    """One arm of an experiment: dense (drop_rate 0, no schedule) or an ssProp setting."""

    name: str
    sparse: bool
    drop_rate: float = 0.0
    schedule: str = "none"
    dropout: float = 0.0
    selection: str = "topk"


@dataclass
class ExperimentConfig:
    """The full configuration of a compare or sweep run; stored verbatim in ``config.json``."""

    kind: str = "compare"
    model: str = "resnet18"
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    drop_rates: list[float] = field(default_factory=lambda: [0.8])
    schedules: list[str] = field(default_factory=lambda: ["bar"])
    dropouts: list[float] = field(default_factory=lambda: [0.0])
    selection: str = "topk"
    # None: the model's default layer kinds (models.resolve_layers: conv for CNNs/ResNets, linear for mlp,
    # conv+linear for vit and external models holding both); a list overrides it (--layers).
    layers: list[str] | None = None
    warmup_epochs: int = 0
    schedule_by: str = "epoch"
    period: int = 10
    start_drop_rate: float = 0.0  # where linear / cosine / halves start (public code: 1 - percentage)
    schedule_interleave: bool | None = None  # None: the schedule name's default (on for bar)
    preset: str | None = None  # recorded only; its values are already in the fields above
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = DEFAULT_LR
    optimizer: str = "adam"
    weight_decay: float = 0.0
    lr_schedule: str = "none"
    seeds: list[int] = field(default_factory=lambda: [0])
    repeats: int = 1
    device: str = "auto"
    amp: bool = False
    meter: str = "auto"
    sample_period_s: float = 0.1
    idle_s: float = 0.0
    carbon_intensity: float | None = None
    country: str | None = None
    pue: float = 1.0
    eval_noise: list[float] = field(default_factory=list)
    interleave: str = "slice"
    slice_batches: int | None = None  # --interleave slice: batches per slice (None: chosen in the warm-up)
    aa: bool = False  # A/A: the baseline arm twice (the machine's noise floor), no ssProp arm
    project: str | None = None
    out: str | None = None
    # generation task only (None: the task's default; ignored by classification models)
    samples: int | None = None  # images generated per arm-run at the end (default 32)
    timesteps: int | None = None  # diffusion steps (default 200, the paper's)
    inception_weights: str | None = None  # local Inception-v3 weights for the standard FID (else the env var)
    threads: int | None = None  # torch CPU threads during the run (None: torch's default, recorded either way)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad value and the allowed ones, in the domain's words;
        ``error.field`` names the config field so that a front end can name its own flag."""

        def bad(field_name: str, message: str) -> ConfigError:
            return ConfigError(message, field=field_name)

        for name in ("model", "dataset", "data_dir", "device", "country", "project", "out"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:  # undecodable bytes from argv (surrogateescape): records are UTF-8
                    raise bad(name, f"{value.encode('utf-8', 'surrogateescape')!r} is not valid UTF-8 text; "
                              "use a UTF-8 name") from None
        if self.kind not in ("compare", "sweep"):
            raise bad("kind", f"unknown experiment kind {self.kind!r}")
        if self.aa not in (True, False):
            raise bad("aa", f"aa must be true or false, got {self.aa!r}")
        if self.aa and self.kind != "compare":
            raise bad("aa", "an A/A run (--aa) is a compare of the baseline with itself; a sweep has no A/A")
        for d in self.drop_rates:
            if not (isinstance(d, (int, float)) and math.isfinite(d) and 0.0 <= d < 1.0):
                raise bad("drop_rates", f"drop rate must be in [0, 1), got {d!r}")
        if not self.drop_rates:
            raise bad("drop_rates", "at least one drop rate is needed")
        for s in self.schedules:
            if s not in SCHEDULES:
                raise bad("schedules", f"unknown schedule {s!r}; choose from {', '.join(SCHEDULES)}")
        for p in self.dropouts:
            if not (0.0 <= p < 1.0):
                raise bad("dropouts", f"dropout must be in [0, 1), got {p!r}")
        if self.selection not in SELECTIONS:
            raise bad("selection", f"unknown selection {self.selection!r}; choose from {', '.join(SELECTIONS)}")
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or not self.layers:
                raise bad("layers", "at least one layer kind to sparsify is needed (or null: the model's default)")
            for kind in self.layers:
                if kind not in LAYER_KINDS:
                    raise bad("layers", f"unknown layer kind {kind!r}; choose from {', '.join(LAYER_KINDS)}")
        if self.schedule_by not in BY:
            raise bad("schedule_by", f"unknown schedule granularity {self.schedule_by!r}; choose from {', '.join(BY)}")
        if self.schedule_interleave not in (None, True, False):
            raise bad("schedule_interleave", "schedule interleave must be true, false or null (the schedule's "
                      f"default), got {self.schedule_interleave!r}")
        if self.preset is not None and self.preset not in PRESETS:
            raise bad("preset", f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        if self.interleave not in INTERLEAVES:
            raise bad("interleave", f"unknown interleave {self.interleave!r}; choose from {', '.join(INTERLEAVES)}")
        if self.meter not in METERS:
            raise bad("meter", f"unknown meter {self.meter!r}; choose from {', '.join(METERS)}")
        positive_ints = {"epochs": ("epochs", self.epochs), "batch_size": ("batch size", self.batch_size),
                         "repeats": ("repeats", self.repeats), "period": ("schedule period", self.period)}
        for name, (words, value) in positive_ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(name, f"{words} must be a positive integer, got {value!r}")
        if isinstance(self.warmup_epochs, bool) or not isinstance(self.warmup_epochs, int) or self.warmup_epochs < 0:
            raise bad("warmup_epochs", f"warm-up epochs must be >= 0, got {self.warmup_epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise bad("lr", f"learning rate must be a positive number, got {self.lr!r}")
        if not (_finite(self.weight_decay) and self.weight_decay >= 0):
            raise bad("weight_decay", f"weight decay must be a number >= 0, got {self.weight_decay!r}")
        if not (_finite(self.sample_period_s) and 0 < self.sample_period_s <= MAX_SAMPLE_PERIOD_S):
            raise bad("sample_period_s", f"power sampling period must be in (0, {MAX_SAMPLE_PERIOD_S:g}] s, "
                      f"got {self.sample_period_s!r}")
        if not (_finite(self.idle_s) and 0 <= self.idle_s <= MAX_IDLE_S):
            raise bad("idle_s", f"idle measurement must be 0 to {MAX_IDLE_S:g} seconds, got {self.idle_s!r}")
        if not (_finite(self.start_drop_rate) and 0.0 <= self.start_drop_rate < 1.0):
            raise bad("start_drop_rate", f"start drop rate must be in [0, 1), got {self.start_drop_rate!r}")
        if not (_finite(self.pue) and self.pue >= 1.0):
            raise bad("pue", f"PUE must be a number >= 1.0, got {self.pue!r}")
        if self.carbon_intensity is not None and not (self.carbon_intensity >= 0 and math.isfinite(self.carbon_intensity)):
            raise bad("carbon_intensity", f"carbon intensity must be >= 0 g/kWh, got {self.carbon_intensity!r}")
        if self.image_size is not None and (isinstance(self.image_size, bool) or not isinstance(self.image_size, int)
                                            or self.image_size < 4):
            raise bad("image_size", f"image size must be at least 4 pixels, got {self.image_size}")
        for s in self.eval_noise:
            if not (s > 0 and math.isfinite(s)):
                raise bad("eval_noise", f"evaluation noise levels must be positive, got {s!r}")
        if self.samples is not None and (isinstance(self.samples, bool) or not isinstance(self.samples, int)
                                         or self.samples < 2):
            raise bad("samples", f"a Frechet distance needs at least 2 samples, got {self.samples!r}")
        if self.timesteps is not None and (isinstance(self.timesteps, bool) or not isinstance(self.timesteps, int)
                                           or self.timesteps < 1):
            raise bad("timesteps", f"diffusion timesteps must be a positive integer, got {self.timesteps!r}")
        if self.slice_batches is not None and (isinstance(self.slice_batches, bool)
                                               or not isinstance(self.slice_batches, int) or self.slice_batches < 1):
            raise bad("slice_batches", f"batches per slice must be a positive integer, got {self.slice_batches!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise bad("threads", f"threads must be a positive integer, got {self.threads!r}")
        if not self.seeds:
            raise bad("seeds", "at least one seed is needed")
        for seed in self.seeds:
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
                raise bad("seeds", f"a seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise bad("seeds", f"seeds have duplicates: {self.seeds}")
        for s in self.schedules:  # every schedule this run will build, checked now (its own messages)
            for d in self.drop_rates:
                self.drop_schedule(s, d)

    def drop_schedule(self, name: str, drop_rate: float) -> DropSchedule:
        """The schedule of an ssProp arm with short name ``name`` and drop rate ``drop_rate``."""
        return DropSchedule.from_name(
            name, drop_rate=drop_rate, total_epochs=self.epochs, warmup_epochs=self.warmup_epochs,
            by=self.schedule_by, period=self.period, start_drop_rate=self.start_drop_rate, interleave=self.schedule_interleave,
        )

    def arms(self) -> list[ArmSpec]:
        """The dense baseline first, then one ssProp arm per (schedule, drop rate, dropout) in the grid.

        A compare has exactly one ssProp arm, named ``ssprop`` (an A/A compare, ``aa``, has a second dense
        arm, ``dense-aa``, instead); sweep arms are named by their setting, e.g.
        ``bar-d0.8`` or ``bar-d0.8-p0.2`` with dropout. The dense baseline is shared and has no dropout
        (the paper's dropout experiments compare ssProp + dropout against the plain baseline).
        """
        dense = ArmSpec(name="dense", sparse=False, dropout=self.dropouts[0] if self.kind == "compare" else 0.0)
        if self.aa:  # the same arm twice: what the estimator reports is the machine's noise floor
            return [dense, ArmSpec(name=AA_ARM, sparse=False, dropout=dense.dropout)]
        grid = [(s, d, p) for s in self.schedules for d in self.drop_rates for p in self.dropouts]
        if self.kind == "compare":
            s, d, p = grid[0]
            return [dense, ArmSpec("ssprop", True, d, s, p, self.selection)]
        arms = [dense]
        for s, d, p in grid:
            name = f"{s}-d{d:g}" + (f"-p{p:g}" if p > 0 else "")
            arms.append(ArmSpec(name, True, d, s, p, self.selection))
        return arms

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def apply_task_defaults(self, task: str) -> None:
        """Set the defaults of ``task`` (``models.ModelInfo.task``); call before a preset and explicit values.

        Classification keeps the class defaults; generation takes :data:`GENERATION_DEFAULTS`.
        """
        if task == "generation":
            for key, value in GENERATION_DEFAULTS.items():
                setattr(self, key, value)

    def apply_preset(self, name: str) -> None:
        """Set every field that preset ``name`` fixes; explicit flags are applied afterwards and win."""
        if name not in PRESETS:
            raise ConfigError(f"unknown --preset {name!r}; choose from {', '.join(PRESETS)}")
        # "paper": the training settings of the public code (train_classifier.py): Adam with betas 0.9/0.999
        # (make_optimizer's Adam), no weight decay, no LR schedule, batch 128, the headline schedule (keep 0.2,
        # constant, interleaved, by epoch), full precision, no dropout. No augmentation, the 80/20 train/val split
        # of datasets with an official test set, and test accuracy at the best validation epoch are how every
        # run here works already. Model, data, lr, epochs and seed stay the user's. Layers: the model's default
        # (the paper sparsifies the convolutions of its CNNs/ResNets; its Linear variant is for its MLP).
        values: dict[str, Any] = {
            "optimizer": "adam", "weight_decay": 0.0, "lr_schedule": "none", "batch_size": 128,
            "schedules": ["bar"], "drop_rates": [0.8], "start_drop_rate": 0.0, "schedule_interleave": None,
            "warmup_epochs": 0, "schedule_by": "epoch", "selection": "topk", "layers": None,
            "amp": False, "dropouts": [0.0],
        }
        for key, value in values.items():
            setattr(self, key, value)
        self.preset = name

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"config has unknown field(s): {', '.join(sorted(unknown))}")
        return cls(**data)
