"""Model registry: ``get_model(name, ...)`` builds any network the harness can train.

Names are the registered ones (:func:`list_models`) or external ones (``torchvision:NAME``, ``timm:NAME``,
``path/to/file.py:factory``, ``module.sub:factory``; see :mod:`ssprop_energy.models.external`).

Every classification model takes images ``(B, in_channels, image_size, image_size)`` and returns logits
``(B, num_classes)``; a generation model (``ModelInfo.task == "generation"``, e.g. ``ddpm-unet``) is a noise
predictor ``model(x, t)`` that returns a tensor of ``x``'s shape and ignores ``num_classes``.
Layers are plain ``nn.Conv2d`` / ``nn.Linear`` so that ``ssprop_energy.sparse.sparsify`` can swap them for
their ssProp versions after construction (the factory pattern of timm / torchvision, applied afterwards).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from torch import nn

from ssprop_energy.errors import ConfigError
from ssprop_energy.models import cnn, mlp, resnet, unet, vit
from ssprop_energy.models.external import build_external, is_external

__all__ = [
    "TASKS", "ModelInfo", "get_model", "model_info", "list_models", "count_parameters", "default_layers_for",
    "layer_kinds_present", "resolve_layers",
]

# What a model's output is for: logits for a cross-entropy loss, or predicted noise for a diffusion loss.
TASKS = ("classification", "generation")


@dataclass(frozen=True)
class ModelInfo:
    """What ``list_models`` says about one registered model."""

    name: str
    description: str
    default_image_size: int = 32
    # Layer kinds ssProp targets when the user gives no --layers (kinds of ``sparse.convert.LAYER_KINDS``).
    default_layers: tuple[str, ...] = ("conv",)
    task: str = "classification"


_Builder = Callable[..., nn.Module]

_REGISTRY: dict[str, tuple[ModelInfo, _Builder]] = {}


def _register(info: ModelInfo, builder: _Builder) -> None:
    _REGISTRY[info.name] = (info, builder)


_register(
    ModelInfo("resnet18", "CIFAR-style ResNet-18 (3x3 stride-1 stem, no max-pool, basic blocks 2-2-2-2)"),
    resnet.resnet18,
)
_register(
    ModelInfo("resnet34", "CIFAR-style ResNet-34 (3x3 stride-1 stem, no max-pool, basic blocks 3-4-6-3)"),
    resnet.resnet34,
)
_register(
    ModelInfo("resnet50", "CIFAR-style ResNet-50 (3x3 stride-1 stem, no max-pool, bottlenecks 3-4-6-3)"),
    resnet.resnet50,
)
_register(
    ModelInfo("cnn", "the paper's plain CNN: depth x (3x3 conv, 128 channels, ReLU), global average pool, linear"),
    cnn.PlainCNN,
)
_register(
    # The paper's MLP experiments sparsify Linear layers (its SSPropLinear exists for them).
    ModelInfo("mlp", "the paper's MLP: flatten, depth linear layers of 256 hidden units with ReLU",
              default_layers=("linear",)),
    mlp.MLP,
)
_register(
    # Its patch-embedding conv alone holds under 5% of the backward FLOPs: the projections are the targets.
    ModelInfo("vit", "small Vision Transformer (patch 4, dim 192, depth 6, 3 heads, mean-pooled tokens)",
              default_layers=("conv", "linear")),
    vit.VisionTransformer,
)
_register(
    ModelInfo(
        "ddpm-unet",
        "the paper's DDPM noise predictor: UNet, base 16 channels, multipliers 1-2-4, 2 residual blocks per "
        "level, sinusoidal time embedding + MLP, 8-head attention at the deepest level; forward(x, t)",
        task="generation",
    ),
    unet.UNet,
)


def list_models() -> list[ModelInfo]:
    """All registered models, in registration order."""
    return [info for info, _ in _REGISTRY.values()]


def layer_kinds_present(model: nn.Module) -> tuple[str, ...]:
    """The layer kinds (``conv``, ``linear``) of which ``model`` holds at least one swappable layer: a module
    whose type is exactly ``nn.Conv2d`` / ``nn.Linear``, as :func:`ssprop_energy.sparse.sparsify` requires."""
    types = {type(m) for m in model.modules()}
    kinds = []
    if nn.Conv2d in types:
        kinds.append("conv")
    if nn.Linear in types:
        kinds.append("linear")
    return tuple(kinds)


def default_layers_for(name: str, model: nn.Module | None = None) -> tuple[str, ...]:
    """The layer kinds ssProp targets by default for ``name``.

    Registered models declare theirs (:attr:`ModelInfo.default_layers`). An external model (``torchvision:``,
    ``timm:``, a factory) gets every kind it contains, conv and linear, which needs the built ``model``.

    Raises:
        ConfigError: unknown registered name; an external name without ``model``; a model with neither kind.
    """
    if not is_external(name):
        return model_info(name).default_layers
    if model is None:
        raise ConfigError(f"the default layers of external model {name!r} depend on the built model; pass it")
    kinds = layer_kinds_present(model)
    if not kinds:
        raise ConfigError(f"model {name!r} has no nn.Conv2d or nn.Linear layer for ssProp to sparsify")
    return kinds


def resolve_layers(name: str, model: nn.Module, layers: Sequence[str] | None) -> tuple[str, ...]:
    """The layer kinds to sparsify: ``layers`` when given (``--layers`` overrides), else the model's default
    (:func:`default_layers_for`)."""
    if layers:
        return tuple(layers)
    return default_layers_for(name, model)


def model_info(name: str) -> ModelInfo:
    """The registry entry of ``name`` (case-insensitive).

    Raises:
        ConfigError: unknown name.
    """
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[key][0]


def get_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    dropout: float = 0.0,
    pretrained: bool = False,
    **options: Any,
) -> nn.Module:
    """Build a model with freshly initialised weights (pretrained ones only when asked, external models only).

    Args:
        name: a name from :func:`list_models` (case-insensitive), or ``torchvision:NAME``, ``timm:NAME``,
            ``path/to/file.py:factory``, ``module.sub:factory``. An external model gets its first convolution
            and its classifier adapted to ``in_channels`` and ``num_classes`` where the library has no argument
            for them; a factory receives ``num_classes``, ``in_channels``, ``image_size`` and ``dropout`` where
            its signature accepts them.
        num_classes: number of output logits (ignored by generation models).
        in_channels: channels of the input images (1 for MNIST, 3 for CIFAR).
        image_size: side of the square input images in pixels (16, 28 and 32 are tested).
        dropout: dropout probability after each conv block / hidden layer; 0 adds no dropout module.
        pretrained: load the library's pretrained weights (``torchvision:`` and ``timm:`` only; the library
            downloads them).
        **options: model-specific settings, e.g. ``depth`` for ``cnn`` and ``mlp``, ``patch_size`` for ``vit``;
            passed through to an external builder or factory.

    Raises:
        ConfigError: unknown name, an option the model does not take, or an invalid value; for ``torchvision:``
            and ``timm:`` a missing library (the message names ``pip install 'ssprop-energy[vision]'``).
    """
    key = name.strip().lower()
    if not is_external(name) and key not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(_REGISTRY)}, or torchvision:NAME, "
                          "timm:NAME, path/to/file.py:factory, module.sub:factory")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ConfigError(f"in_channels must be >= 1, got {in_channels}")
    if image_size < 1:
        raise ConfigError(f"image_size must be >= 1, got {image_size}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
    if is_external(name):
        return build_external(name.strip(), num_classes, in_channels, image_size, dropout, pretrained, **options)
    if pretrained:
        raise ConfigError(f"model {key!r} has no pretrained weights (pretrained applies to torchvision: and timm:)")
    _, builder = _REGISTRY[key]
    accepted = set(inspect.signature(builder).parameters)
    unknown = sorted(set(options) - accepted)
    if unknown:
        extra = sorted(accepted - {"num_classes", "in_channels", "image_size", "dropout"})
        raise ConfigError(
            f"model {key!r} takes no option {', '.join(unknown)}; its options: {', '.join(extra) or 'none'}"
        )
    return builder(
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, dropout=dropout, **options
    )


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (weights and biases; BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
