"""The report as a Hugging Face model card (``README.md`` with YAML metadata) for one run.

The metadata follows the Hub's model-card fields: ``co2_eq_emissions`` (``emissions`` in grams CO2e, as the
Hub defines it, with ``source``, ``training_type`` and ``hardware_used``), ``tags`` and ``library_name``.
The card reports the sparse arm with the most backward FLOPs saved when there is one, else the baseline.
Every number is read from the records; the body is the Markdown report's arm table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ssprop_energy.errors import ConfigError
from ssprop_energy.report import text as T
from ssprop_energy.report.load import Run
from ssprop_energy.report.savings import comparisons


def _chosen_arm(run: Run) -> str:
    comps = comparisons(run)
    if comps:
        return max(comps, key=lambda c: c.flops_backward.saved_frac).arm
    return run.summary.baseline if run.summary.baseline in run.arms else next(iter(run.arms))


def card_metadata(run: Run) -> dict[str, Any]:
    """The YAML metadata of the card (plain types, safe to dump)."""
    if not run.arms:
        raise ConfigError(f"{run.path}: no arm recorded, nothing to put on a model card")
    name = _chosen_arm(run)
    arm = run.arms[name]
    hardware = "; ".join(f"{comp} ({dev})" for comp, dev, _src in T.hardware({name: arm})) or "unknown"
    return {
        "library_name": "pytorch",
        "tags": ["ssprop", "sparse-backprop", "ssprop-energy"],
        "co2_eq_emissions": {
            "emissions": float(arm.co2_g),
            "source": f"ssprop-energy ({arm.energy_source} energy)",
            "training_type": "pre-training",
            "hardware_used": hardware,
        },
    }


def render_model_card(runs: Sequence[Run]) -> str:
    """The card for exactly one run: YAML front matter, then the Markdown arm table and provenance."""
    if len(runs) != 1:
        raise ConfigError(f"a model card describes one run; got {len(runs)}")
    from ssprop_energy.report.markdown import _arms

    run = runs[0]
    meta = card_metadata(run)
    arm = _chosen_arm(run)
    body = [f"# {run.title} ({arm})", "",
            (f"Trained with ssProp ({run.arms[arm].schedule}, drop rate {run.arms[arm].drop_rate:g}); "
             f"measured with ssprop-energy. Emissions: {T.fmt_co2(run.arms[arm].co2_g)}, energy "
             f"{T.fmt_energy(run.arms[arm].energy_j)} ({run.arms[arm].energy_source})."), "",
            "## Training energy by arm", "", _arms(run), "", T.provenance_line(run), ""]
    try:
        from huggingface_hub import ModelCardData
    except ImportError:
        raise ConfigError("a model card needs huggingface_hub: `pip install ssprop-energy[hub]`") from None
    return "---\n" + ModelCardData(**meta).to_yaml() + "\n---\n\n" + "\n".join(body)
