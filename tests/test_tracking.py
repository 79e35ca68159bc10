"""TensorBoard and MLflow loggers, read back with tensorboard's EventAccumulator and MLflow's local file
store (``file:`` URI in tmp_path). Skipped, with the reason, when the ``tracking`` extra is not installed."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest

from ssprop_energy.energy.base import ComponentSpec
from ssprop_energy.errors import ConfigError
from ssprop_energy.records import EpochRecord
from ssprop_energy.tracking import open_loggers
from ssprop_energy.tracking.base import epoch_scalars, flat_params
from ssprop_energy.train.loop import EpochResult

INTENSITY = 400.0  # g CO2e per kWh
PUE = 1.5


def fake_trainer(source: str = "estimated", kind: str = "estimate") -> SimpleNamespace:
    specs = {"cpu": ComponentSpec("cpu", source, "test cpu", counter=False, power=True)}
    describe = lambda: {"sources": [{"kind": kind}]}  # noqa: E731 - EnergyMeter.describe()'s shape
    return SimpleNamespace(meter=SimpleNamespace(specs=specs, describe=describe))


def epoch(i: int, drop: float) -> EpochResult:
    rec = EpochRecord(epoch=i, drop_rate=drop, train_loss=2.0 - i, train_accuracy=0.5 + 0.1 * i, val_loss=1.5 - i,
                      val_accuracy=0.4 + 0.1 * i, flops_forward=1e9, flops_backward=2e9 * (1 - drop),
                      energy_j=3.6e6 * (i + 1), wall_s=10.0, lr=1e-3)
    return EpochResult(rec, {"cpu": rec.energy_j})


def test_epoch_scalars_carry_units_and_provenance():
    s = epoch_scalars(fake_trainer(), epoch(1, 0.8), INTENSITY, PUE)
    assert s.energy_source == "estimated"
    # 7.2e6 J = 2 kWh; x 400 g/kWh x PUE 1.5 = 1200 g
    assert s.values["energy_j_estimated"] == 7.2e6
    assert s.values["co2_g_estimated"] == pytest.approx(1200.0)
    assert s.values["flops_backward_counted"] == pytest.approx(4e8)
    assert s.values["flops_total_counted"] == pytest.approx(1.4e9)
    assert s.values["drop_rate"] == 0.8
    # The fake meter is labelled fake whatever its specs say; no intensity, no CO2.
    f = epoch_scalars(fake_trainer("sampled", kind="fake"), epoch(0, 0.0), None)
    assert "energy_j_fake" in f.values and not any(k.startswith("co2") for k in f.values)


def test_flat_params():
    assert flat_params({"a": 1, "b": [0.8, 0.4], "c": None, "d": {"e": "x"}}) == {
        "a": 1, "b": "[0.8, 0.4]", "c": "none", "d.e": "x"}


def test_unknown_target_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="wandb"):
        open_loggers(["wandb"], tmp_path)




def drive(logger, trainer) -> None:
    logger.log_config({"model": "resnet18", "drop_rates": [0.8], "epochs": 2, "country": None})
    for arm, drop in (("dense", 0.0), ("ssprop", 0.8)):
        cb = logger.callback(arm, 0, 0)
        cb.on_train_start(trainer)
        for i in range(2):
            cb.on_epoch_end(trainer, epoch(i, drop if i % 2 else 0.0))
        cb.on_train_end(trainer)


def make_artifacts(run_dir):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "report.html").write_text("<html>report</html>")


def test_tensorboard_scalars_read_back(tmp_path):
    pytest.importorskip("tensorboard", reason="the 'tracking' extra (tensorboard) is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    make_artifacts(run_dir)
    [tb] = open_loggers(["tensorboard"], run_dir, carbon_g_per_kwh=INTENSITY, pue=PUE)
    drive(tb, fake_trainer())
    tb.on_run_end(run_dir)
    tb.close()
    ea = EventAccumulator(str(run_dir / "tensorboard" / "ssprop" / "s0r0"))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    assert {"train_loss", "val_accuracy", "drop_rate", "energy_j_estimated", "co2_g_estimated",
            "flops_backward_counted"} <= set(tags)
    drops = [(e.step, e.value) for e in ea.Scalars("drop_rate")]
    assert drops == [(0, 0.0), (1, pytest.approx(0.8))]
    co2 = [e.value for e in ea.Scalars("co2_g_estimated")]
    assert co2 == [pytest.approx(600.0), pytest.approx(1200.0)]
    root = EventAccumulator(str(run_dir / "tensorboard"))
    root.Reload()
    hp = root.PluginTagToContent("hparams")
    assert b"resnet18" in hp["_hparams_/session_start_info"] and b"drop_rates" in hp["_hparams_/session_start_info"]
    texts = root.Tensors("artifacts/text_summary")
    assert str((run_dir / "report.html").resolve()) in texts[0].tensor_proto.string_val[0].decode()


def test_mlflow_file_store_reads_back(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the 'tracking' extra (mlflow) is not installed")
    from mlflow.tracking import MlflowClient

    # MLflow 3 keeps the file store in maintenance mode behind this switch; the test reads the plain files.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file:{tmp_path / 'mlruns'}"
    from report_fixtures import compare_run

    run_dir = tmp_path / "20260101-resnet18-digits"
    summary = compare_run(run_dir, repeats=2)
    make_artifacts(run_dir)
    [ml] = open_loggers(["mlflow"], run_dir, mlflow_uri=uri, carbon_g_per_kwh=INTENSITY, pue=PUE)
    drive(ml, fake_trainer("counter", kind="rapl"))
    ml.on_run_end(run_dir)
    ml.close()
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("ssprop-energy")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.info.run_name == run_dir.name][0]
    assert parent.data.params["model"] == "resnet18"
    assert json.loads(parent.data.params["drop_rates"]) == [0.8]
    assert parent.data.params["country"] == "none"
    assert sorted(a.path for a in client.list_artifacts(parent.info.run_id)) == ["report.html", "summary.json"]
    for name, arm in summary.arms.items():
        assert parent.data.tags[f"energy_source.{name}"] == arm.energy_source
        assert parent.data.metrics[f"{name}.energy_j_{arm.energy_source}"] == pytest.approx(arm.energy_j)
        assert parent.data.metrics[f"{name}.co2_g_{arm.energy_source}"] == pytest.approx(arm.co2_g)
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"dense/s0r0", "ssprop/s0r0"}
    sparse = children["ssprop/s0r0"]
    assert sparse.data.tags["energy_source"] == "counter"
    hist = client.get_metric_history(sparse.info.run_id, "energy_j_counter")
    assert [(m.step, m.value) for m in hist] == [(0, 3.6e6), (1, 7.2e6)]
    drops = client.get_metric_history(sparse.info.run_id, "drop_rate")
    assert sorted((m.step, m.value) for m in drops) == [(0, 0.0), (1, 0.8)]
    assert sparse.data.params == {"arm": "ssprop", "seed": "0", "repeat": "0"}


def test_tensorboard_and_load_runs_on_a_real_compare(tmp_path):
    """The real trainer drives the callbacks (fake meter, synthetic data); the event files and load_runs
    give back the figures of the run's own records."""
    pytest.importorskip("tensorboard", reason="the 'tracking' extra (tensorboard) is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import ssprop_energy
    from ssprop_energy.experiment.config import ExperimentConfig
    from ssprop_energy.experiment.runner import Experiment, ExperimentHooks
    from ssprop_energy.tracking import TrackingConfig

    out = tmp_path / "run"
    cfg = ExperimentConfig(kind="compare", model="cnn", dataset="synthetic:1x8x8:4:64", epochs=2, batch_size=32,
                           meter="fake", sample_period_s=0.05, out=str(out), carbon_intensity=INTENSITY)
    cfg.validate()
    # the run opens its loggers itself (before it makes the run directory) and closes them at the end
    exp = Experiment(cfg, out, ExperimentHooks(tracking=TrackingConfig(("tensorboard",)), report=False))
    summary = exp.run()
    assert [logger.name for logger in exp.tracking.loggers] == ["tensorboard"]
    for name, arm in summary.arms.items():
        ea = EventAccumulator(str(out / "tensorboard" / name / "s0r0"))
        ea.Reload()
        energy = [e.value for e in ea.Scalars("energy_j_fake")]
        assert energy == [pytest.approx(e.energy_j, rel=1e-6) for e in arm.epochs]
        drops = [e.value for e in ea.Scalars("drop_rate")]
        assert drops == [pytest.approx(e.drop_rate) for e in arm.epochs]
        bwd = [e.value for e in ea.Scalars("flops_backward_counted")]
        assert bwd == [pytest.approx(e.flops_backward, rel=1e-6) for e in arm.epochs]
    frame = ssprop_energy.load_runs([out])
    assert len(frame) == 2
    assert frame.set_index("arm")["energy_j"].to_dict() == pytest.approx(
        {n: a.energy_j for n, a in summary.arms.items()})


def test_tracking_arguments_parse_and_open(tmp_path):
    import argparse

    from ssprop_energy.tracking import TrackingConfig, add_tracking_arguments, parse_targets, tracking_from_args

    parser = argparse.ArgumentParser()
    add_tracking_arguments(parser)
    args = parser.parse_args([])
    assert tracking_from_args(args) == TrackingConfig()
    assert TrackingConfig().open(tmp_path) == []
    args = parser.parse_args(["--log-to", "mlflow,TensorBoard", "--log-to", "mlflow", "--tensorboard-dir", "tb",
                              "--mlflow-uri", "file:/x", "--mlflow-experiment", "e"])
    assert tracking_from_args(args) == TrackingConfig(("mlflow", "tensorboard"), "tb", "file:/x", "e")
    with pytest.raises(ConfigError, match="unknown --log-to target"):
        TrackingConfig(targets=("wandb",))
    assert parse_targets("TensorBoard, mlflow,tensorboard") == ["tensorboard", "mlflow"]
    with pytest.raises(ConfigError, match="choose from tensorboard, mlflow"):
        parse_targets("tensorboard,wandb")



# ------------------------------------------------------------------------------------ through the CLI

TINY_CLI = ["--model", "cnn", "--dataset", "synthetic:1x8x8:4:64", "--epochs", "2", "--batch-size", "32",
            "--meter", "fake", "--sample-period", "0.05", "--carbon-intensity", str(INTENSITY), "--quiet"]


def test_compare_logs_to_tensorboard_and_mlflow_from_the_cli(tmp_path, monkeypatch, capsys):
    """`compare --log-to tensorboard --log-to mlflow`: per-epoch scalars equal the run's own records, the
    config is the hyperparameters, summary.json (complete) and report.html are the parent run's artifacts."""
    pytest.importorskip("tensorboard", reason="the 'tracking' extra (tensorboard) is not installed")
    pytest.importorskip("mlflow", reason="the 'tracking' extra (mlflow) is not installed")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ssprop_energy.cli import main
    from ssprop_energy.records import load_summary

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file:{tmp_path / 'mlruns'}"
    out = tmp_path / "run"
    rc = main(["compare", *TINY_CLI, "--out", str(out), "--log-to", "tensorboard", "--log-to", "mlflow",
               "--mlflow-uri", uri, "--mlflow-experiment", "byo"])
    assert rc == 0, capsys.readouterr().err
    assert f"tensorboard --logdir {out / 'tensorboard'}" in capsys.readouterr().out
    summary = load_summary(out)

    for name, arm in summary.arms.items():
        ea = EventAccumulator(str(out / "tensorboard" / name / "s0r0"))
        ea.Reload()
        assert [e.value for e in ea.Scalars("energy_j_fake")] == [pytest.approx(e.energy_j, rel=1e-6) for e in arm.epochs]
        assert [e.value for e in ea.Scalars("co2_g_fake")] == [
            pytest.approx(e.energy_j / 3.6e6 * INTENSITY, rel=1e-6) for e in arm.epochs]
        assert [e.value for e in ea.Scalars("drop_rate")] == [pytest.approx(e.drop_rate) for e in arm.epochs]
        assert [e.value for e in ea.Scalars("val_accuracy")] == [pytest.approx(e.val_accuracy) for e in arm.epochs]
        assert [e.value for e in ea.Scalars("flops_backward_counted")] == [
            pytest.approx(e.flops_backward, rel=1e-6) for e in arm.epochs]
    assert [e.drop_rate for e in summary.arms["ssprop"].epochs] == [0.0, 0.8]  # bar: both phases logged
    root = EventAccumulator(str(out / "tensorboard"))
    root.Reload()
    hp = root.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    assert b"layer_kinds" in hp and b"synthetic:1x8x8:4:64" in hp
    listed = root.Tensors("artifacts/text_summary")[0].tensor_proto.string_val[0].decode()
    assert str((out / "summary.json").resolve()) in listed and str((out / "report.html").resolve()) in listed

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("byo")
    runs = client.search_runs([exp.experiment_id])
    [parent] = [r for r in runs if r.info.run_name == out.name]
    assert parent.info.status == "FINISHED"
    params = parent.data.params
    assert params["model"] == "cnn" and params["layers"] == "none" and json.loads(params["layer_kinds"]) == ["conv"]
    assert sorted(a.path for a in client.list_artifacts(parent.info.run_id)) == ["report.html", "summary.json"]
    attached = client.download_artifacts(parent.info.run_id, "summary.json", str(tmp_path / "dl"))
    assert json.loads(open(attached).read())["status"] == "complete"  # attached after the summary was final
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"dense/s0r0", "ssprop/s0r0"}
    for name, arm in summary.arms.items():
        child = children[f"{name}/s0r0"]
        assert child.info.status == "FINISHED" and child.data.tags["energy_source"] == "fake"
        hist = sorted((m.step, m.value) for m in client.get_metric_history(child.info.run_id, "energy_j_fake"))
        assert hist == [(e.epoch, pytest.approx(e.energy_j, rel=1e-6)) for e in arm.epochs]


