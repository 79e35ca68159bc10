"""Benchmark: does data loading matter next to a CPU training step? Side by side in one run.

For each setting, rounds alternate one ``BatchLoader`` batch (index_select + normalise of uint8 data held in
memory) and one CIFAR ResNet-18 training step (forward, cross-entropy, backward, Adam step) on that batch,
so drifting machine load hits both alike. Reported: the one-off load time, the median time per batch of each,
and their ratio. Settings:

- ``digits``: the default dataset at its default 16x16, 1 channel (what ``compare`` runs with no flags);
- ``cifar-shaped``: ``synthetic:3x32x32:10:50000``, CIFAR-10's shape and size, 50 000 train images in memory.

Run: ``python benchmarks/data_loading.py`` (``--batch-size``, ``--rounds``, ``--threads``, ``--device``).
The load before, during and after is printed with the figures (``benchmarks/_load.py``); figures taken
under load are marked NOT CITABLE.
"""

from __future__ import annotations

import argparse
import statistics
import time

import _load
import torch
import torch.nn.functional as F

from ssprop_energy.data import BatchLoader, load_dataset
from ssprop_energy.models import get_model

SETTINGS = {"digits": "digits", "cifar-shaped": "synthetic:3x32x32:10:50000"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(name: str, dataset: str, batch_size: int, rounds: int, device: torch.device) -> dict[str, float]:
    t = time.perf_counter()
    ds = load_dataset(dataset)
    load_s = time.perf_counter() - t
    loader = BatchLoader(ds.train, batch_size, seed=0, mean=ds.mean, std=ds.std, device=device, drop_last=True)
    torch.manual_seed(0)
    model = get_model("resnet18", num_classes=ds.num_classes, in_channels=ds.in_channels, image_size=ds.image_size)
    model = model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = iter(loader)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            loader.set_epoch(loader.epoch + 1)
            batches = iter(loader)
            return next(batches)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    step(*next_batch())  # warm-up: allocator, kernels, Adam state
    load_times, step_times = [], []
    for _ in range(rounds):
        _sync(device)
        t = time.perf_counter()
        x, y = next_batch()
        _sync(device)
        load_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        step(x, y)
        _sync(device)
        step_times.append(time.perf_counter() - t)
    batch_s = statistics.median(load_times)
    step_s = statistics.median(step_times)
    return {
        "setting": name,
        "shape": "x".join(str(v) for v in ds.train.images.shape[1:]),
        "train_images": len(ds.train),
        "load_s": load_s,
        "batch_ms": batch_s * 1e3,
        "batch_min_ms": min(load_times) * 1e3,
        "step_ms": step_s * 1e3,
        "ratio": batch_s / step_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated: " + ", ".join(SETTINGS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = _load.begin(gpu_index=_load.nvml_index(str(device)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, batch {args.batch_size}, "
          f"{args.rounds} rounds")
    print(f"{'setting':<13} {'shape':<8} {'train':>6} {'load s':>7} {'batch ms':>9} {'(min)':>7} {'step ms':>9} {'batch/step':>11}")
    for name in args.settings.split(","):
        r = bench(name, SETTINGS[name], args.batch_size, args.rounds, device)
        print(f"{r['setting']:<13} {r['shape']:<8} {r['train_images']:>6} {r['load_s']:>7.2f} {r['batch_ms']:>9.3f} "
              f"{r['batch_min_ms']:>7.3f} {r['step_ms']:>9.1f} {r['ratio']:>11.3e}")
    _load.end(load)


if __name__ == "__main__":
    main()
