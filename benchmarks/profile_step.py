"""Profile one CIFAR ResNet18 training step, nn.Conv2d vs ssProp: self CPU time and call counts per op.

Prints, for the dense model and for ssProp at ``--drop-rate`` (topk), torch.profiler's self CPU time per
step and calls per step of every op above ``--min-ms``, side by side, then where the ``aten::copy_`` and
``aten::fill_`` calls come from (their parent op chain) and their time. This is the evidence behind the
issue-12 cost breakdown (forward convolutions, conv backward, copies, channel scoring).

Run: ``python benchmarks/profile_step.py`` (``--threads``, ``--steps``, ``--batch-size``, ``--drop-rate``).
Profiler times are wall times of each op on the main thread: cite them only from a quiet machine (the load
before, during and after is printed, ``benchmarks/_load.py``).
"""

from __future__ import annotations

import argparse
import collections
import sys

import _load
import torch
from backward import ResNet18, step
from torch.profiler import ProfilerActivity, profile

from ssprop_energy.sparse import densify, sparsify

TRACED = ("aten::copy_", "aten::fill_")


def profile_steps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> profile:
    step(model, x, y)  # warm-up: oneDNN primitive creation, allocator growth
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(model, x, y)
    return prof


def per_op(prof: profile, steps: int) -> dict[str, tuple[float, float]]:
    """Op name -> (self CPU ms per step, calls per step)."""
    return {e.key: (e.self_cpu_time_total / 1e3 / steps, e.count / steps) for e in prof.key_averages()}


def copy_sources(prof: profile, steps: int) -> dict[tuple[str, str], tuple[float, float]]:
    """(op, parent chain) -> (ms per step, calls per step) for the traced ops."""
    acc: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for e in prof.events():
        if e.name not in TRACED:
            continue
        chain, parent = [], e.cpu_parent
        while parent is not None and len(chain) < 3:
            chain.append(parent.name)
            parent = parent.cpu_parent
        cell = acc[(e.name, " < ".join(chain) or "(top level)")]
        cell[0] += e.self_cpu_time_total / 1e3 / steps
        cell[1] += 1 / steps
    return {k: (v[0], v[1]) for k, v in acc.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per model (averaged)")
    parser.add_argument("--drop-rate", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--min-ms", type=float, default=1.0, help="hide ops under this self time in both models")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ResNet18()
    x = torch.randn(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))
    load = _load.begin()
    densify(model)
    dense = profile_steps(model, x, y, args.steps)
    sparsify(model, args.drop_rate)
    sparse = profile_steps(model, x, y, args.steps)
    densify(model)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{args.steps} profiled steps each; self CPU ms per step (calls per step)")
    ops_d, ops_s = per_op(dense, args.steps), per_op(sparse, args.steps)
    names = sorted(set(ops_d) | set(ops_s), key=lambda n: -max(ops_d.get(n, (0, 0))[0], ops_s.get(n, (0, 0))[0]))
    print(f"{'op':<48}{'nn.Conv2d':>20}{f'ssProp drop {args.drop_rate}':>22}")
    for n in names:
        d, s = ops_d.get(n, (0.0, 0.0)), ops_s.get(n, (0.0, 0.0))
        if max(d[0], s[0]) < args.min_ms and n not in TRACED:
            continue
        print(f"{n[:47]:<48}{d[0]:>12.1f} ({d[1]:>4.0f}){s[0]:>14.1f} ({s[1]:>4.0f})")
    print(f"{'total self CPU':<48}{sum(v[0] for v in ops_d.values()):>12.1f}{'':>7}"
          f"{sum(v[0] for v in ops_s.values()):>14.1f}")

    for label, prof in (("nn.Conv2d", dense), (f"ssProp drop {args.drop_rate}", sparse)):
        print(f"\n{label}: where the copy_/fill_ calls come from (ms per step, calls per step)")
        for (op, chain), (ms, calls) in sorted(copy_sources(prof, args.steps).items(), key=lambda kv: -kv[1][0]):
            print(f"  {ms:8.2f} ms {calls:5.0f}x  {op} < {chain}")
    _load.end(load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