def test_sweep_logs_every_arm_to_tensorboard(tmp_path, capsys):
    pytest.importorskip("tensorboard", reason="the 'tracking' extra (tensorboard) is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ssprop_energy.cli import main

    out = tmp_path / "sweep"
    rc = main(["sweep", *TINY_CLI, "--epochs", "1", "--drop-rates", "0.4,0.8", "--schedules", "constant",
               "--out", str(out), "--log-to", "tensorboard"])
    assert rc == 0, capsys.readouterr().err
    for arm, drop in (("dense", 0.0), ("constant-d0.4", 0.4), ("constant-d0.8", 0.8)):
        ea = EventAccumulator(str(out / "tensorboard" / arm / "s0r0"))
        ea.Reload()
        assert [e.value for e in ea.Scalars("drop_rate")] == [pytest.approx(drop)]


@pytest.mark.parametrize(("flags", "needle"), [
    (["--log-to", "wandb"], "unknown --log-to target(s) wandb"),
    (["--log-to", "mlflow"], "pip install 'ssprop-energy[tracking]'"),
])
def test_a_bad_log_target_is_one_line_and_writes_nothing(flags, needle, tmp_path, monkeypatch, capsys):
    from ssprop_energy.cli import main

    for name in [m for m in list(sys.modules) if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    out = tmp_path / "run"
    assert main(["compare", *TINY_CLI, "--out", str(out), *flags]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and needle in err[0]
    assert not out.exists()


def test_mlflow_close_ends_open_arm_runs_with_the_runs_status(tmp_path, monkeypatch):
    """An interrupted run leaves arm-runs whose training never finished: they end KILLED, like the parent."""
    pytest.importorskip("mlflow", reason="the 'tracking' extra (mlflow) is not installed")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file:{tmp_path / 'mlruns'}"
    [ml] = open_loggers(["mlflow"], tmp_path / "run", mlflow_uri=uri)
    done, open_ = ml.callback("dense", 0, 0), ml.callback("ssprop", 0, 0)
    trainer = fake_trainer()
    for cb in (done, open_):
        cb.on_train_start(trainer)
        cb.on_epoch_end(trainer, epoch(0, 0.0))
    done.on_train_end(trainer)
    ml.close("interrupted")
    ml.close("complete")  # idempotent: the first status stays
    client = MlflowClient(tracking_uri=uri)
    status = {r.info.run_name: r.info.status for r in client.search_runs(
        [client.get_experiment_by_name("ssprop-energy").experiment_id])}
    assert status == {"run": "KILLED", "dense/s0r0": "FINISHED", "ssprop/s0r0": "KILLED"}
