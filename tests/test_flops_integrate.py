"""FlopMeter: one count per drop-rate configuration, restored rates, integration over schedules."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from ssprop_energy.errors import ConfigError
from ssprop_energy.flops import FlopMeter, count_step, integrate
from ssprop_energy.flops import formulas as fm
from ssprop_energy.sparse import DropSchedule, SSPropConv2d, sparsify


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 10, 3, padding=1), nn.ReLU(), nn.Conv2d(10, 10, 3, padding=1), nn.Flatten(), nn.Linear(10 * 16, 3)
    )


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    calls: list[Any] = []

    def spy(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        calls.append([m.drop_rate for m in model.modules() if isinstance(m, SSPropConv2d)])
        return count_step(model, *args, **kwargs)

    monkeypatch.setattr(integrate, "count_step", spy)
    return calls


def test_one_count_per_configuration_and_rates_restored(counted: list[Any]) -> None:
    model = sparsify(_net(), drop_rate=0.3)
    meter = FlopMeter(model, (3, 4, 4), 3)
    sparse = meter.per_sample(0.8)
    assert meter.per_sample(0.8) is sparse
    # 0.79 keeps floor(2.1) = 2 of 10 channels, like 0.8: the same executed ops, the same count
    assert meter.per_sample(0.79) is sparse
    dense = meter.per_sample(0.0)
    assert counted == [[0.8, 0.8], [0.0, 0.0]] and meter.counts == 2
    assert [m.drop_rate for m in model.modules() if isinstance(m, SSPropConv2d)] == [0.3, 0.3]
    assert meter.per_sample(None).drop_rates == {"0": 0.3, "2": 0.3}
    # second conv: 2 of 10 channels kept, both gradients; the first: grad_weight only
    conv = fm.conv2d_forward_macs(1, 10, 10, (4, 4), (3, 3))
    dropped_first = fm.conv2d_forward_macs(1, 3, 8, (4, 4), (3, 3))  # 8 channels' grad_weight
    assert dense.backward_conv - sparse.backward_conv == 2 * (2 * conv * 8 / 10 + dropped_first)
    assert sparse.forward == dense.forward


def test_dense_model_has_a_single_configuration(counted: list[Any]) -> None:
    meter = FlopMeter(_net(), (3, 4, 4), 3)
    assert meter.per_sample(0.0) is meter.per_sample(0.8)
    assert len(counted) == 1


def test_for_epoch_multiplies_the_per_sample_count() -> None:
    meter = FlopMeter(sparsify(_net(), drop_rate=0.5), (3, 4, 4), 3)
    step = meter.per_sample(0.5)
    assert meter.for_epoch(0.5, 1000) == (step.forward * 1000, step.backward * 1000)
    assert meter.for_epoch(0.5, 0) == (0.0, 0.0)
    with pytest.raises(ConfigError):
        meter.for_epoch(1.5, 10)
    with pytest.raises(ConfigError):
        meter.for_epoch(0.5, -1)


def test_interleaved_schedule_integrates_dense_and_sparse_epochs() -> None:
    meter = FlopMeter(sparsify(_net(), drop_rate=0.8), (3, 4, 4), 3)
    dense, sparse = meter.per_sample(0.0), meter.per_sample(0.8)
    sched = DropSchedule.from_name("bar", drop_rate=0.8, total_epochs=4)
    run = meter.for_schedule(sched, total_epochs=4, n_samples=10, batch_size=4)
    assert [e.mean_drop_rate for e in run.epochs] == [0.0, 0.8, 0.0, 0.8]
    assert [e.samples for e in run.epochs] == [10] * 4
    assert run.flops_backward == 20 * dense.backward + 20 * sparse.backward
    assert run.flops_forward == 40 * dense.forward
    assert run.flops_backward_conv == 20 * (dense.backward_conv + sparse.backward_conv)
    assert run.mean_drop_rate == pytest.approx(0.4)
    layers = {layer.name: layer for layer in run.layers}
    for d, s in zip(dense.layers, sparse.layers):
        assert layers[d.name].forward == 20 * (d.forward + s.forward)
        assert layers[d.name].backward == 20 * (d.backward + s.backward)
    assert sum(layer.backward for layer in run.layers) == run.flops_backward
    dense_run = meter.for_schedule(DropSchedule.from_name("constant", drop_rate=0.0, total_epochs=4), 4, 10, 4)
    saving = run.saving_vs(dense_run)
    assert saving["forward"] == 0.0
    assert saving["backward_conv"] == pytest.approx(0.5 * (1 - sparse.backward_conv / dense.backward_conv))
    assert saving["total"] == pytest.approx(1 - run.flops_total / dense_run.flops_total)


class _PerBatch:
    """Drop 0.8 on odd batches of every epoch."""

    def rate(self, epoch: int, iteration: int = 0) -> float:
        return 0.8 if iteration % 2 else 0.0


def test_per_batch_schedule_weights_the_partial_last_batch() -> None:
    meter = FlopMeter(sparsify(_net(), drop_rate=0.8), (3, 4, 4), 3)
    dense, sparse = meter.per_sample(0.0), meter.per_sample(0.8)
    # 11 samples in batches of 4: 4 (dense), 4 (sparse), 3 (dense)
    run = meter.for_schedule(_PerBatch(), total_epochs=1, n_samples=11, batch_size=4)
    assert run.epochs[0].flops_backward == 7 * dense.backward + 4 * sparse.backward
    assert run.epochs[0].mean_drop_rate == pytest.approx(0.8 * 4 / 11)
    dropped = meter.for_schedule(_PerBatch(), total_epochs=1, n_samples=11, batch_size=4, drop_last=True)
    assert dropped.epochs[0].samples == 8
    assert dropped.flops_backward == 4 * dense.backward + 4 * sparse.backward


def test_counting_leaves_training_results_unchanged() -> None:
    torch.manual_seed(0)
    model = sparsify(_net(), drop_rate=0.8)
    x, y = torch.randn(4, 3, 4, 4), torch.tensor([0, 1, 2, 0])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    nn.functional.cross_entropy(model(x), y).backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    FlopMeter(model, (3, 4, 4), 3).per_sample(0.4)
    nn.functional.cross_entropy(model(x), y).backward()
    for p, ref in zip(model.parameters(), reference):
        assert torch.equal(p.grad, ref)
