"""Benchmark: ssProp backward vs nn.Conv2d on CIFAR ResNet18 shapes, side by side in one process.

Measures, for nn.Conv2d ("dense") and for ssProp at drop 0, 0.4 and 0.8 with each selection, once per
thread setting (``--threads 0,1``: torch's default, then one thread):

- per-layer conv backward time (every distinct conv shape of a CIFAR ResNet18, batch 64), with the realized
  speedup over its FLOP-ideal ``C_out / kept`` at drop 0.8;
- whole training-step time (forward + cross-entropy + backward) of the full model;
- two ceilings for the step speedup and the realized fraction of each:
  FLOP-ideal (conv + linear multiply-adds of a dense step / of the sparse step) and time-ideal (the dense
  step's measured time with only its conv backward scaled by the executed conv-backward FLOP fraction:
  ``1 / (1 - s * (1 - f))``, ``s`` the conv backward's share of the dense step measured by torch's profiler,
  ``f`` the fraction of conv-backward multiply-adds the sparse step executes, 0.195 at drop 0.8);
- drop 0 against nn.Conv2d (target: at most 3% slower);
- peak memory of one step relative to dense; minor page faults per step (allocator behaviour: a fresh page
  costs microseconds, and glibc returns freed large blocks to the system, so a step can spend a sizeable
  part of its time faulting pages back in); with one thread, the process-CPU-time speedup too (less
  disturbed than wall time by other processes).

Method: one model, one set of weights; variants are switched with ``sparsify``/``densify`` and interleaved
in a fresh random order every repeat, so drifting machine load hits all of them alike; figures are medians
over repeats. Peak memory comes from torch's profiler (``profile_memory=True``): every CPU allocator
allocation/free event of one step, summed in time order, gives the peak bytes allocated during the step
above its starting level (parameters and the input batch exist before; gradients are set to None first).

Run: ``python benchmarks/backward.py`` (``--threads``, ``--repeats``, ``--batch-size``, ``--quick`` for a
smoke run). The load before, during and after is printed with the figures (``benchmarks/_load.py``);
figures taken under load are marked NOT CITABLE.
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import _load
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ssprop_energy.sparse import densify, keep_count, sparsify

SELECTIONS = ("topk", "random", "quantile")
DROPS = (0.4, 0.8)


# ------------------------------------------------------------------------------------ a CIFAR ResNet18


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet18: 3x3 stem, no max-pool, [2, 2, 2, 2] basic blocks, 11.17 M parameters at 10 classes."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        blocks: list[nn.Module] = []
        c_in = 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.layers = nn.Sequential(*blocks)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


# ------------------------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    name: str
    drop_rate: float | None  # None: plain nn.Conv2d
    selection: str = "topk"

    def apply(self, model: nn.Module) -> None:
        densify(model)
        if self.drop_rate is not None:
            sparsify(model, self.drop_rate, selection=self.selection)


VARIANTS = [Variant("dense nn.Conv2d", None), Variant("ssprop d=0", 0.0)] + [
    Variant(f"ssprop d={d} {sel}", d, sel) for d in DROPS for sel in SELECTIONS
]


# ----------------------------------------------------------------------------------------- FLOP-ideal


def conv_macs(model: nn.Module, x: torch.Tensor) -> list[tuple[nn.Conv2d, int, bool]]:
    """(conv, forward MACs at this batch, input needs grad) for every conv, from one traced forward."""
    found: list[tuple[nn.Conv2d, int, bool]] = []

    def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        assert isinstance(mod, nn.Conv2d)
        kh, kw = mod.kernel_size
        macs = out.numel() * (mod.in_channels // mod.groups) * kh * kw
        found.append((mod, macs, args[0].requires_grad))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    # requires_grad is False for every input under no_grad; only the stem sees the raw batch.
    found = [(m, macs, m is not model.conv1) for m, macs, _ in found]
    for h in handles:
        h.remove()
    return found


def flop_ideal_speedup(convs: list[tuple[nn.Conv2d, int, bool]], linear_macs: int, drop_rate: float) -> float:
    """(F + B_dense) / (F + B_sparse) counting conv and linear multiply-adds only.

    Conv backward = grad_weight (= forward MACs) + grad_input (= forward MACs, skipped for the stem),
    both scaled by kept/C_out; the linear head stays dense (forward + 2x backward).
    """
    forward = sum(macs for _, macs, _ in convs) + linear_macs
    dense_bwd = sum(macs * (2 if gin else 1) for _, macs, gin in convs) + 2 * linear_macs
    sparse_bwd = sum(
        macs * (2 if gin else 1) * keep_count(drop_rate, m.out_channels) / m.out_channels for m, macs, gin in convs
    ) + 2 * linear_macs
    return (forward + dense_bwd) / (forward + sparse_bwd)


def conv_backward_fraction(convs: list[tuple[nn.Conv2d, int, bool]], drop_rate: float) -> float:
    """Conv-backward multiply-adds executed at ``drop_rate`` / those of the dense backward.

    grad_weight and grad_input (skipped for the stem) each cost the forward's MACs, scaled by kept/C_out.
    """
    dense = sum(macs * (2 if gin else 1) for _, macs, gin in convs)
    sparse = sum(
        macs * (2 if gin else 1) * keep_count(drop_rate, m.out_channels) / m.out_channels for m, macs, gin in convs
    )
    return sparse / dense


def time_ideal_speedup(conv_bwd_share: float, fraction: float) -> float:
    """Step speedup if only the conv backward (share ``conv_bwd_share`` of the dense step) shrank to ``fraction``."""
    return 1.0 / (1.0 - conv_bwd_share * (1.0 - fraction))


# -------------------------------------------------------------------------------------------- timing


def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    for p in model.parameters():
        p.grad = None
    F.cross_entropy(model(x), y).backward()


def peak_step_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Peak CPU bytes allocated during one step above its starting level (allocator events, in order)."""
    for p in model.parameters():
        p.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        F.cross_entropy(model(x), y).backward()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    level = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        level += e.nbytes()
        peak = max(peak, level)
    return peak


