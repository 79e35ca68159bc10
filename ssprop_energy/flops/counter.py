"""Executed-FLOP counting of one training step at the dispatch level.

Glue around :class:`torch.utils.flop_counter.FlopCounterMode`: it sees every aten op that actually runs,
including the ops inside a custom ``autograd.Function``'s backward (the ssProp layers call
``aten.convolution_backward`` on the kept channels only), and it owns the shape formulas (2 FLOPs per
multiply-add of convolutions and matrix products). This module adds what the stock counter does not give:

- an explicit forward/backward phase switch (forward + loss, then ``loss.backward()``), so the split does not
  depend on how module tracking guesses the backward;
- exact per-layer attribution in both phases: forward ops go to the innermost module running; each autograd
  node created inside a module is labelled with that module, and node pre/post hooks tell which module's
  backward is executing (``ModuleTracker`` keeps a *set* of active modules, which over-attributes when
  residual branches interleave in the backward);
- the list of aten ops that ran without a formula and are not data movement (``uncounted_ops``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from ssprop_energy.errors import ConfigError
from ssprop_energy.flops.formulas import FLOPS_PER_MAC, conv_backward_macs
from ssprop_energy.sparse.layers import SSPropConv2d, SSPropLinear

logger = logging.getLogger(__name__)

CONVENTION = "conv_linear"
CONVENTION_DESCRIPTION = (
    "FLOPs = 2 x multiply-adds of convolutions and matrix products (torch.utils.flop_counter formulas, "
    "convolution backward corrected for groups); "
    "BatchNorm, activations, pooling, elementwise ops, the loss and the optimizer are not counted and are "
    "listed in uncounted_ops"
)
OUTSIDE_MODEL = "(outside model)"
ROOT = "(model)"

# Ops that only allocate, alias, move or copy data: zero arithmetic under any FLOP convention, so their
# absence from the formula table is not a gap worth reporting.
ZERO_COST_OPS = frozenset(
    f"aten.{name}"
    for name in (
        "_reshape_alias _to_copy _unsafe_view alias as_strided cat chunk clone contiguous copy_ detach "
        "empty empty_like empty_strided expand fill_ flatten full full_like gather index index_copy "
        "index_copy_ index_put index_put_ index_select lift_fresh lift_fresh_copy narrow new_empty "
        "new_empty_strided new_full new_ones new_zeros ones ones_like permute reshape scatter scatter_ "
        "select slice split split_with_sizes squeeze stack t transpose unbind unsqueeze view zero_ zeros "
        "zeros_like arange"
    ).split()
)


@dataclass(frozen=True)
class LayerFlops:
    """Counted FLOPs of one module: ops run by the module itself, not by its children.

    Per sample in :class:`StepFlops`; summed over the run in ``RunFlops.layers``.
    """

    name: str
    type: str
    forward: float
    backward: float


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step per sample, counted at dispatch (convention: :data:`CONVENTION`).

    Attributes:
        forward: FLOPs per sample of the forward pass and the loss.
        backward: FLOPs per sample of ``loss.backward()``.
        backward_conv: the part of ``backward`` executed by convolution layers (grad_input + grad_weight).
        forward_conv: the part of ``forward`` executed by convolution layers.
        layers: per-module counts, modules with a non-zero count only, in ``named_modules`` order.
        ops: ``{"aten.convolution": {"forward": f, "backward": b}}`` FLOPs per sample per op.
        uncounted_ops: aten ops that ran, have no formula and are not data movement.
        params: number of parameters of the model.
        batch_size: samples in the counted step (counts are divided by it).
        drop_rates: ssProp layer name -> drop rate in force during the count.
        count_wall_s: wall-clock seconds the counted step took (counting overhead included).
    """

    forward: float
    backward: float
    backward_conv: float
    forward_conv: float
    layers: list[LayerFlops]
    ops: dict[str, dict[str, float]]
    uncounted_ops: list[str]
    params: int
    batch_size: int
    input_shape: tuple[int, ...]
    num_classes: int
    drop_rates: dict[str, float] = field(default_factory=dict)
    count_wall_s: float = 0.0
    convention: str = CONVENTION
    source: str = "counted"

    @property
    def total(self) -> float:
        """Forward + backward FLOPs per sample."""
        return self.forward + self.backward

    @property
    def macs_forward(self) -> float:
        """Forward multiply-adds per sample."""
        return self.forward / FLOPS_PER_MAC

    @property
    def macs_backward(self) -> float:
        """Backward multiply-adds per sample."""
        return self.backward / FLOPS_PER_MAC

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict, totals and MACs included, with the convention spelled out."""
        data = asdict(self)
        data.update(
            total=self.total,
            macs_forward=self.macs_forward,
            macs_backward=self.macs_backward,
            convention_description=CONVENTION_DESCRIPTION,
        )
        return data


def _conv_backward_flop(
    grad_out_shape: list[int],
    x_shape: list[int],
    w_shape: list[int],
    _bias: Any,
    _stride: Any,
    _padding: Any,
    _dilation: Any,
    transposed: bool,
    _output_padding: Any,
    _groups: int,
    output_mask: list[bool],
    out_shape: Any = None,
    **kwargs: Any,
) -> int:
    # Replaces torch's stock formula, which counts grad_weight of a grouped convolution `groups` times over
    # (see formulas.conv_backward_macs); identical for groups == 1.
    return FLOPS_PER_MAC * conv_backward_macs(grad_out_shape, x_shape, w_shape, transposed, output_mask)


class _StepCounter(FlopCounterMode):
    """FlopCounterMode that books each executed op under (phase, module) and keeps ops without formula."""

    def __init__(self) -> None:
        if not callable(getattr(FlopCounterMode, "_count_flops", None)):
            # The override below is this class's only way in; without it every count would read 0.
            raise RuntimeError(
                f"torch {torch.__version__}: FlopCounterMode._count_flops is gone; update flops/counter.py"
            )
        super().__init__(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop})
        self.phase = "forward"
        self.forward_stack: list[str] = []
        self._tls = threading.local()
        self.by_layer: dict[str, dict[str, int]] = defaultdict(lambda: {"forward": 0, "backward": 0})
        self.by_op: dict[str, dict[str, int]] = defaultdict(lambda: {"forward": 0, "backward": 0})
        self.uncounted: set[str] = set()

    def backward_stack(self) -> list[str]:
        stack = getattr(self._tls, "stack", None)
        if stack is None:
            stack = self._tls.stack = []
        return stack

    def current_module(self) -> str:
        # Autograd may run the backward on a device thread; node hooks and ops of one node share a thread.
        stack = self.forward_stack if self.phase == "forward" else self.backward_stack()
        return stack[-1] if stack else OUTSIDE_MODEL

    def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
        # Called by FlopCounterMode's dispatch mode for every op it executes (ops with a registered
        # decomposition are split first, so composites are counted through their parts).
        op = str(func_packet)
        formula = self.flop_registry.get(func_packet)
        if formula is None:
            if op not in ZERO_COST_OPS:
                self.uncounted.add(op)
            return out
        flops = int(formula(*args, **kwargs, out_val=out))
        self.by_op[op][self.phase] += flops
        self.by_layer[self.current_module()][self.phase] += flops
        return out


class _Attribution:
    """Module hooks that keep the forward module stack and label autograd nodes with their module."""

    def __init__(self, counter: _StepCounter, model: nn.Module) -> None:
        self.counter = counter
        self.node_names: dict[Any, str] = {}
        self._input_nodes: list[set[Any]] = []
        self._handles: list[Any] = []
        for name, module in model.named_modules():
            label = name or ROOT
            self._handles.append(module.register_forward_pre_hook(self._pre(label), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post(label), with_kwargs=True))

    def _pre(self, label: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            self.counter.forward_stack.append(label)
            self._input_nodes.append(_grad_fns((args, kwargs)))

        return hook

    def _post(self, label: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            self.counter.forward_stack.pop()
            self._label(label, output, self._input_nodes.pop())

        return hook

    def _label(self, label: str, output: Any, stop: set[Any]) -> None:
        # Children finish (and label their nodes) before their parent, so what is still unlabelled between
        # this module's output and its inputs was created by this module's own code.
        pending = list(_grad_fns(output))
        while pending:
            node = pending.pop()
            if node is None or node in stop or node in self.node_names:
                continue
            if node.name().endswith("AccumulateGrad"):  # parameter leaves: no ops to attribute
                continue
            self.node_names[node] = label
            self._handles.append(node.register_prehook(self._enter(label)))
            self._handles.append(node.register_hook(self._leave))
            pending.extend(nxt for nxt, _ in node.next_functions)

    def _enter(self, label: str) -> Callable[[Any], None]:
        def hook(grad_outputs: Any) -> None:
            self.counter.backward_stack().append(label)

        return hook

    def _leave(self, grad_inputs: Any, grad_outputs: Any) -> None:
        self.counter.backward_stack().pop()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.node_names.clear()


def _grad_fns(obj: Any) -> set[Any]:
    leaves, _ = tree_flatten(obj)
    return {t.grad_fn for t in leaves if isinstance(t, torch.Tensor) and t.grad_fn is not None}


def _check_shape(input_shape: Sequence[int], num_classes: int, batch_size: int) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise ConfigError(f"input shape must be a sequence of integers, got {input_shape!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise ConfigError(f"input shape must be non-empty positive integers, got {shape}")
    if int(num_classes) < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    return shape


def ssprop_drop_rates(model: nn.Module) -> dict[str, float]:
    """Drop rate of every ssProp layer of ``model``, by module name, in ``named_modules`` order."""
    return {
        name: float(m.drop_rate)  # type: ignore[arg-type]
        for name, m in model.named_modules()
        if isinstance(m, (SSPropConv2d, SSPropLinear))
    }


def _cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(output, target)


# A whole training step's forward: (model, input batch, CPU generator) -> scalar loss. Everything it runs
# (noising, embeddings, the model call, the loss) is counted as the forward phase.
StepFn = Callable[[nn.Module, torch.Tensor, torch.Generator], torch.Tensor]


def count_step(
    model: nn.Module,
    input_shape: Sequence[int],
    num_classes: int,
    batch_size: int = 2,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    step_fn: StepFn | None = None,
) -> StepFlops:
    """Count the FLOPs of one real training step (forward, loss, backward) per sample.

    The step runs in training mode on random inputs and labels, on the model's device; no optimizer step is
    taken. Afterwards the model is as before: gradients, buffers (BatchNorm running statistics), train/eval
    mode and the global RNG state are restored.

    Args:
        model: the network, dense or with ssProp layers (their current drop rates are used).
        input_shape: one sample's shape without the batch dimension, e.g. ``(3, 32, 32)``.
        num_classes: number of classes; labels are drawn in ``[0, num_classes)`` (recorded only, with
            ``step_fn``).
        batch_size: samples in the counted step; every count is divided by it.
        loss_fn: ``loss_fn(output, labels) -> scalar``; cross-entropy by default.
        step_fn: instead of ``loss_fn(model(x), labels)``, the loss is ``step_fn(model, x, generator)``
            (a seeded CPU generator for any draws, e.g. a diffusion step's timesteps and noise); for models
            that are not classifiers. Exclusive with ``loss_fn``.

    Returns:
        The per-sample counts (:class:`StepFlops`), FLOPs = 2 x MACs of convolutions and matrix products.

    Raises:
        ConfigError: a bad shape, class count or batch size, or a model whose output does not fit the loss.
    """
    shape = _check_shape(input_shape, num_classes, batch_size)
    if step_fn is not None and loss_fn is not None:
        raise ConfigError("count_step takes a loss_fn or a step_fn, not both")
    loss_fn = loss_fn or _cross_entropy
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    grads = {p: p.grad for p in model.parameters()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    counter = _StepCounter()
    attribution = _Attribution(counter, model)
    started = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            gen = torch.Generator().manual_seed(0)
            x = torch.randn((batch_size, *shape), generator=gen).to(device)
            y = (torch.arange(batch_size) % int(num_classes)).to(device)
            for p in model.parameters():
                p.grad = None
            model.train()
            with counter:
                counter.phase = "forward"
                try:
                    if step_fn is not None:
                        loss = step_fn(model, x, torch.Generator().manual_seed(1))
                    else:
                        loss = loss_fn(model(x), y)
                except torch.OutOfMemoryError:
                    raise
                except RuntimeError as exc:  # shape mismatches between the input, the model and the loss
                    raise ConfigError(
                        f"a training step on input shape {shape} with {num_classes} classes failed: {exc}"
                    ) from None
                counter.phase = "backward"
                loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    finally:
        wall_s = time.perf_counter() - started
        attribution.remove()
        model.train(was_training)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        for p, g in grads.items():
            p.grad = g
    return _summarise(counter, model, shape, int(num_classes), batch_size, wall_s)


def _summarise(
    counter: _StepCounter, model: nn.Module, shape: tuple[int, ...], num_classes: int, batch_size: int, wall_s: float
) -> StepFlops:
    modules = dict(model.named_modules())
    order = {(name or ROOT): i for i, name in enumerate(modules)}
    layers = [
        LayerFlops(
            name=name,
            type=type(modules[name if name != ROOT else ""]).__name__ if name in order else "",
            forward=c["forward"] / batch_size,
            backward=c["backward"] / batch_size,
        )
        for name, c in sorted(counter.by_layer.items(), key=lambda kv: order.get(kv[0], len(order)))
        if c["forward"] or c["backward"]
    ]

    def is_conv(name: str) -> bool:
        return name in order and isinstance(modules[name if name != ROOT else ""], nn.modules.conv._ConvNd)

    forward = sum(c["forward"] for c in counter.by_op.values()) / batch_size
    backward = sum(c["backward"] for c in counter.by_op.values()) / batch_size
    result = StepFlops(
        forward=forward,
        backward=backward,
        backward_conv=sum(layer.backward for layer in layers if is_conv(layer.name)),
        forward_conv=sum(layer.forward for layer in layers if is_conv(layer.name)),
        layers=layers,
        ops={op: {k: v / batch_size for k, v in c.items()} for op, c in sorted(counter.by_op.items())},
        uncounted_ops=sorted(counter.uncounted),
        params=sum(p.numel() for p in model.parameters()),
        batch_size=batch_size,
        input_shape=shape,
        num_classes=num_classes,
        drop_rates=ssprop_drop_rates(model),
        count_wall_s=wall_s,
    )
    logger.debug(
        "counted step: %.4g FLOPs forward, %.4g backward per sample in %.3f s", forward, backward, wall_s
    )
    return result
