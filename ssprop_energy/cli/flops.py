"""``ssprop-energy flops``: the executed FLOPs of one training step of a model, per sample and per layer."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ssprop_energy.errors import ConfigError


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``flops`` subcommand to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "flops",
        help="count the FLOPs of one training step (forward, backward, per layer), dense and with ssProp",
        description="Run one real training step under the dispatch-level FLOP counter and print the parameters, "
        "forward and backward FLOPs and MACs per sample, a per-layer table and the ops outside the convention. "
        "With --drop-rate > 0 the model's layers are made ssProp and the dense step is shown beside it.",
    )
    parser.add_argument(
        "--model", default="resnet18",
        help="a registered model (see 'models'), torchvision:NAME, timm:NAME, path/to/file.py:factory or "
        "module.sub:factory (default resnet18)",
    )
    parser.add_argument("--input-shape", default=None,
                        help="one sample's shape C,H,W (default 3,32,32; 1,32,32 for ddpm-unet, "
                        "the paper's MNIST size)")
    parser.add_argument("--num-classes", type=int, default=10, help="number of classes (default 10)")
    parser.add_argument("--drop-rate", type=float, default=0.0, help="ssProp drop rate in [0, 1) (default 0: dense)")
    parser.add_argument(
        "--layers", default=None,
        help="layer kinds made ssProp, comma-separated: conv, linear (default: the model's own, e.g. conv for "
        "ResNets, linear for mlp, conv,linear for vit and external models that have both)",
    )
    parser.add_argument("--batch-size", type=int, default=2, help="samples in the counted step (default 2)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)
    return parser


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"3,32,32"`` -> ``(3, 32, 32)``; anything else is a :class:`ConfigError`."""
    parts = [p.strip() for p in text.split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--input-shape must be C,H,W integers, got {text!r}") from None
    if len(shape) != 3 or any(s < 1 for s in shape):
        raise ConfigError(f"--input-shape must be three positive integers C,H,W, got {text!r}")
    if shape[1] != shape[2]:
        raise ConfigError(f"--input-shape: the models take square images, got H={shape[1]}, W={shape[2]}")
    return shape  # type: ignore[return-value]


def collect(
    model_name: str, shape: tuple[int, int, int], num_classes: int, drop_rate: float, layers: str | None,
    batch_size: int,
) -> dict[str, Any]:
    """Count the step (and the dense step when ``drop_rate > 0``); a JSON-ready dict."""
    from ssprop_energy.experiment.runner import task_of
    from ssprop_energy.flops import CONVENTION, CONVENTION_DESCRIPTION, FlopMeter
    from ssprop_energy.layer_coverage import layer_coverage
    from ssprop_energy.models import default_layers_for, get_model
    from ssprop_energy.sparse import sparsify
    from ssprop_energy.sparse.functional import validate_drop_rate

    drop_rate = validate_drop_rate(drop_rate)
    task = task_of(model_name)
    step_fn = None
    if task == "generation":
        from ssprop_energy.generation import Diffusion

        # The DDPM training step: noising at random timesteps, the UNet (time embedding included), noise MSE.
        step_fn = Diffusion().training_loss
    model = get_model(model_name, num_classes=num_classes, in_channels=shape[0], image_size=shape[1])
    if layers is None:
        kinds = default_layers_for(model_name, model)
    else:
        kinds = tuple(k.strip() for k in layers.split(",") if k.strip())
    if drop_rate > 0:
        sparsify(model, drop_rate=drop_rate, layers=kinds)
    meter = FlopMeter(model, shape, num_classes, batch_size=batch_size, step_fn=step_fn)
    step = meter.per_sample(drop_rate)
    dense = meter.per_sample(0.0) if drop_rate > 0 else None
    # Shares from the dense step: the sparse step's own backward would shrink the share it is judged by.
    coverage = layer_coverage(dense.layers).to_dict() if dense is not None else None
    result: dict[str, Any] = {
        "model": model_name,
        "task": task,
        "input_shape": list(shape),
        "num_classes": num_classes,
        "drop_rate": drop_rate,
        "ssprop_layers": list(kinds) if drop_rate > 0 else [],
        "params": step.params,
        "convention": CONVENTION,
        "convention_description": CONVENTION_DESCRIPTION,
        "step": step.to_dict(),
        "step_description": ("diffusion training step: noise the input at random timesteps, predict the noise "
                             "(UNet with time embedding and attention), MSE; every conv, linear and attention "
                             "product counted" if task == "generation" else "classification step: forward, "
                             "cross-entropy, backward"),
        "dense": dense.to_dict() if dense is not None else None,
        "sparsified_layers": coverage,
    }
    if dense is not None:
        result["saving"] = {
            key: 1.0 - getattr(step, key) / getattr(dense, key) if getattr(dense, key) else 0.0
            for key in ("forward", "backward", "backward_conv", "total")
        }
    return result


def _print_text(info: dict[str, Any]) -> None:
    import pandas as pd

    out = sys.stdout
    step, dense = info["step"], info["dense"]
    shape = "x".join(str(s) for s in info["input_shape"])
    sparse = f"ssProp on {'+'.join(info['ssprop_layers'])} at drop rate {info['drop_rate']:g}" if dense else "dense"
    what = "generation (DDPM noise predictor)" if info.get("task") == "generation" else f"{info['num_classes']} classes"
    out.write(f"model {info['model']}: {info['params']:,} parameters, input {shape}, {what}, {sparse}\n")
    out.write(f"step: {info['step_description']}\n")
    out.write(f"convention: {info['convention']} ({info['convention_description']})\n")
    coverage = info.get("sparsified_layers")
    if coverage:
        kinds = " + ".join(f"{c['layers']} {k} ({c['share']:.1%})" for k, c in coverage["kinds"].items())
        out.write(f"sparsified: {kinds or 'no layer'}: {coverage['share']:.1%} of the dense backward FLOPs\n")
        if coverage["warning"]:
            out.write(f"WARNING: {coverage['warning']}\n")
    out.write("\n")
    rows = {
        "forward": (step["forward"], dense and dense["forward"]),
        "backward": (step["backward"], dense and dense["backward"]),
        "  of which conv layers": (step["backward_conv"], dense and dense["backward_conv"]),
        "total": (step["total"], dense and dense["total"]),
    }
    table = pd.DataFrame(
        {
            "FLOPs": [v[0] for v in rows.values()],
            "MACs": [v[0] / 2 for v in rows.values()],
            **(
                {
                    "dense FLOPs": [v[1] for v in rows.values()],
                    "saving": [f"{1 - v[0] / v[1]:.1%}" if v[1] else "-" for v in rows.values()],
                }
                if dense
                else {}
            ),
        },
        index=list(rows),
    )
    out.write("per sample:\n")
    out.write(table.to_string(float_format=lambda v: f"{v:,.0f}") + "\n\n")
    layers = pd.DataFrame(step["layers"]).rename(columns={"forward": "FLOPs fwd", "backward": "FLOPs bwd"})
    if dense:
        dense_bwd = {row["name"]: row["backward"] for row in dense["layers"]}
        layers["dense bwd"] = [dense_bwd.get(n, 0.0) for n in layers["name"]]
    out.write("per layer, per sample:\n")
    out.write(layers.to_string(index=False, float_format=lambda v: f"{v:,.0f}") + "\n\n")
    uncounted = step["uncounted_ops"]
    out.write(f"ran but not counted ({len(uncounted)} ops, outside the convention): {', '.join(uncounted) or 'none'}\n")
    out.write(f"counted one step of {step['batch_size']} samples in {step['count_wall_s']:.2f} s\n")


def run(args: argparse.Namespace) -> int:
    """Run the subcommand from parsed flags; returns the exit code."""
    from ssprop_energy.experiment.runner import task_of

    default_shape = "1,32,32" if task_of(args.model) == "generation" else "3,32,32"
    shape = parse_shape(args.input_shape or default_shape)
    if args.num_classes < 1:
        raise ConfigError(f"--num-classes must be >= 1, got {args.num_classes}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    info = collect(args.model, shape, args.num_classes, args.drop_rate, args.layers, args.batch_size)
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
    else:
        _print_text(info)
    return 0
