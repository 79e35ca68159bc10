"""Models from outside the registry: ``torchvision:NAME``, ``timm:NAME``, ``path/to/file.py:factory`` and
``module.sub:factory``.

Every external model is adapted to the dataset: its first convolution takes ``in_channels`` and its output has
``num_classes`` logits. A library argument is used where the library has one (torchvision's ``num_classes``,
timm's ``num_classes`` / ``in_chans``); otherwise the first ``nn.Conv2d`` or the last ``nn.Linear`` is replaced
by a freshly initialised layer of the right shape (always the case for pretrained weights, whose head has the
pretraining's 1000 classes). A one-image forward pass then proves the output shape before any run starts.
No pretrained weights are loaded unless ``pretrained=True`` (downloading weights is the library's business).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ssprop_energy.errors import ConfigError

__all__ = ["EXTERNAL_PREFIXES", "VISION_EXTRA_HINT", "is_external", "build_external", "adapt_io"]

logger = logging.getLogger(__name__)

EXTERNAL_PREFIXES = ("torchvision", "timm")
VISION_EXTRA_HINT = "pip install 'ssprop-energy[vision]'"


def is_external(name: str) -> bool:
    """True for names that do not refer to the built-in registry (they all contain a colon)."""
    return ":" in name


def build_external(
    name: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    dropout: float = 0.0,
    pretrained: bool = False,
    **options: Any,
) -> nn.Module:
    """Build and adapt an external model (see the module docstring for the name forms).

    Raises:
        ConfigError: unknown library model, missing library (the message names the ``vision`` extra),
            unreadable file, missing factory, a factory that does not return an ``nn.Module``, or a model whose
            output is not ``(batch, num_classes)`` for ``(batch, in_channels, image_size, image_size)`` input.
    """
    prefix, _, rest = name.partition(":")
    key = prefix.strip().lower()
    if key in EXTERNAL_PREFIXES:
        if not rest.strip():
            raise ConfigError(f"--model {name!r}: name the {key} model after the colon, e.g. {key}:resnet18")
        builder = _torchvision if key == "torchvision" else _timm
        model = builder(rest.strip(), num_classes, in_channels, image_size, dropout, pretrained, options)
    else:
        if pretrained:
            raise ConfigError(f"--model {name!r}: pretrained applies to torchvision: and timm: models only")
        model = _factory(name, num_classes, in_channels, image_size, dropout, options)
    adapt_io(model, num_classes, in_channels, where=name)
    check_output_shape(model, num_classes, in_channels, image_size, where=name)
    return model


# ------------------------------------------------------------------------------------------ libraries


def _import_library(module: str, name: str) -> Any:
    try:
        _torchvision_without_ops()
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"--model {name!r} needs {module.split('.')[0]}, which is not installed ({exc}); "
                          f"install it with: {VISION_EXTRA_HINT}") from None
    except (RuntimeError, OSError) as exc:
        raise ConfigError(
            f"--model {name!r}: {module.split('.')[0]} is installed but cannot be imported beside torch "
            f"{torch.__version__} ({type(exc).__name__}: {exc}); install the torchvision build made for this torch"
        ) from None


# Kept alive for the life of the process: dropping the Library object would remove the schemas again.
_STUB_OPS: list[Any] = []

# The ops torchvision registers fake kernels for unconditionally at import (torchvision/_meta_registrations.py);
# every other op registration there is skipped when its compiled extension did not load.
_UNCONDITIONAL_OPS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def _torchvision_without_ops() -> None:
    """Import torchvision; if its compiled ops cannot load beside this torch build, import it without them.

    PyPI's torchvision wheels are linked against the CUDA build of torch. Beside a CPU-only torch of the same
    version (the PyTorch CPU index, or this project's CI) the extension fails to load, and the import then dies
    on "operator torchvision::nms does not exist". The model definitions are plain torch and do not need the
    extension (only detection ops such as nms and roi_align do, and those raise torchvision's own error when
    called), so the two operator schemas it insists on are declared empty and the import is retried.
    Raises ImportError when torchvision is absent; re-raises the original error when the retry fails too.
    """
    if "torchvision" in sys.modules:
        return
    try:
        importlib.import_module("torchvision")
        return
    except (RuntimeError, OSError) as exc:
        if "torchvision::" not in str(exc) or _STUB_OPS:
            raise
        first = exc
    for key in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
        del sys.modules[key]  # half-imported submodules would otherwise be reused as they are
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _UNCONDITIONAL_OPS:
        op = schema.split("(", 1)[0]
        if not hasattr(torch.ops.torchvision, op):
            lib.define(schema)
    _STUB_OPS.append(lib)
    try:
        importlib.import_module("torchvision")
    except (RuntimeError, OSError):
        raise first from None
    logger.warning(
        "torchvision %s was built for another torch build than %s: its compiled ops (nms, roi_align, image "
        "decoding) are unavailable; classification models do not use them",
        getattr(sys.modules["torchvision"], "__version__", "?"), torch.__version__,
    )


def _call_dropping(fn: Callable[..., nn.Module], kwargs: dict[str, Any], optional: tuple[str, ...]) -> nn.Module:
    """Call ``fn(**kwargs)``; when it rejects one of the ``optional`` keywords (a builder that has no image
    size argument), call it again without that keyword."""
    kwargs = dict(kwargs)
    while True:
        try:
            return fn(**kwargs)
        except TypeError as exc:
            rejected = [k for k in optional if k in kwargs and repr(k) in str(exc)]
            if not rejected:
                raise
            kwargs.pop(rejected[0])


def _torchvision(
    arch: str, num_classes: int, in_channels: int, image_size: int, dropout: float, pretrained: bool,
    options: dict[str, Any],
) -> nn.Module:
    models = _import_library("torchvision.models", f"torchvision:{arch}")
    # Classification models only: detection and segmentation builders return dicts, not logits.
    known = [n.lower() for n in models.list_models(module=models)]
    if arch.lower() not in known:
        raise ConfigError(f"unknown torchvision model {arch!r}; torchvision has "
                          f"{len(known)} classification models, e.g. {', '.join(sorted(known)[:8])}")
    kwargs: dict[str, Any] = {"weights": "DEFAULT" if pretrained else None, **options}
    if not pretrained:
        kwargs["num_classes"] = num_classes  # pretrained heads keep 1000 classes; adapt_io replaces the head
        kwargs["image_size"] = image_size  # ViTs size their position embedding from it; others reject it
    if dropout > 0:
        kwargs.setdefault("dropout", dropout)
    try:
        return _call_dropping(lambda **kw: models.get_model(arch.lower(), **kw), kwargs, ("image_size",))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"torchvision:{arch}: {exc}") from None


def _timm(
    arch: str, num_classes: int, in_channels: int, image_size: int, dropout: float, pretrained: bool,
    options: dict[str, Any],
) -> nn.Module:
    timm = _import_library("timm", f"timm:{arch}")
    if not timm.is_model(arch):
        raise ConfigError(f"unknown timm model {arch!r}; see timm.list_models() (e.g. resnet18, vit_tiny_patch16_224)")
    kwargs: dict[str, Any] = {"pretrained": pretrained, "num_classes": num_classes, "in_chans": in_channels,
                              "img_size": image_size, **options}
    if dropout > 0:
        kwargs.setdefault("drop_rate", dropout)
    try:
        return _call_dropping(lambda **kw: timm.create_model(arch, **kw), kwargs, ("img_size",))
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"timm:{arch}: {exc}") from None


# ------------------------------------------------------------------------------------------ factories


def _factory(
    name: str, num_classes: int, in_channels: int, image_size: int, dropout: float, options: dict[str, Any]
) -> nn.Module:
    target, sep, attr = name.rpartition(":")
    if not sep or not target or not attr.isidentifier():
        raise ConfigError(
            f"--model {name!r}: expected a registered name, torchvision:NAME, timm:NAME, path/to/file.py:factory "
            "or module.sub:factory"
        )
    module = _load_file(target, name) if _looks_like_path(target) else _load_module(target, name)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"--model {name!r}: {target} has no callable {attr!r}")
    offered = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size, "dropout": dropout,
               **options}
    kwargs = _accepted(factory, offered, name)
    if dropout > 0 and "dropout" not in kwargs:
        raise ConfigError(f"--model {name!r}: the factory takes no 'dropout' argument, so dropout {dropout} "
                          "cannot be applied")
    unknown = sorted(set(options) - set(kwargs))
    if unknown:
        raise ConfigError(f"--model {name!r}: the factory takes no option {', '.join(unknown)}")
    try:
        model = factory(**kwargs)
    except ConfigError:
        raise
    except Exception as exc:  # the user's code: one clear line, the cause kept for --debug logs
        raise ConfigError(f"--model {name!r}: the factory raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model {name!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _looks_like_path(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _load_file(path_text: str, name: str) -> Any:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ConfigError(f"--model {name!r}: no such file {path}")
    # One module name per file path, so that two files called model.py do not shadow each other.
    module_name = f"ssprop_energy_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"--model {name!r}: {path} cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise ConfigError(f"--model {name!r}: importing {path} raised {type(exc).__name__}: {exc}") from exc
    return module


def _load_module(module_name: str, name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"--model {name!r}: no module {exc.name!r} on the Python path") from None
    except Exception as exc:
        raise ConfigError(f"--model {name!r}: importing {module_name} raised {type(exc).__name__}: {exc}") from exc


def _accepted(fn: Callable[..., Any], offered: dict[str, Any], name: str) -> dict[str, Any]:
    """The offered keywords ``fn`` accepts: all of them when it takes ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        raise ConfigError(f"--model {name!r}: cannot read the factory's signature") from None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(offered)
    takes = {k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in offered.items() if k in takes}


# ------------------------------------------------------------------------------------------ adaptation


def adapt_io(model: nn.Module, num_classes: int, in_channels: int, where: str = "model") -> nn.Module:
    """Make the first ``nn.Conv2d`` take ``in_channels`` and the last ``nn.Linear`` give ``num_classes``,
    replacing either by a freshly initialised layer of the same settings where it does not already fit.
    Modifies ``model`` in place and returns it."""
    modules = list(model.named_modules())
    convs = [(n, m) for n, m in modules if isinstance(m, nn.Conv2d)]
    if convs and convs[0][1].in_channels != in_channels:
        cname, old = convs[0]
        if old.groups != 1:
            raise ConfigError(f"{where}: the first convolution {cname} is grouped; cannot adapt it to "
                              f"{in_channels} input channels")
        new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                        1, old.bias is not None, old.padding_mode)
        _replace(model, cname, new.to(old.weight.device, old.weight.dtype))
        logger.info("%s: first convolution %s replaced to take %d channels (was %d)", where, cname, in_channels,
                    old.in_channels)
    linears = [(n, m) for n, m in modules if isinstance(m, nn.Linear)]
    if linears and linears[-1][1].out_features != num_classes:
        lname, old_l = linears[-1]
        new_l = nn.Linear(old_l.in_features, num_classes, old_l.bias is not None)
        _replace(model, lname, new_l.to(old_l.weight.device, old_l.weight.dtype))
        logger.info("%s: classifier %s replaced to give %d classes (was %d)", where, lname, num_classes,
                    old_l.out_features)
    return model


def _replace(model: nn.Module, qualified: str, new: nn.Module) -> None:
    parent_name, _, attr = qualified.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def check_output_shape(model: nn.Module, num_classes: int, in_channels: int, image_size: int, where: str) -> None:
    """One forward pass of two blank images in eval mode (no BatchNorm statistic or RNG state is touched):
    the logits must be ``(2, num_classes)``."""
    was_training = model.training
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, in_channels, image_size, image_size, device=device))
    except Exception as exc:
        raise ConfigError(
            f"{where}: a forward pass of ({in_channels}, {image_size}, {image_size}) images failed "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{where}: returns {shape} for a batch of 2 images; expected logits (2, {num_classes})")
