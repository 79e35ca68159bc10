"""``report --format model-card``: a Hugging Face card whose metadata carries the records' CO2 (no network)."""

import pytest
import report_fixtures as fx

pytest.importorskip("huggingface_hub")
from huggingface_hub import ModelCard
from huggingface_hub.repocard import metadata_load

from ssprop_energy.cli import main
from ssprop_energy.report.load import load_run


def test_model_card_metadata(tmp_path):
    run_dir = tmp_path / "run"
    fx.compare_run(run_dir)
    assert main(["report", str(run_dir), "--format", "model-card"]) == 0
    path = run_dir / "README.md"
    meta = metadata_load(path)
    arm = load_run(run_dir).arms["ssprop"]  # the only sparse arm of the fixture
    assert meta["co2_eq_emissions"]["emissions"] == arm.co2_g
    assert "counter" in meta["co2_eq_emissions"]["source"]
    card = ModelCard.load(path)
    assert card.data.co2_eq_emissions["emissions"] == arm.co2_g
    assert "Training energy by arm" in card.text


def test_model_card_refuses_several_runs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    fx.compare_run(a)
    fx.compare_run(b)
    assert main(["report", str(a), str(b), "--format", "model-card", "-o", str(tmp_path / "c.md")]) == 2
