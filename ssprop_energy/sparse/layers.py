"""Drop-in ssProp layers: ``nn.Conv2d`` / ``nn.Linear`` subclasses with a channel-sparse backward.

Same constructor (plus ``drop_rate`` and ``selection``), same parameters, same ``state_dict`` keys, so
checkpoints load both ways. At ``drop_rate == 0`` the forward is the parent's own forward: autograd records
the ordinary convolution and the backward is exactly the dense one, with no selection work at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssprop_energy.sparse.functional import (
    KeptRecord,
    ssprop_conv2d,
    ssprop_linear,
    validate_drop_rate,
    validate_selection,
)

__all__ = ["SSPropConv2d", "SSPropLinear"]


class _SSPropMixin:
    """Drop rate / selection attributes shared by the ssProp layers (validated on every assignment)."""

    _drop_rate: float
    _selection: str
    _kept_record: KeptRecord

    @property
    def drop_rate(self) -> float:
        """Fraction of output channels whose gradient is dropped in backward, in [0, 1); 0 = dense."""
        return self._drop_rate

    @drop_rate.setter
    def drop_rate(self, value: float) -> None:
        self._drop_rate = validate_drop_rate(value)

    @property
    def selection(self) -> str:
        """How kept channels are chosen: ``"topk"``, ``"random"`` or ``"quantile"``."""
        return self._selection

    @selection.setter
    def selection(self, value: str) -> None:
        self._selection = validate_selection(value)

    @property
    def kept_channels(self) -> Tensor | None:
        """Indices of the output channels kept by the last sparse backward (None if dense or none yet).

        For inspection and tests; reading the values of the tensor synchronises an accelerator.
        """
        return self._kept_record.kept

    def _init_ssprop(self, drop_rate: float, selection: str) -> None:
        self.drop_rate = drop_rate
        self.selection = selection
        self._kept_record = KeptRecord()

    def _ssprop_repr(self) -> str:
        return f"drop_rate={self._drop_rate}, selection={self._selection!r}"


class SSPropConv2d(_SSPropMixin, nn.Conv2d):
    """``nn.Conv2d`` whose backward keeps only the top ``(1 - drop_rate)`` fraction of output channels.

    See :mod:`ssprop_energy.sparse.functional` for the rule, the grouped/depthwise handling and the
    selections.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        drop_rate: float = 0.0,
        selection: str = "topk",
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device=device, dtype=dtype,
        )
        self._init_ssprop(drop_rate, selection)

    def forward(self, input: Tensor) -> Tensor:
        if self._drop_rate == 0.0:
            return super().forward(input)
        padding = self.padding
        if self.padding_mode != "zeros":
            # Non-zero padding modes pad explicitly first, exactly as nn.Conv2d._conv_forward does.
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0, 0)
        return ssprop_conv2d(
            input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
            drop_rate=self._drop_rate, selection=self._selection, record=self._kept_record,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._ssprop_repr()}"


class SSPropLinear(_SSPropMixin, nn.Linear):
    """``nn.Linear`` whose backward keeps only the top ``(1 - drop_rate)`` fraction of output features.

    The score of a feature is the mean ``|grad_output|`` over all leading dimensions.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        drop_rate: float = 0.0,
        selection: str = "topk",
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_ssprop(drop_rate, selection)

    def forward(self, input: Tensor) -> Tensor:
        if self._drop_rate == 0.0:
            return super().forward(input)
        return ssprop_linear(
            input, self.weight, self.bias, drop_rate=self._drop_rate, selection=self._selection,
            record=self._kept_record,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._ssprop_repr()}"