def conv_backward_share(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 3) -> float:
    """Median over ``steps`` profiled steps of ``aten::convolution_backward``'s share of the step's wall time.

    Each op's time is its wall time on the calling thread, including what it runs internally (layout
    copies) and its worker threads' time in parallel regions; the step is timed around the profiled call.
    """
    shares = []
    for _ in range(steps):
        for p in model.parameters():
            p.grad = None
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            F.cross_entropy(model(x), y).backward()
            wall_us = (time.perf_counter() - t0) * 1e6
        conv_us = sum(e.cpu_time_total for e in prof.events() if e.name == "aten::convolution_backward")
        shares.append(conv_us / wall_us)
    return statistics.median(shares)


def interleaved(names: list[str], repeats: int, run: Callable[[str], float], seed: int = 0) -> dict[str, list[float]]:
    """Samples of ``run(name)`` per name; every repeat visits all names in a fresh random order."""
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(repeats):
        order = names[:]
        rng.shuffle(order)
        for n in order:
            samples[n].append(run(n))
    return samples


def paired_speedup(samples: dict[str, list[float]], base: str, name: str) -> float:
    """Median over repeats of base_time / name_time, both taken in the same repeat (same load period)."""
    return statistics.median(b / t for b, t in zip(samples[base], samples[name]))


