"""Benchmark: ssProp backward vs nn.Conv2d on CIFAR ResNet18 shapes, side by side in one process.

Measures, for nn.Conv2d ("dense") and for ssProp at drop 0, 0.4 and 0.8 with each selection:

- per-layer conv backward time (every distinct conv shape of a CIFAR ResNet18, batch 64);
- whole training-step time (forward + cross-entropy + backward) of the full model;
- the FLOP-ideal step speedup next to the realized one;
- peak memory of one step relative to dense.

Method: one model, one set of weights; variants are switched with ``sparsify``/``densify`` and interleaved
in a fresh random order every repeat, so drifting machine load hits all of them alike; figures are medians
over repeats. Peak memory comes from torch's profiler (``profile_memory=True``): every CPU allocator
allocation/free event of one step, summed in time order, gives the peak bytes allocated during the step
above its starting level (parameters and the input batch exist before; gradients are set to None first).

Run: ``python benchmarks/backward.py`` (``--repeats``, ``--batch-size``, ``--quick`` for a smoke run).
The load before, during and after is printed with the figures (``benchmarks/_load.py``); figures taken
under load are marked NOT CITABLE.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

import _load
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats per variant (median reported)")
    parser.add_argument("--layer-repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--channels-last", action="store_true", help="run every variant in channels_last")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (batch 8, 2 repeats)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.repeats, args.layer_repeats = 8, 2, 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    load = _load.begin()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, median of {args.repeats} interleaved repeats; "
          "speedups are medians of per-repeat ratios to dense")

    # ---- per-layer conv backward
    print("\nPer-layer conv backward time, ms (speedup vs nn.Conv2d; FLOP-ideal = C_out / kept)")
    layer_variants = [v for v in VARIANTS if v.drop_rate is None or v.selection == "topk" or v.drop_rate == 0.8]
    header = "".join(f"{v.name.replace('ssprop ', ''):>22}" for v in layer_variants)
    print(f"{'layer':<24}{header}")
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
        print(f"{name:<24}{''.join(cells)}")

    # ---- whole step
    model = ResNet18().to(memory_format=fmt)
    x = torch.randn(args.batch_size, 3, 32, 32).to(memory_format=fmt)
    y = torch.randint(0, 10, (args.batch_size,))
    convs = conv_macs(model, x)
    linear_macs = args.batch_size * 512 * 10
    by_name = {v.name: v for v in VARIANTS}

    def run_step(vname: str) -> float:
        by_name[vname].apply(model)
        t0 = time.perf_counter()
        step(model, x, y)
        return time.perf_counter() - t0

    names = [v.name for v in VARIANTS]
    for n in names:
        run_step(n)
    samples = interleaved(names, args.repeats, run_step, seed=1)
    peaks = {}
    for v in VARIANTS:
        v.apply(model)
        peaks[v.name] = peak_step_bytes(model, x, y)
    densify(model)

    base = "dense nn.Conv2d"
    print("\nWhole training step (forward + cross-entropy + backward)")
    print(f"{'variant':<26}{'median ms':>11}{'speedup':>9}{'FLOP-ideal':>12}{'realized/ideal':>16}"
          f"{'peak MiB':>10}{'mem/dense':>11}")
    for v in VARIANTS:
        ideal = 1.0 if v.drop_rate is None else flop_ideal_speedup(convs, linear_macs, v.drop_rate)
        speed = paired_speedup(samples, base, v.name)
        median_ms = statistics.median(samples[v.name]) * 1e3
        print(f"{v.name:<26}{median_ms:>11.1f}{speed:>9.3f}{ideal:>12.3f}{speed / ideal:>16.3f}"
              f"{peaks[v.name] / 2**20:>10.1f}{peaks[v.name] / peaks['dense nn.Conv2d']:>11.3f}")
    overhead = 1.0 / paired_speedup(samples, base, "ssprop d=0") - 1.0
    print(f"\ndrop 0 overhead vs nn.Conv2d: {overhead * 100:+.1f}% (target <= +3%)")
    best = max(paired_speedup(samples, base, f"ssprop d=0.8 {s}") for s in SELECTIONS)
    print(f"best whole-step speedup at drop 0.8: {best:.2f}x (target >= 1.9x)")
    _load.end(load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
