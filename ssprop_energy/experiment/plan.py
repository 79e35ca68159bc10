"""Plan: which arm-runs an experiment holds and in what order they use the machine.

An arm-run is one arm trained once with one (seed, repeat). Every arm of a (seed, repeat) forms a *pair*:
the arms start from the same initial weights and see the same data order and RNG stream, so their
differences are the method's. A *group* is what runs as one block in time with one energy meter:

- ``interleave="slice"`` (default): a group is a whole pair; within every epoch the arms take turns in
  slices of a fixed number of batches, the order alternating slice by slice and pair by pair (ABBA), so a
  load edge falls inside one pair of adjacent slices and a slow change of the machine on every arm alike;
- ``interleave="epoch"``: a group is a whole pair; epoch e of every arm runs back to back, the arm order
  alternating epoch by epoch and pair by pair (ABBA);
- ``interleave="none"``: a group is one arm-run; the arms of a pair run one after the other, ABBA-alternated
  by pair (only one model in memory at a time).
"""

from __future__ import annotations

from dataclasses import dataclass

from ssprop_energy.experiment.config import ArmSpec, ExperimentConfig


@dataclass(frozen=True)
class ArmRunKey:
    """One arm trained once: the arm, its seed and its repeat index."""

    arm: ArmSpec
    seed: int
    repeat: int

    @property
    def name(self) -> str:
        """File stem of the arm-run's record and checkpoint, e.g. ``dense__s0__r0``."""
        return f"{self.arm.name}__s{self.seed}__r{self.repeat}"


@dataclass(frozen=True)
class Group:
    """Arm-runs that share the machine as one block; ``index`` counts groups from 0 in execution order."""

    index: int
    runs: tuple[ArmRunKey, ...]


def plan_groups(cfg: ExperimentConfig) -> list[Group]:
    """Every arm-run of ``cfg`` in groups, in execution order (see the module docstring)."""
    arms = cfg.arms()
    groups: list[Group] = []
    pair = 0
    for seed in cfg.seeds:
        for repeat in range(cfg.repeats):
            keys = [ArmRunKey(arm, seed, repeat) for arm in arms]
            if cfg.interleave in ("slice", "epoch"):
                groups.append(Group(len(groups), tuple(keys)))
            else:
                for key in keys if pair % 2 == 0 else reversed(keys):
                    groups.append(Group(len(groups), (key,)))
            pair += 1
    return groups


def epoch_order(group: Group, turn: int) -> list[ArmRunKey]:
    """The order of the group's arm-runs in turn ``turn`` (an epoch, or a round of slices): reversed every
    other turn and every other group (ABBA), so that no arm always goes first."""
    runs = list(group.runs)
    return runs if (turn + group.index) % 2 == 0 else runs[::-1]


def all_runs(groups: list[Group]) -> list[ArmRunKey]:
    """Every arm-run of the plan, in group order."""
    return [key for group in groups for key in group.runs]