def layer_shapes(batch: int) -> list[tuple[str, nn.Conv2d, tuple[int, ...], bool]]:
    """Every distinct conv of the CIFAR ResNet18 with its input shape at ``batch``."""
    spec = [("stem 3->64 @32", 3, 64, 3, 1, 32, False)]
    size = 32
    c_in = 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        spec.append((f"{c_in}->{c_out} s{stride} @{size}", c_in, c_out, 3, stride, size, True))
        if stride != 1:
            spec.append((f"1x1 {c_in}->{c_out} s{stride} @{size}", c_in, c_out, 1, stride, size, True))
        size //= stride
        if c_in != c_out:
            spec.append((f"{c_out}->{c_out} s1 @{size}", c_out, c_out, 3, 1, size, True))
        c_in = c_out
    return [
        (name, nn.Conv2d(ci, co, k, s, k // 2, bias=False), (batch, ci, hw, hw), gin)
        for name, ci, co, k, s, hw, gin in spec
    ]


def per_layer_table(args: argparse.Namespace, fmt: torch.memory_format) -> None:
    """Per-layer conv backward times; at drop 0.8 topk also the realized speedup / its FLOP-ideal."""
    print("\nPer-layer conv backward time, ms (speedup vs nn.Conv2d / FLOP-ideal = C_out / kept); "
          "last column: realized / FLOP-ideal at drop 0.8 topk")
    layer_variants = [v for v in VARIANTS if v.drop_rate is None or v.selection == "topk" or v.drop_rate == 0.8]
    header = "".join(f"{v.name.replace('ssprop ', ''):>22}" for v in layer_variants)
    print(f"{'layer':<24}{header}{'0.8 real/ideal':>16}")
    for name, conv, shape, gin in layer_shapes(args.batch_size):
        holder = nn.Sequential(conv)
        x = torch.randn(shape).to(memory_format=fmt).requires_grad_(gin)
        holder.to(memory_format=fmt)
        with torch.no_grad():
            dy = torch.randn_like(holder(x))

        def run_layer(vname: str, holder: nn.Module = holder, x: torch.Tensor = x, dy: torch.Tensor = dy) -> float:
            next(v for v in layer_variants if v.name == vname).apply(holder)
            out = holder(x)
            x.grad = None
            holder[0].weight.grad = None
            t0 = time.perf_counter()
            out.backward(dy)
            return time.perf_counter() - t0

        names = [v.name for v in layer_variants]
        for n in names:  # warm-up
            run_layer(n)
        samples = interleaved(names, args.layer_repeats, run_layer)
        cells = []
        for v in layer_variants:
            ms = statistics.median(samples[v.name]) * 1e3
            if v.drop_rate is None:
                cells.append(f"{ms:>22.2f}")
            else:
                kept = keep_count(v.drop_rate, conv.out_channels)
                speed = paired_speedup(samples, names[0], v.name)
                cells.append(f"{ms:>9.2f} ({speed:.2f}x/{conv.out_channels / kept:.1f})")
        ideal = conv.out_channels / keep_count(0.8, conv.out_channels)
        realized = paired_speedup(samples, names[0], "ssprop d=0.8 topk") / ideal
        print(f"{name:<24}{''.join(cells)}{realized:>16.2f}")


def whole_step_table(args: argparse.Namespace, fmt: torch.memory_format) -> None:
    """Whole-step speedups beside the FLOP-ideal and the time-ideal, memory and page faults."""
    model = ResNet18().to(memory_format=fmt)
    x = torch.randn(args.batch_size, 3, 32, 32).to(memory_format=fmt)
    y = torch.randint(0, 10, (args.batch_size,))
    convs = conv_macs(model, x)
    linear_macs = args.batch_size * 512 * 10
    by_name = {v.name: v for v in VARIANTS}
    cpu_s: dict[str, list[float]] = {v.name: [] for v in VARIANTS}
    faults: dict[str, list[int]] = {v.name: [] for v in VARIANTS}

    def run_step(vname: str) -> float:
        by_name[vname].apply(model)
        faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        step(model, x, y)
        wall = time.perf_counter() - t0
        cpu_s[vname].append(time.process_time() - cpu0)
        faults[vname].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0)
        return wall

    names = [v.name for v in VARIANTS]
    for n in names:
        run_step(n)
    for lst in (*cpu_s.values(), *faults.values()):
        lst.clear()
    samples = interleaved(names, args.repeats, run_step, seed=1)
    peaks = {}
    for v in VARIANTS:
        v.apply(model)
        peaks[v.name] = peak_step_bytes(model, x, y)
    densify(model)
    share = conv_backward_share(model, x, y, steps=1 if args.quick else 3)

    base = "dense nn.Conv2d"
    one_thread = torch.get_num_threads() == 1
    print(f"\nWhole training step (forward + cross-entropy + backward); conv backward = {share:.3f} of the dense "
          "step (torch.profiler, median of 3 steps)")
    print(f"{'variant':<26}{'median ms':>11}{'speedup':>9}{'FLOP-ideal':>12}{'real/FLOP':>11}{'time-ideal':>12}"
          f"{'real/time':>11}{'cpu speedup' if one_thread else '':>13}{'peak MiB':>10}{'mem/dense':>11}"
          f"{'faults/step':>13}")
    for v in VARIANTS:
        speed = paired_speedup(samples, base, v.name)
        if v.drop_rate is None:
            flop_ideal = t_ideal = 1.0
        else:
            flop_ideal = flop_ideal_speedup(convs, linear_macs, v.drop_rate)
            t_ideal = time_ideal_speedup(share, conv_backward_fraction(convs, v.drop_rate))
        cpu_cell = f"{paired_speedup(cpu_s, base, v.name):>13.3f}" if one_thread else f"{'':>13}"
        print(f"{v.name:<26}{statistics.median(samples[v.name]) * 1e3:>11.1f}{speed:>9.3f}{flop_ideal:>12.3f}"
              f"{speed / flop_ideal:>11.3f}{t_ideal:>12.3f}{speed / t_ideal:>11.3f}{cpu_cell}"
              f"{peaks[v.name] / 2**20:>10.1f}{peaks[v.name] / peaks[base]:>11.3f}"
              f"{statistics.median(faults[v.name]):>13.0f}")
    overhead = 1.0 / paired_speedup(samples, base, "ssprop d=0") - 1.0
    print(f"\ndrop 0 overhead vs nn.Conv2d: {overhead * 100:+.1f}% (target <= +3%)")
    t_ideal = time_ideal_speedup(share, conv_backward_fraction(convs, 0.8))
    best = max(paired_speedup(samples, base, f"ssprop d=0.8 {s}") for s in SELECTIONS)
    print(f"best whole-step speedup at drop 0.8: {best:.3f}x = {best / t_ideal:.3f} of the time-ideal "
          f"{t_ideal:.3f}x (target >= 0.95)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats per variant (median reported)")
    parser.add_argument("--layer-repeats", type=int, default=9)
    parser.add_argument("--threads", default="0,1",
                        help="comma-separated torch intra-op thread counts, one full run each (0: torch's default)")
    parser.add_argument("--channels-last", action="store_true", help="run every variant in channels_last")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (batch 8, 2 repeats)")
    args = parser.parse_args(argv)
    try:
        thread_counts = [int(t) for t in args.threads.split(",")]
    except ValueError:
        parser.error(f"--threads must be comma-separated integers, got {args.threads!r}")
    if args.quick:
        args.batch_size, args.repeats, args.layer_repeats = 8, 2, 2
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    default_threads = torch.get_num_threads()
    load = _load.begin()
    for threads in thread_counts:
        torch.set_num_threads(threads if threads > 0 else default_threads)
        torch.manual_seed(0)
        print(f"\n=== torch {torch.__version__}, {torch.get_num_threads()} threads"
              f"{' (default)' if threads <= 0 else ''}, batch {args.batch_size}, "
              f"{'channels_last' if args.channels_last else 'NCHW'}, median of {args.repeats} interleaved repeats; "
              "speedups are medians of per-repeat ratios to dense")
        per_layer_table(args, fmt)
        whole_step_table(args, fmt)
    _load.end(load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
