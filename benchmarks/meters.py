"""Benchmark: the overhead of the energy meter on a CIFAR ResNet18 training step, side by side in one run.

Arms, interleaved in a fresh random order every round so drifting machine load hits all of them alike:

- ``bare``:     the training step alone (forward, cross-entropy, backward, optimizer step);
- ``bare-a/a``: the same again, an A/A control: its ratio to ``bare`` is the noise floor of the run;
- ``sampler``:  the same with a started meter whose background thread samples every ``--period-s``;
- ``windows``:  the sampler plus the harness's windows: ``step`` around ``forward``, ``backward`` and
  ``optimizer`` (four windows, eight edges, each reading the counters).

Each arm reports the median and the minimum per-step wall time (the minimum is the least disturbed by
other processes) and the median process CPU time (all threads, so the sampler thread's own work is
included). On a shared machine the direct ratios are noisy, so the per-operation costs are
also measured in isolation (one sample tick; one window open+close) and turned into an overhead bound:
``tick_s / period_s`` for the sampler and ``4 x window_s / step_s`` for the windows.

Run: ``python benchmarks/meters.py`` (``--meter``, ``--rounds``, ``--steps``, ``--batch-size``, ``--threads``).
The load before, during and after is printed with the figures (``benchmarks/_load.py``); figures taken
under load are marked NOT CITABLE.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time
from typing import Callable

import _load
import torch
import torch.nn.functional as F

from ssprop_energy.energy import open_meter
from ssprop_energy.models import get_model


def make_step(batch_size: int) -> Callable[[Callable[[str], contextlib.AbstractContextManager]], None]:
    torch.manual_seed(0)
    model = get_model("resnet18", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (batch_size,))

    def step(win: Callable[[str], contextlib.AbstractContextManager]) -> None:
        with win("step"):
            with win("forward"):
                loss = F.cross_entropy(model(x), y)
            with win("backward"):
                opt.zero_grad(set_to_none=True)
                loss.backward()
            with win("optimizer"):
                opt.step()

    return step


def no_window(name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def time_block(step, win, steps: int) -> tuple[list[float], list[float]]:
    wall, cpu = [], []
    for _ in range(steps):
        w0, c0 = time.perf_counter(), time.process_time()
        step(win)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def micro_costs(kind: str, period_s: float, n: int = 2000) -> tuple[float, float]:
    """(seconds per sample tick, seconds per window open+close), measured in isolation."""
    meter = open_meter(kind, sample_period_s=period_s, background=False, sync=None)
    meter.start()
    t = time.perf_counter()
    for _ in range(n):
        meter.sample()
    tick_s = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for _ in range(n):
        with meter.window("w"):
            pass
    window_s = (time.perf_counter() - t) / n
    meter.stop()
    return tick_s, window_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--meter", default="auto")
    ap.add_argument("--period-s", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per arm per round")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = _load.begin()
    step = make_step(args.batch_size)
    for _ in range(2):  # warm-up: allocator and kernels
        step(no_window)

    arm_names = ("bare", "bare-a/a", "sampler", "windows")
    samples: dict[str, dict[str, list[float]]] = {a: {"wall": [], "cpu": []} for a in arm_names}
    rng = random.Random(args.seed)
    describe = None
    for _ in range(args.rounds):
        arms = list(samples)
        rng.shuffle(arms)
        for arm in arms:
            if arm.startswith("bare"):
                wall, cpu = time_block(step, no_window, args.steps)
            else:
                meter = open_meter(args.meter, sample_period_s=args.period_s)
                describe = describe or meter.describe()
                meter.start()
                wall, cpu = time_block(step, meter.window if arm == "windows" else no_window, args.steps)
                meter.stop()
            samples[arm]["wall"] += wall
            samples[arm]["cpu"] += cpu

    tick_s, window_s = micro_costs(args.meter, args.period_s)
    med = {a: {k: statistics.median(v) for k, v in s.items()} for a, s in samples.items()}
    best = {a: min(s["wall"]) for a, s in samples.items()}
    step_s = med["bare"]["wall"]
    print(f"meter: {args.meter} -> {[s['kind'] for s in describe['sources']]}, period {args.period_s} s")
    print(f"ResNet18 (CIFAR), batch {args.batch_size}, {args.threads} thread(s), "
          f"{args.rounds} rounds x {args.steps} steps per arm, torch {torch.__version__}")
    print(f"{'arm':<10} {'median wall s':>13} {'vs bare':>8} {'min wall s':>11} {'vs bare':>8} "
          f"{'median cpu s':>13} {'vs bare':>8}")
    for arm, m in med.items():
        print(f"{arm:<10} {m['wall']:>13.4f} {m['wall'] / med['bare']['wall']:>8.3f} "
              f"{best[arm]:>11.4f} {best[arm] / best['bare']:>8.3f} "
              f"{m['cpu']:>13.4f} {m['cpu'] / med['bare']['cpu']:>8.3f}")
    print(f"isolated costs: one sample tick {tick_s * 1e6:.1f} us, one window open+close {window_s * 1e6:.1f} us")
    print(f"overhead bound: sampler {tick_s / args.period_s:.4%} of wall time, "
          f"windows {4 * window_s / step_s:.4%} of a {step_s:.3f} s step")
    _load.end(load)


if __name__ == "__main__":
    main()
