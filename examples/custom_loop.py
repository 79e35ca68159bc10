"""Use ssProp, the FLOP counter and the energy meter inside your own training loop.

Run: python examples/custom_loop.py   (a few seconds on a CPU; embedded digits data, no network)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssprop_energy import DropSchedule, get_model, load_dataset, sparsify
from ssprop_energy.data import BatchLoader
from ssprop_energy.energy import open_meter
from ssprop_energy.energy.carbon import co2_g, resolve_intensity
from ssprop_energy.flops import FlopMeter

EPOCHS = 2

data = load_dataset("digits", image_size=8)
model = get_model("cnn", num_classes=data.num_classes, in_channels=data.in_channels, image_size=data.image_size)
sparsify(model, drop_rate=0.8)
schedule = DropSchedule.from_name("bar", drop_rate=0.8, total_epochs=EPOCHS)
flops = FlopMeter(model, (data.in_channels, data.image_size, data.image_size), data.num_classes)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
loader = BatchLoader(data.train, 64, shuffle=True, seed=0, mean=data.mean, std=data.std)

meter = open_meter("auto")  # NVML, else RAPL, else a labelled estimate
meter.start()
flops_bwd = 0.0
for epoch in range(EPOCHS):
    drop = schedule.step(model, epoch)
    loader.set_epoch(epoch)
    for x, y in loader:
        with meter.window("step"):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        flops_bwd += flops.per_sample(drop).backward * len(y)
report = meter.stop()

intensity = resolve_intensity()
print(f"backward FLOPs (counted): {flops_bwd:.3e}")
for c in report.components:
    print(f"{c.component:>8}: {c.energy_j:8.1f} J  ({c.source}, {c.device})")
print(f"total: {report.energy_j:.1f} J ({report.source}); "
      f"{co2_g(report.energy_j, intensity.g_per_kwh):.4f} g CO2e at {intensity.g_per_kwh:.0f} g/kWh ({intensity.region})")
