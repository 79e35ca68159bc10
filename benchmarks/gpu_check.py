"""GPU validation kit: one command that checks and measures what only a GPU can show, in at most 8 minutes.

Parts, each run in its own subprocess with its own time budget (a part that overruns is killed; what it
had written is kept, marked ``timed_out``):

- ``grads``: ssProp gradients on CUDA (Conv2d, Linear; drop 0.5, 0.8; fp32, bf16 and fp16 autocast) against
  the masked-dense reference in float64 on the same (rounded) values;
- ``speedup``: whole-step time, dense vs ssProp at drop 0.5 and 0.8, CIFAR ResNet18 (batch 128, 32 px) and
  the package's ResNet50 at 224 px (batch 64; its CIFAR stem keeps full resolution, so it may not fit: an
  out-of-memory is recorded, not hidden), with and without bf16 AMP and channels_last; CUDA events,
  interleaved (benchmarks/backward.py's ``interleaved``), medians, and the time-ideal from the profiler;
- ``nvml``: the energy counter's update period, idle power, and counter vs sampled integral over a steady
  load (60 s), through the package's NVML source and meter;
- ``compare``: ``compare --device cuda --model resnet18 --dataset synthetic --meter nvml`` end to end (exit 0,
  provenance ``counter``), then the same under ``--nproc-per-node 1`` (torchrun, NCCL);
- ``ddpm``: ``compare --model ddpm-unet --device cuda`` for 1 epoch.

``--dry-run`` runs the same plan on CPU in seconds: tiny sizes, the fake pynvml of tests/energy_fakes.py for
the NVML part, ``--meter fake`` and gloo for the CLI parts. Its figures are labelled ``fake``/dry and mean
nothing; it exists so that the script never rots (tests/test_gpu_check.py runs it).

Run: ``python benchmarks/gpu_check.py --out gpu_check_out`` (writes gpu_check.json and gpu_check.md there).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from ssprop_energy.records import write_json_atomic, write_text_atomic  # noqa: E402 - after the sys.path line above

# Per-part wall budgets (s) on one H100; they sum to 450 s, leaving the rest of 8 minutes to process start-up.
BUDGET_S = {"grads": 30, "speedup": 150, "nvml": 85, "compare": 110, "ddpm": 75}
DRY_BUDGET_S = {"grads": 60, "speedup": 90, "nvml": 30, "compare": 150, "ddpm": 150}

# Gradient tolerances: norm-wise relative error ||g - ref|| / ||ref|| against float64 on the same rounded
# inputs, so only the operation's own rounding counts. fp32 with TF32 off: the accumulation error of a sum of
# K terms is ~sqrt(K) * 2^-24 (K ~ 10^4 here), < 1e-5. bf16 (8-bit mantissa, unit roundoff u = 2^-8 = 3.9e-3):
# the grad_output and the result are each rounded once to bf16 and cuDNN/cuBLAS accumulate in fp32, so the
# error is ~2u; 2e-2 allows 5u. fp16 (u = 2^-11 = 4.9e-4): same argument, 5e-3 allows 10u.
GRAD_TOL = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 5e-3}
# NVML: the sampled power on recent GPUs is a ~1 s average, so at a load's edges the sampled integral lags
# the counter by up to ~1 s x the power step; over 60 s of load that is < 2%; 5% is the stated bound.
NVML_AGREE_BOUND = 0.05


def _write_part(out: Path, name: str, data: dict[str, Any]) -> None:
    write_json_atomic(out / "parts" / f"{name}.json", data)


# -------------------------------------------------------------------------------------------- grads


def part_grads(out: Path, dry: bool) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from ssprop_energy.sparse.functional import KeptRecord, ssprop_conv2d, ssprop_linear

    dev = "cpu" if dry else "cuda"
    if dev == "cuda":  # TF32 would round fp32 to a 10-bit mantissa: the fp32 check is of fp32
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    dtypes = {"fp32": None, "bf16": torch.bfloat16} if dry else {"fp32": None, "bf16": torch.bfloat16,
                                                                   "fp16": torch.float16}
    n, c_in, c_out, hw = (2, 8, 16, 6) if dry else (32, 64, 128, 32)
    rows: list[dict[str, Any]] = []
    result = {"rows": rows, "tolerance": GRAD_TOL}
    g = torch.Generator().manual_seed(0)
    for layer in ("conv2d", "linear"):
        for drop in (0.5, 0.8):
            for dname, dt in dtypes.items():
                if layer == "conv2d":
                    x = torch.randn(n, c_in, hw, hw, generator=g)
                    w = torch.randn(c_out, c_in, 3, 3, generator=g) * 0.1
                else:
                    x = torch.randn(n * hw, c_in, generator=g)
                    w = torch.randn(c_out, c_in, generator=g) * 0.1
                b = torch.randn(c_out, generator=g)
                x, w, b = (t.to(dev).requires_grad_() for t in (x, w, b))
                rec = KeptRecord()
                with torch.autocast(dev, dtype=dt, enabled=dt is not None):
                    y = (ssprop_conv2d(x, w, b, padding=1, drop_rate=drop, record=rec) if layer == "conv2d"
                         else ssprop_linear(x, w, b, drop_rate=drop, record=rec))
                dy = torch.randn(y.shape, generator=g).to(dev, y.dtype)
                y.backward(dy)
                kept = rec.kept.to("cpu")
                # reference: dense op in float64 on the same rounded inputs, grad_output masked to the kept set
                def cast(t: Any, dt: Any = dt) -> Any:
                    return t.detach().to("cpu", dt).double() if dt is not None else t.detach().to("cpu").double()

                xr, wr, br = (cast(t).requires_grad_() for t in (x, w, b))
                mask = torch.zeros(c_out, dtype=torch.float64)
                mask[kept] = 1.0
                yr = F.conv2d(xr, wr, br, padding=1) if layer == "conv2d" else F.linear(xr, wr, br)
                shape = (1, c_out, 1, 1) if layer == "conv2d" else (1, c_out)
                yr.backward(dy.to("cpu").double() * mask.view(shape))
                errs = {k: float((got.grad.to("cpu").double() - ref.grad).norm() / ref.grad.norm())
                        for k, got, ref in (("input", x, xr), ("weight", w, wr), ("bias", b, br))}
                worst = max(errs.values())
                rows.append({"layer": layer, "drop_rate": drop, "dtype": dname, "rel_err": errs,
                             "max_rel_err": worst, "tolerance": GRAD_TOL[dname], "ok": worst <= GRAD_TOL[dname]})
                _write_part(out, "grads", result)
    result["ok"] = all(r["ok"] for r in rows)
    return result


# ------------------------------------------------------------------------------------------ speedup


def _cuda_conv_backward_share(model: Any, x: Any, y: Any) -> float:
    """Device time of ``aten::convolution_backward``'s kernels / the step's device time (one profiled step)."""
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    for p in model.parameters():
        p.grad = None
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        F.cross_entropy(model(x), y).backward()
        torch.cuda.synchronize()
    events = prof.key_averages()
    conv = sum(e.device_time_total for e in events if e.key == "aten::convolution_backward")
    total = sum(e.self_device_time_total for e in events)
    return conv / total if total > 0 else float("nan")


def part_speedup(out: Path, dry: bool) -> dict[str, Any]:
    import torch

    dev = torch.device("cpu" if dry else "cuda")
    cases = ([("resnet18", 32, 2), ("resnet50", 16, 2)] if dry else [("resnet18", 32, 128), ("resnet50", 224, 64)])
    repeats = 2 if dry else 7
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {"rows": rows, "repeats": repeats, "timer": "perf_counter" if dry else "cuda events"}
    for name, size, batch in cases:
        for amp in (False, True):
            for channels_last in (False, True):
                row: dict[str, Any] = {"model": name, "image_size": size, "batch": batch, "amp_bf16": amp,
                                       "channels_last": channels_last}
                rows.append(row)
                try:
                    _speedup_case(row, dev, repeats)
                except torch.cuda.OutOfMemoryError as exc:
                    row["error"] = f"out of memory: {str(exc).splitlines()[0]}"
                    torch.cuda.empty_cache()
                _write_part(out, "speedup", result)
    return result


def _speedup_case(row: dict[str, Any], dev: Any, repeats: int) -> None:
    """Fill ``row`` with the median step times (s), speedups and time-ideals of one configuration."""
    import torch
    import torch.nn.functional as F
    from backward import (
        conv_backward_fraction,
        conv_backward_share,
        conv_macs,
        interleaved,
        time_ideal_speedup,
    )

    from ssprop_energy.models import get_model
    from ssprop_energy.sparse import densify, sparsify

    fmt = torch.channels_last if row["channels_last"] else torch.contiguous_format
    model = get_model(row["model"], num_classes=10, image_size=row["image_size"]).to(dev, memory_format=fmt)
    x = torch.randn(row["batch"], 3, row["image_size"], row["image_size"], device=dev).to(memory_format=fmt)
    y = torch.randint(0, 10, (row["batch"],), device=dev)
    amp = row["amp_bf16"]

    def run_step(variant: str) -> float:
        if variant == "dense":
            densify(model)
        else:
            sparsify(model, drop_rate=float(variant))
        for p in model.parameters():
            p.grad = None
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        if dev.type == "cuda":
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e-3
        return time.perf_counter() - t0

    variants = ["dense", "0.5", "0.8"]
    for v in variants:  # warm-up: cuDNN autotuning, allocator growth
        run_step(v)
    samples = interleaved(variants, repeats, run_step)
    med = {v: statistics.median(s) for v, s in samples.items()}
    row["step_s"] = med
    densify(model)
    convs = conv_macs(model, x)
    if dev.type == "cuda":
        share = _cuda_conv_backward_share(model, x, y)
    else:
        share = conv_backward_share(model, x, y, steps=1)
    row["conv_backward_share"] = share
    for v in ("0.5", "0.8"):
        frac = conv_backward_fraction(convs, float(v))
        row[f"speedup_{v}"] = med["dense"] / med[v]
        row[f"time_ideal_{v}"] = time_ideal_speedup(share, frac)


# --------------------------------------------------------------------------------------------- nvml


def _install_fake_pynvml() -> None:
    """Dry run: the tests' fake pynvml on the real clock (an H100 with a counter, power 300 W +- 50 W)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from energy_fakes import FakeGpu, make_pynvml, sine

    p, e = sine(300.0, 50.0, 2.0)
    sys.modules["pynvml"] = make_pynvml(time.perf_counter, [FakeGpu("NVIDIA H100 80GB HBM3 (fake)", p, e)])


