"""``ssprop-energy env``: what this machine can measure, and the carbon intensity a run would use."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``env`` subcommand to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "env",
        help="show the energy sources available here and the carbon intensity that would be used",
        description="Show which energy sources work on this machine (and why the others do not), the GPU "
        "names, the CPU model, and the carbon intensity a run would use.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--country", default=None, help="ISO 3166-1 alpha-3 country code for the carbon intensity")
    parser.add_argument(
        "--carbon-intensity", type=float, default=None, metavar="G_PER_KWH", help="use this intensity (g CO2e/kWh)"
    )
    parser.add_argument("--sysfs-root", default=None, help="filesystem root holding sys/class/powercap (default /)")
    parser.add_argument("--countries", action="store_true", help="list the country codes with carbon data and exit")
    parser.add_argument(
        "--check", action="store_true",
        help="diagnose every energy source and print the fix for each problem; exit 0 when --meter works, 1 if not",
    )
    parser.add_argument("--meter", default="auto", choices=("auto", "nvml", "rapl", "estimate"),
                        help="the meter --check decides the exit code by (default auto)")
    parser.set_defaults(func=run)
    return parser


def collect(country: str | None, override_g_per_kwh: float | None, sysfs_root: str | None) -> dict[str, Any]:
    """Everything ``env`` shows, as a JSON-ready dict."""
    from dataclasses import asdict

    from ssprop_energy.energy import available_sources, resolve_intensity
    from ssprop_energy.energy.estimate import cpu_model_name

    carbon = resolve_intensity(country=country, override_g_per_kwh=override_g_per_kwh)
    sources = available_sources(sysfs_root=sysfs_root)
    nvml = sources["nvml"]["description"] or {}
    auto = [k for k in ("nvml", "rapl") if sources[k]["available"]]
    if not sources["rapl"]["available"]:
        auto.append("estimate")
    return {
        "sources": sources,
        "auto_uses": auto,
        "gpus": [g["name"] for g in nvml.get("gpus", [])],
        "cpu_model": cpu_model_name(),
        "carbon_intensity": asdict(carbon),
    }


def _print_text(info: dict[str, Any]) -> None:
    out = sys.stdout
    out.write("energy sources:\n")
    for kind, entry in info["sources"].items():
        state = "available" if entry["available"] else f"unavailable: {entry['reason']}"
        out.write(f"  {kind:<9} {state}\n")
        desc = entry["description"] or {}
        if kind == "estimate" and desc:
            out.write(f"            CPU TDP {desc['cpu_tdp_w']:g} W ({desc['cpu_tdp_from']}), "
                      f"RAM {desc['ram_power_w']:g} W ({desc['ram_power_from']})\n")
    out.write(f"--meter auto uses: {' + '.join(info['auto_uses'])}\n")
    out.write(f"GPUs: {', '.join(info['gpus']) if info['gpus'] else 'none visible to NVML'}\n")
    out.write(f"CPU: {info['cpu_model'] or 'unknown'}\n")
    ci = info["carbon_intensity"]
    out.write(f"carbon intensity: {ci['g_per_kwh']:g} g CO2e/kWh for {ci['region']} ({ci['source']})\n")


def run(args: argparse.Namespace) -> int:
    """Run the subcommand from parsed flags; returns the exit code."""
    if args.countries:
        from ssprop_energy.energy.carbon import list_countries

        rows = list_countries()
        if args.json:
            sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        else:
            for row in rows:
                sys.stdout.write(f"{row['code']}  {row['g_per_kwh']:8.1f} g/kWh  {row['year']}  {row['name']}\n")
        return 0
    if args.check:
        return _check(args)
    info = collect(args.country, args.carbon_intensity, args.sysfs_root)
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
    else:
        _print_text(info)
    return 0


_MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}


def _check(args: argparse.Namespace) -> int:
    from ssprop_energy.energy.doctor import diagnose

    report = diagnose(args.meter, args.sysfs_root)
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        out = sys.stdout
        for f in report["findings"]:
            out.write(f"[{_MARK[f['level']]}] {f['source']:<8} {f['problem']}\n")
            if f["fix"]:
                out.write(f"           fix: {f['fix']}\n")
        if report["meter_works"]:
            out.write(f"--meter {args.meter} works here: {' + '.join(report['meter_sources'])}\n")
        else:
            out.write(f"--meter {args.meter} does not work here: {report['meter_error']}\n")
    return 0 if report["meter_works"] else 1
