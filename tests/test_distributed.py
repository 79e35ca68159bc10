"""Distributed pieces that need no second process: sharding, the sharded loader, per-rank FLOPs, the comm
timer, the per-rank meter choice, the merge of rank records, the launcher's argv, the error messages."""

from __future__ import annotations

import pytest
import torch

from ssprop_energy.data import BatchLoader
from ssprop_energy.data.base import TensorSplit
from ssprop_energy.distributed.context import DistContext, decide_on_main, from_env
from ssprop_energy.distributed.ddp import CommTimer, rank_meter_choice
from ssprop_energy.distributed.launch import strip_flag
from ssprop_energy.distributed.merge import label_components, merge_runs
from ssprop_energy.distributed.sharding import (
    global_batch_sizes,
    local_batch_sizes,
    shard_slice,
    validate_sharding,
)
from ssprop_energy.energy.select import MeterChoice
from ssprop_energy.errors import ConfigError
from ssprop_energy.records import ArmRun, EnergyComponent, EpochRecord, add_components, energy_by, total_energy


@pytest.mark.parametrize("size,world", [(32, 2), (7, 3), (5, 5), (64, 4), (10, 4)])
def test_shards_are_contiguous_near_equal_and_cover_the_batch(size: int, world: int) -> None:
    parts = [shard_slice(size, world, r) for r in range(world)]
    assert parts[0][0] == 0 and parts[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))  # contiguous, in rank order
    lengths = [b - a for a, b in parts]
    assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)


def test_local_batch_sizes_sum_to_the_global_batches() -> None:
    # 103 samples, global batch 32: 32, 32, 32, 7; over 3 ranks the last batch splits 3, 2, 2
    assert global_batch_sizes(103, 32) == [32, 32, 32, 7]
    per_rank = [local_batch_sizes(103, 32, 3, r) for r in range(3)]
    assert per_rank[0] == [11, 11, 11, 3] and per_rank[1] == [11, 11, 11, 2] and per_rank[2] == [10, 10, 10, 2]
    assert [sum(col) for col in zip(*per_rank)] == [32, 32, 32, 7]


def test_sharding_refuses_a_batch_the_ranks_cannot_split() -> None:
    validate_sharding(128, 32, 1)
    validate_sharding(128, 32, 2)
    validate_sharding(103, 32, 2)  # last batch of 7 splits 4 + 3
    with pytest.raises(ConfigError, match="multiple of the 3 processes") as exc:
        validate_sharding(128, 32, 3)
    assert exc.value.field == "batch_size"
    with pytest.raises(ConfigError, match="last batch of each epoch holds 1 of 129"):
        validate_sharding(129, 32, 2)


def _split(n: int) -> TensorSplit:
    images = torch.arange(n, dtype=torch.int64).remainder(256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2)
    return TensorSplit(images.contiguous(), torch.arange(n, dtype=torch.int64))


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_loader_union_is_the_single_process_epoch(world: int) -> None:
    split = _split(100)
    single = BatchLoader(split, 24, seed=5)
    ranks = [BatchLoader(split, 24, seed=5, rank=r, world_size=world) for r in range(world)]
    for epoch in (0, 3):
        single.set_epoch(epoch)
        for loader in ranks:
            loader.set_epoch(epoch)
        streams = [iter(loader) for loader in ranks]
        for _, want in single:
            parts = []
            for loader, stream in zip(ranks, streams):
                _, y = next(stream)
                parts.append(y)
                assert loader.last_batch_samples == (len(y), len(want))
            # the ranks' parts, concatenated in rank order, are the single-process batch in its order
            assert torch.equal(torch.cat(parts), want)
        assert all(next(s, None) is None for s in streams)
    assert len(ranks[0]) == len(single) == 5


def test_sharded_loader_rejects_a_bad_rank() -> None:
    with pytest.raises(ConfigError, match="rank must be in"):
        BatchLoader(_split(8), 4, rank=2, world_size=2)


def test_rank_flops_sum_to_the_single_process_count() -> None:
    from ssprop_energy.flops import FlopMeter
    from ssprop_energy.models import get_model
    from ssprop_energy.sparse import DropSchedule, sparsify

    model = sparsify(get_model("cnn", num_classes=4, in_channels=1, image_size=8), drop_rate=0.0)
    meter = FlopMeter(model, (1, 8, 8), 4)
    # by iteration: the drop rate changes batch by batch, so a rank's uneven last part must be weighted right
    schedule = DropSchedule.from_name("bar", drop_rate=0.8, total_epochs=2, by="iteration", period=2)
    n, batch = 103, 32
    single = meter.for_schedule(schedule, 2, n, batch)
    ranks = [meter.for_schedule(schedule, 2, n, batch, batch_sizes=local_batch_sizes(n, batch, 3, r))
             for r in range(3)]
    for e in range(2):
        for metric in ("flops_forward", "flops_backward", "flops_backward_conv"):
            assert sum(getattr(r.epochs[e], metric) for r in ranks) == pytest.approx(
                getattr(single.epochs[e], metric), rel=1e-12)
        assert sum(r.epochs[e].samples for r in ranks) == single.epochs[e].samples == n
    with pytest.raises(ConfigError, match="batch_sizes"):
        meter.for_schedule(schedule, 2, n, batch, batch_sizes=[1, 2])