def part_nvml(out: Path, dry: bool) -> dict[str, Any]:
    from ssprop_energy.energy.nvml import NvmlSource
    from ssprop_energy.energy.select import open_meter

    if dry:
        _install_fake_pynvml()
    result: dict[str, Any] = {"provenance": "fake" if dry else "counter/sampled"}
    # update period: poll the counter and time its changes (the fake is continuous: every poll changes)
    src = NvmlSource(gpus=[0])
    try:
        changes: list[float] = []
        last = src.read_energy_j()["gpu:0"]
        t_end = time.perf_counter() + (0.3 if dry else 3.0)
        while time.perf_counter() < t_end:
            now = src.read_energy_j()["gpu:0"]
            if now != last:
                changes.append(time.perf_counter())
                last = now
            time.sleep(0.0005)
        gaps = [b - a for a, b in zip(changes, changes[1:])]
        result["counter_update_period_s"] = statistics.median(gaps) if gaps else None
        result["counter_changes"] = len(changes)
    finally:
        src.close()
    _write_part(out, "nvml", result)
    meter = open_meter("nvml", sample_period_s=0.1, gpus=[0], sync=None)
    result["idle_power_w"] = meter.measure_idle(0.3 if dry else 5.0)["gpu:0"]
    _write_part(out, "nvml", result)
    meter.start()
    load_s = 0.5 if dry else 60.0
    _steady_load(load_s, dry)
    report = meter.stop()
    comp = report.component("gpu:0")
    rel = abs(comp.sampled_energy_j - comp.energy_j) / comp.energy_j if comp.energy_j > 0 else float("nan")
    result.update({"load_s": load_s, "counter_energy_j": comp.energy_j, "sampled_energy_j": comp.sampled_energy_j,
                   "rel_diff": rel, "bound": NVML_AGREE_BOUND, "ok": rel <= NVML_AGREE_BOUND})
    return result


