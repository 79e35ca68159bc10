"""FLOPs of a diffusion training step: count_step(step_fn=...) against hand counts on a tiny UNet-like net
(conv + time MLP + linear + bmm attention), the real ddpm-unet's time MLP and attention products against
their shapes, and ssProp's sparse backward on the UNet's convolutions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssprop_energy.errors import ConfigError
from ssprop_energy.flops import FlopMeter, count_step
from ssprop_energy.generation.diffusion import Diffusion
from ssprop_energy.models import get_model
from ssprop_energy.models.unet import timestep_embedding
from ssprop_energy.sparse import keep_count, sparsify


class TinyDenoiser(nn.Module):
    """time MLP (4 -> 8), conv(1 -> 8, 3x3, pad 1), token qkv linear (8 -> 24), two bmm attention products
    over the 36 positions of a 6x6 image, 1x1 output conv (8 -> 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.time = nn.Linear(4, 8)
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.qkv = nn.Linear(8, 24)
        self.out = nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.conv(x) + self.time(timestep_embedding(t, 4))[:, :, None, None]
        q, k, v = self.qkv(h.flatten(2).transpose(1, 2)).chunk(3, dim=-1)  # (B, 36, 8) each
        w = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)  # (B, 36, 36)
        h = h + torch.bmm(w, v).transpose(1, 2).reshape(h.shape)
        return self.out(h)


# Per sample, by hand. Forward MACs: time 4*8 = 32; conv 8 out x 36 positions x 9 taps = 2592;
# qkv 36 tokens x 8 x 24 = 6912; each bmm 36 x 36 x 8 = 10368; out conv 36 x 8 = 288.
TINY_FWD_MACS = 32 + 2592 + 6912 + 2 * 10368 + 288
# Backward: the time linear and the conv see inputs that need no gradient (the sinusoid, the noised image):
# grad_weight only; the qkv linear, both bmm operands and the output conv: two products each.
TINY_BWD_MACS = 32 + 2592 + 2 * 6912 + 2 * 2 * 10368 + 2 * 288


def _diffusion_step(timesteps: int = 10):
    diffusion = Diffusion(timesteps)
    return lambda model, x, gen: diffusion.training_loss(model, x, gen)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_step_fn_counts_a_diffusion_step_by_hand(batch_size):
    sf = count_step(TinyDenoiser(), (1, 6, 6), 1, batch_size=batch_size, step_fn=_diffusion_step())
    assert sf.forward == 2 * TINY_FWD_MACS
    assert sf.backward == 2 * TINY_BWD_MACS
    assert sf.ops["aten.bmm"] == {"forward": 2 * 2 * 10368, "backward": 2 * 4 * 10368}
    layers = {layer.name: layer for layer in sf.layers}
    assert layers["time"].forward == 2 * 32 and layers["time"].backward == 2 * 32
    # the loss ran under the counter: elementwise, so listed as uncounted rather than silently missing
    assert "aten.mse_loss" in sf.uncounted_ops and "aten.mse_loss_backward" in sf.uncounted_ops


def test_step_fn_and_loss_fn_are_exclusive():
    with pytest.raises(ConfigError, match="not both"):
        count_step(TinyDenoiser(), (1, 6, 6), 1, loss_fn=F.mse_loss, step_fn=_diffusion_step())


def test_unet_time_mlp_and_attention_are_counted():
    model = get_model("ddpm-unet", in_channels=1, image_size=8)
    sf = count_step(model, (1, 8, 8), 1, batch_size=2, step_fn=_diffusion_step())
    # time MLP 16->64->64, then one Linear(64, C_out) per residual block (17 blocks; their C_out add to 688)
    assert sf.ops["aten.addmm"]["forward"] == 2 * (16 * 64 + 64 * 64 + 64 * 688)
    # 5 attention blocks at 2x2 = 4 tokens of 64 channels in 8 heads: 2 products of 4 x 4 x 64 MACs each
    assert sf.ops["aten.bmm"]["forward"] == 2 * 5 * 2 * 4 * 4 * 64
    assert sf.ops["aten.bmm"]["backward"] == 2 * sf.ops["aten.bmm"]["forward"]
    names = {layer.name for layer in sf.layers}
    assert {"time_embed.0", "time_embed.2", "middle.1.qkv", "middle.1.proj_out", "middle.1"} <= names
    assert sf.forward == sum(layer.forward for layer in sf.layers)


def test_sparse_backward_of_the_unet_convs_scales_with_the_kept_channels():
    dense = get_model("ddpm-unet", in_channels=1, image_size=8)
    with torch.no_grad():  # with the zero init, the scores of several layers would all tie at zero
        for p in dense.parameters():
            p.normal_(0, 0.1)
    step = _diffusion_step()
    ref = {layer.name: layer for layer in count_step(dense, (1, 8, 8), 1, batch_size=2, step_fn=step).layers}
    sparse = sparsify(dense, drop_rate=0.75, layers=("conv",))
    sf = count_step(sparse, (1, 8, 8), 1, batch_size=2, step_fn=step)
    convs = {n: m for n, m in sparse.named_modules() if type(m).__name__ == "SSPropConv2d"}
    assert len(convs) == 51
    for layer in sf.layers:
        if layer.name in convs:
            c_out = convs[layer.name].out_channels
            assert layer.backward == ref[layer.name].backward * keep_count(0.75, c_out) / c_out, layer.name
        else:  # time MLP, attention products and projections, GroupNorm: untouched by ssProp
            assert layer.backward == ref[layer.name].backward, layer.name
        assert layer.forward == ref[layer.name].forward
    # StepFlops.backward_conv covers every convolution module: the sparse Conv2d and the dense attention Conv1d
    conv1d = [n for n, m in sparse.named_modules() if type(m) is nn.Conv1d]
    assert len(conv1d) == 10
    expected = sum(ref[n].backward * keep_count(0.75, m.out_channels) / m.out_channels for n, m in convs.items())
    expected += sum(ref[n].backward for n in conv1d)
    assert sf.backward_conv == pytest.approx(expected, rel=1e-12)


def test_flop_meter_passes_the_step_fn_through():
    model = sparsify(TinyDenoiser(), drop_rate=0.5, layers=("conv",))
    meter = FlopMeter(model, (1, 6, 6), 1, step_fn=_diffusion_step())
    assert meter.per_sample(0.0).forward == 2 * TINY_FWD_MACS
    assert meter.per_sample(0.0).backward == 2 * TINY_BWD_MACS
    # conv (8 channels) keeps 4: its grad_weight halves; the 1-channel output conv keeps its only channel
    assert meter.per_sample(0.5).backward == 2 * (TINY_BWD_MACS - 2592 // 2)