def test_comm_timer_counts_overlapping_all_reduces_once() -> None:
    timer = CommTimer(world_size=2)
    timer._spans = [(0.0, 1.0), (0.5, 1.5), (3.0, 3.25), (1.5, 2.0)]
    assert timer.take() == pytest.approx(2.25)  # [0, 2] + [3, 3.25]
    assert timer.take() == 0.0


def test_rank_meter_choice_counts_node_wide_sources_once() -> None:
    choice = MeterChoice("auto", ("nvml", "rapl"), {})
    node_main = DistContext(rank=2, world_size=4, local_rank=0, local_world_size=2, node=1, backend="gloo")
    other = DistContext(rank=3, world_size=4, local_rank=1, local_world_size=2, node=1, backend="gloo")
    assert rank_meter_choice(choice, node_main) == choice
    mine = rank_meter_choice(choice, other)
    assert mine.sources == ("nvml",) and "local rank 0" in mine.unavailable["rapl"]
    est = MeterChoice("estimate", ("estimate",), {}, {"cpu_model": "x", "cpu_tdp_w": 100.0, "cpu_tdp_from": "t",
                                                      "ram_power_w": 10.0, "ram_power_from": "r"})
    mine = rank_meter_choice(est, other)
    # the rank keeps the estimate of its own process's CPU; the node's RAM is charged once, on local rank 0
    assert mine.sources == ("estimate",) and mine.estimate["ram_power_w"] == 0.0
    assert mine.estimate["cpu_tdp_w"] == 100.0
    assert rank_meter_choice(est, DistContext()) is est


def _run(rank: int, flops: float, cpu_j: float, ram_j: float, gpu_j: float | None = None) -> ArmRun:
    comps = [EnergyComponent("cpu", cpu_j, "estimated", "CPU"), EnergyComponent("ram", ram_j, "estimated", "RAM")]
    if gpu_j is not None:
        comps.append(EnergyComponent("gpu:0", gpu_j, "counter", "GPU"))
    epochs = [EpochRecord(epoch=e, drop_rate=0.0, train_loss=1.0, train_accuracy=0.5, val_loss=1.0,
                          val_accuracy=0.5, flops_forward=flops * (e + 1), flops_backward=2 * flops * (e + 1),
                          energy_j=cpu_j / 2, wall_s=1.0 + rank) for e in range(2)]
    return ArmRun(arm="dense", seed=0, repeat=0, test_accuracy=0.75, test_loss=0.5, best_epoch=1,
                  best_val_accuracy=0.5, wall_s=2.0 + rank, eval_wall_s=0.1, flops_forward=3 * flops,
                  flops_backward=6 * flops, flops_backward_conv=4 * flops, average_drop_rate=0.0,
                  energy_components=comps, epochs=epochs,
                  phases={"train": {"energy_j": cpu_j, "wall_s": 2.0 + rank, "count": 2}},
                  trace=[[0.5, "cpu", 3.0, "estimated", "train dense"]])


def _info(rank: int, local_rank: int, node: int, comm_s: float, train_s: float) -> dict:
    return {"rank": rank, "local_rank": local_rank, "node": node, "hostname": f"h{node}", "comm_wall_s": comm_s,
            "train_wall_s": train_s}