def _steady_load(seconds: float, dry: bool) -> None:
    import torch

    if dry:
        time.sleep(seconds)
        return
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        for _ in range(20):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------- CLI parts


def _cli(args: list[str], run_dir: Path, timeout_s: float, torchrun: bool = False) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "ssprop_energy", "compare", *args, "--out", str(run_dir), "--quiet"]
    if torchrun:
        cmd += ["--nproc-per-node", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"command": cmd[2:], "exit": None, "timed_out": True, "wall_s": time.perf_counter() - t0}
    summaries = glob.glob(str(run_dir / "**" / "summary.json"), recursive=True)
    sources: set[str] = set()
    for path in summaries:
        _collect_sources(json.loads(Path(path).read_text(encoding="utf-8")), sources)
    return {"command": cmd[2:], "exit": proc.returncode, "wall_s": time.perf_counter() - t0,
            "provenance": sorted(sources), "stderr_tail": proc.stderr[-800:]}


def _collect_sources(obj: Any, out: set[str]) -> None:
    """Every energy component's ``source`` anywhere in a summary (arms, epochs, phases, ranks)."""
    if isinstance(obj, dict):
        if "component" in obj and "source" in obj and "energy_j" in obj:
            out.add(str(obj["source"]))
        for v in obj.values():
            _collect_sources(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _collect_sources(v, out)


def part_compare(out: Path, dry: bool) -> dict[str, Any]:
    # one epoch at a constant drop 0.8 (bar needs two epochs to reach a sparse one)
    base = ["--model", "resnet18", "--epochs", "1", "--schedule", "constant",
            "--batch-size", "16" if dry else "128"]
    if dry:
        base += ["--device", "cpu", "--meter", "fake", "--dataset", "synthetic:3x8x8:10:32", "--threads", "1"]
        want = "fake"
    else:
        base += ["--device", "cuda", "--meter", "nvml", "--dataset", "synthetic:3x32x32:10:8192"]
        want = "counter"
    budget = (DRY_BUDGET_S if dry else BUDGET_S)["compare"] / 2 - 5
    result: dict[str, Any] = {"single": _cli(base, out / "runs" / "compare", budget)}
    _write_part(out, "compare", result)
    result["torchrun"] = _cli(base, out / "runs" / "compare_torchrun", budget, torchrun=True)
    for key in ("single", "torchrun"):
        r = result[key]
        r["ok"] = r.get("exit") == 0 and want in r.get("provenance", [])
    result["ok"] = result["single"]["ok"] and result["torchrun"]["ok"]
    return result


def part_ddpm(out: Path, dry: bool) -> dict[str, Any]:
    args = ["--model", "ddpm-unet", "--epochs", "1", "--schedule", "constant"]  # bar needs 2 epochs
    if dry:
        args += ["--device", "cpu", "--meter", "fake", "--dataset", "synthetic:1x8x8:10:16", "--batch-size", "8",
                 "--samples", "4", "--timesteps", "4", "--threads", "1"]
        want = "fake"
    else:
        args += ["--device", "cuda", "--meter", "nvml", "--dataset", "synthetic:3x32x32:10:2048"]
        want = "counter"
    budget = (DRY_BUDGET_S if dry else BUDGET_S)["ddpm"] - 5
    r = _cli(args, out / "runs" / "ddpm", budget)
    r["ok"] = r.get("exit") == 0 and want in r.get("provenance", [])
    return r


PARTS = {"grads": part_grads, "speedup": part_speedup, "nvml": part_nvml, "compare": part_compare, "ddpm": part_ddpm}


# --------------------------------------------------------------------------------------------- driver


def _run_part(name: str, out: Path, dry: bool) -> dict[str, Any]:
    budget = (DRY_BUDGET_S if dry else BUDGET_S)[name]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--out", str(out)] + (
        ["--dry-run"] if dry else [])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget, check=False)
        status = "done" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        err = proc.stderr[-1500:] if proc.returncode != 0 else ""
    except subprocess.TimeoutExpired:
        status, err = "timed_out", ""
    path = out / "parts" / f"{name}.json"
    data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    return {"status": status, "budget_s": budget, "wall_s": time.perf_counter() - t0, "result": data,
            "stderr_tail": err}


