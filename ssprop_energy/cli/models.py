"""``ssprop-energy models``: the registered models with their parameter counts."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``models`` subcommand to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "models",
        help="list the models with their parameter counts",
        description="List the registered models, what they are, and how many parameters each has for the "
        "given number of classes, input channels and image size (default: CIFAR-10 shapes).",
    )
    parser.add_argument("--num-classes", type=int, default=10, help="output classes (default 10)")
    parser.add_argument("--in-channels", type=int, default=3, help="input channels (default 3)")
    parser.add_argument("--image-size", type=int, default=None, help="input size in pixels (default: each model's, 32)")
    parser.add_argument("--json", action="store_true", help="print a JSON list")
    parser.set_defaults(func=run)
    return parser


def collect(num_classes: int, in_channels: int, image_size: int | None) -> list[dict[str, Any]]:
    """One dict per model: name, description, task, image_size, parameters (None, with ``unavailable`` saying
    why, for a model that cannot be built at these shapes: the UNet needs a size divisible by 4)."""
    from ssprop_energy.errors import ConfigError
    from ssprop_energy.models import count_parameters, get_model, list_models

    rows = []
    for info in list_models():
        size = info.default_image_size if image_size is None else image_size
        row: dict[str, Any] = {
            "name": info.name,
            "description": info.description,
            "task": info.task,
            "image_size": size,
            "parameters": None,
            "default_layers": list(info.default_layers),
        }
        try:
            model = get_model(info.name, num_classes=num_classes, in_channels=in_channels, image_size=size)
            row["parameters"] = count_parameters(model)
        except ConfigError as exc:  # one model refusing these shapes must not hide the others
            row["unavailable"] = str(exc)
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> int:
    """Run the subcommand from parsed flags; returns the exit code."""
    rows = collect(args.num_classes, args.in_channels, args.image_size)
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return 0
    out = sys.stdout
    out.write(f"models for {args.num_classes} classes, {args.in_channels} input channel(s):\n")
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        params = f"{r['parameters']:>12,d} params" if r["parameters"] is not None else f"{'n/a':>12} params"
        task = " [generation]" if r["task"] == "generation" else ""
        out.write(f"  {r['name']:<{width}}  {params} @ {r['image_size']}px  "
                  f"ssProp on {'+'.join(r['default_layers']):<11}  {r['description']}{task}\n")
        if r.get("unavailable"):
            out.write(f"  {'':<{width}}  not available at these shapes: {r['unavailable']}\n")
    out.write("also: torchvision:NAME, timm:NAME (pip install 'ssprop-energy[vision]'), path/to/file.py:factory, "
              "module.sub:factory; external models default to ssProp on conv+linear when they have both\n")
    return 0