def test_merge_sums_work_and_labels_energy_by_rank_and_node() -> None:
    # two nodes of two ranks; ranks 1 and 3 carry the zero RAM estimate that local rank 0 charges for the node
    runs = [_run(0, 10.0, 4.0, 8.0, gpu_j=100.0), _run(1, 11.0, 5.0, 0.0, gpu_j=110.0),
            _run(2, 12.0, 6.0, 9.0, gpu_j=120.0), _run(3, 13.0, 7.0, 0.0, gpu_j=130.0)]
    infos = [_info(0, 0, 0, 0.5, 2.0), _info(1, 1, 0, 1.0, 2.0), _info(2, 0, 1, 0.0, 2.0), _info(3, 1, 1, 0.5, 2.0)]
    merged = merge_runs(runs, infos, nodes=2)
    assert merged.world_size == 4 and merged.nodes == 2
    assert merged.flops_forward == 3 * 46.0 and merged.flops_backward == 6 * 46.0
    assert merged.flops_backward_conv == 4 * 46.0
    assert [e.flops_forward for e in merged.epochs] == [46.0, 92.0]
    assert [e.energy_j for e in merged.epochs] == [11.0, 11.0]  # (4 + 5 + 6 + 7) / 2
    assert [e.wall_s for e in merged.epochs] == [1.0, 1.0]  # rank 0's clock
    assert merged.phases["train"]["energy_j"] == 22.0 and merged.phases["train"]["wall_s"] == 2.0
    assert merged.test_accuracy == 0.75
    # every joule once: 4 CPUs + 2 node RAMs + 4 GPUs
    assert merged.energy_j == pytest.approx(22.0 + 17.0 + 460.0)
    assert merged.energy_source == "mixed"
    labels = {(c.component, c.rank, c.node) for c in merged.energy_components}
    assert labels == {("cpu", 0, 0), ("cpu", 1, 0), ("cpu", 2, 1), ("cpu", 3, 1), ("ram", None, 0),
                      ("ram", None, 1), ("gpu:0", 0, 0), ("gpu:0", 1, 0), ("gpu:0", 2, 1), ("gpu:0", 3, 1)}
    per_node = energy_by(merged.energy_components, "node")
    assert per_node[0] == (pytest.approx(4 + 5 + 8 + 100 + 110), "mixed")
    assert per_node[1][0] == pytest.approx(6 + 7 + 9 + 120 + 130)
    per_rank = energy_by(merged.energy_components, "rank")
    assert per_rank[1] == (pytest.approx(115.0), "mixed") and per_rank[None][0] == pytest.approx(17.0)
    assert [r["energy_j"] for r in merged.ranks] == pytest.approx([104.0, 115.0, 126.0, 137.0])
    assert merged.comm_share == pytest.approx((0.25 + 0.5 + 0.0 + 0.25) / 4)
    assert {row[1] for row in merged.trace} == {"r0:cpu", "r1:cpu", "r2:cpu", "r3:cpu"}
    # the merged record round-trips through JSON with its labels
    again = ArmRun.from_dict(merged.to_dict())
    assert again.energy_components == merged.energy_components and again.world_size == 4


def test_labels_keep_a_non_zero_node_component_of_another_rank() -> None:
    # a RAPL counter read by a non-zero local rank is not silently dropped (only the zero RAM placeholder is)
    comps = [EnergyComponent("dram:package-0", 3.0, "counter"), EnergyComponent("ram", 0.0, "estimated")]
    out = label_components(comps, _info(1, 1, 0, 0.0, 1.0))
    assert [(c.component, c.rank, c.node) for c in out] == [("dram:package-0", None, 0)]


def test_components_with_labels_add_apart() -> None:
    a = EnergyComponent("cpu", 1.0, "estimated", rank=0, node=0)
    b = EnergyComponent("cpu", 2.0, "estimated", rank=1, node=0)
    summed = add_components([a, b], [a])
    assert sorted((c.rank, c.energy_j) for c in summed) == [(0, 2.0), (1, 2.0)]
    assert total_energy(summed) == (4.0, "estimated")


def test_from_env_reads_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert from_env() is None
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ctx = from_env()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.node, ctx.is_main, ctx.is_node_main) == (3, 4, 1, 1, False, False)
    assert not ctx.distributed  # until the process group is up
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ConfigError, match="RANK='x'"):
        from_env()


def test_single_process_collectives_are_identities() -> None:
    single = DistContext()
    t = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert single.all_sum(t) is t and single.any(True) and not single.any(False)
    assert single.gather({"a": 1}) == [{"a": 1}] and single.broadcast(5) == 5
    assert decide_on_main(single, lambda: 7) == 7
    with pytest.raises(ConfigError, match="no"):
        decide_on_main(single, lambda: (_ for _ in ()).throw(ConfigError("no")))


@pytest.mark.parametrize("argv,want", [
    (["compare", "--nproc-per-node", "2", "--epochs", "1"], ["compare", "--epochs", "1"]),
    (["-v", "compare", "--nproc-per-node=2"], ["-v", "compare"]),
    (["compare", "--out", "x"], ["compare", "--out", "x"]),
])
def test_launcher_argv_drops_its_own_flag(argv: list[str], want: list[str]) -> None:
    assert strip_flag(argv, "--nproc-per-node") == want


def test_nproc_per_node_errors_are_one_line(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                            tmp_path) -> None:
    from ssprop_energy.cli import main

    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert main(["compare", "--nproc-per-node", "0", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip() == ("ssprop-energy compare: error: --nproc-per-node must be a positive "
                                               "integer, got 0")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["compare", "--nproc-per-node", "2", "--out", str(tmp_path / "r")]) == 2
    assert "already a worker of torchrun" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()