def _line(name: str, part: dict[str, Any]) -> str:
    r = part["result"]
    ok = r.get("ok")
    verdict = "pass" if ok else ("FAIL" if ok is False else "-")
    if name == "grads" and r.get("rows"):
        worst = max(r["rows"], key=lambda x: x["max_rel_err"] / x["tolerance"])
        detail = f"worst {worst['layer']} {worst['dtype']} drop {worst['drop_rate']}: {worst['max_rel_err']:.2e}"
    elif name == "speedup" and r.get("rows"):
        detail = "; ".join(
            f"{x['model']}{' amp' if x['amp_bf16'] else ''}{' cl' if x['channels_last'] else ''} "
            + (f"0.8: {x['speedup_0.8']:.2f}x/{x['time_ideal_0.8']:.2f}x" if "speedup_0.8" in x else "error")
            for x in r["rows"])
    elif name == "nvml" and "rel_diff" in r:
        period = r.get("counter_update_period_s")
        detail = (f"update {period * 1e3:.1f} ms, " if period else "") + \
                  f"idle {r['idle_power_w']:.0f} W, counter vs sampled {r['rel_diff'] * 100:.2f}%"
    elif name == "compare" and "single" in r:
        detail = " ".join(f"{k}: exit {r[k].get('exit')} {','.join(r[k].get('provenance', []))}"
                          for k in ("single", "torchrun") if k in r)
    elif name == "ddpm" and "exit" in r:
        detail = f"exit {r['exit']} {','.join(r.get('provenance', []))} {r['wall_s']:.0f} s"
    else:
        detail = ""
    return f"{name:<8} {part['status']:<18} {verdict:<5} {part['wall_s']:6.1f}/{part['budget_s']:<4} s  {detail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and the parts' files")
    ap.add_argument("--dry-run", action="store_true", help="the same plan on CPU with fakes, in seconds")
    ap.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)  # one part, in its subprocess
    ap.add_argument("--only", default=None, help="comma-separated parts to run (default all)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part:
        _write_part(out, args.part, PARTS[args.part](out, args.dry_run))
        return 0
    names = [n for n in PARTS if args.only is None or n in args.only.split(",")]
    parts = {n: _run_part(n, out, args.dry_run) for n in names}
    summary = {"dry_run": args.dry_run, "provenance": "fake (dry run: CPU, fake pynvml)" if args.dry_run else
               "measured", "parts": parts}
    write_json_atomic(out / "gpu_check.json", summary)
    header = f"{'part':<8} {'status':<18} {'ok':<5} {'wall/budget':>12}  detail"
    lines = [header] + [_line(n, p) for n, p in parts.items()]
    title = "gpu_check (DRY RUN: fake figures)" if args.dry_run else "gpu_check"
    write_text_atomic(out / "gpu_check.md", f"# {title}\n\n```\n" + "\n".join(lines) + "\n```\n")
    print(title)
    print("\n".join(lines))
    return 0 if all(p["status"] == "done" and p["result"].get("ok") is not False for p in parts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
