"""The one table of layer types: per type, its channel axes, whether it reads a channel
group through its weights, how to slice, permute and zero its channels, how to cost it and
how to copy it standalone at other widths.

Everything in automlprune that touches a layer's channels goes through this table:
recording the layer table (:mod:`automlprune.space.graph`), materialization and masking,
importance criteria, least-squares reconstruction, channel reordering, gates and the latency
table. Adding a layer type is one :func:`register` call with a :class:`LayerType`
subclass (see ``tests/test_layer_types.py`` for a toy one).

Vocabulary: a channel group touches a layer on its ``"out"`` side (the layer produces the
channels: a conv's filters, a batch norm's features) or its ``"in"`` side (the layer reads
them). Each type maps that side to the tensor axes it cuts: a plain conv cuts weight rows on
"out" and weight columns on "in"; a batch norm and a depthwise conv have one channel axis,
cut from either side. A grouped conv (groups > 1, not depthwise) keeps its group count: its
channel groups remove the same local channel from every convolution group
(:mod:`automlprune.space.graph`), so its input side cuts weight columns by local index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
from torch import nn

from automlprune.errors import UnsupportedLayerError

Side = Literal["out", "in"]


@dataclass(frozen=True)
class LayerInfo:
    """One parameterised leaf layer, as recorded from one traced forward pass.

    kind: the layer type's ``kind`` ("conv", "linear", "bn", or a registered type's). For
    conv/linear, ``in_channels``/``out_channels`` are features for linear; ``kernel`` is kh*kw
    (1 for linear); ``positions`` is the number of output positions per sample (H_out*W_out for
    conv, the product of leading dims for linear); ``input_shape`` is the per-sample shape of
    its input, e.g. (C, H, W). For bn, in = out = num_features. ``has_weights``: a
    multiply-accumulate layer (its weights count in MACs and can be quantized); ``False`` for
    per-channel affine layers such as batch norm. ``calls``: how often the layer runs per
    forward pass (a module used more than once shares its weights; ``positions`` then counts
    the output positions of all calls, ``input_shape`` is the first call's).
    """

    name: str
    kind: str
    in_channels: int
    out_channels: int
    groups: int
    kernel: int
    stride: int
    positions: int
    has_bias: bool
    order: int
    input_shape: tuple[int, ...] = ()
    has_weights: bool = True
    calls: int = 1

    @property
    def depthwise(self) -> bool:
        return self.kind == "conv" and self.groups > 1 and self.groups == self.in_channels == self.out_channels

    @property
    def even_split(self) -> int:
        """Slices its channels must stay evenly split into (a grouped conv's groups, a group
        norm's groups; 1 when any subset of channels may go)."""
        return 1 if self.depthwise else self.groups


class LayerType:
    """How automlprune handles one module class. Subclasses fill the methods that apply.

    ``kind`` names the type in the layer table; ``channel_tensors`` are the attributes indexed
    by output channel along dim 0 (weights, biases, running statistics).
    """

    kind: str = "layer"
    module_type: type = nn.Module
    has_weights: bool = True
    """A multiply-accumulate layer (a group root; its weights count in MACs and may be quantized)."""
    channel_tensors: tuple[str, ...] = ("weight", "bias")
    exact_when_masked: bool = True
    """Whether zeroing a channel computes what removing it does (False for norms whose
    statistics span channels: the materialized network is then the reference)."""

    # ---- recording ----------------------------------------------------------------------------
    def info(self, name: str, module: nn.Module, output: torch.Tensor, order: int,
             input_shape: tuple[int, ...]) -> LayerInfo:
        """The layer-table row of ``module`` given one traced output (batch first)."""
        raise NotImplementedError

    # ---- channel axes -------------------------------------------------------------------------
    def axis(self, module: nn.Module, side: Side) -> Side:
        """Which of its axes a group touching ``side`` cuts: "out" (dim 0 of every channel
        tensor) or "in" (dim 1 of the weight)."""
        return side

    def reads_through_weight(self, module: nn.Module) -> bool:
        """Whether the layer reads its input channels through weight columns (dim 1): plain
        convs and linears do; depthwise convs and batch norms do not."""
        return False

    def out_weights(self, module: nn.Module) -> Optional[torch.Tensor]:
        """The multiply-accumulate weights as (out channels, everything else), or None."""
        return None

    def in_weights(self, module: nn.Module) -> Optional[torch.Tensor]:
        """The weights as (in channels, everything else) for a layer that reads through its
        weights, else None."""
        if not self.reads_through_weight(module):
            return None
        return module.weight.detach().transpose(0, 1).flatten(1)

    # ---- editing in place ---------------------------------------------------------------------
    def _tensors(self, module: nn.Module, axis: Side) -> list[tuple[str, torch.Tensor, int]]:
        if axis == "out":
            return [(n, t, 0) for n in self.channel_tensors if (t := getattr(module, n, None)) is not None]
        return [("weight", module.weight, 1)]

    @torch.no_grad()
    def select_(self, module: nn.Module, side: Side, keep: torch.Tensor) -> None:
        """Keep only the channels ``keep`` (sorted indices) on ``side``: the tensors shrink and
        the module's size attributes follow."""
        if not self._edits(module, side):
            return
        axis = self.axis(module, side)
        for name, tensor, dim in self._tensors(module, axis):
            kept = tensor.index_select(dim, keep.to(tensor.device)).clone()
            if isinstance(tensor, nn.Parameter):
                setattr(module, name, nn.Parameter(kept, requires_grad=tensor.requires_grad))
            else:
                setattr(module, name, kept)
        self.resize(module, axis, len(keep))

    def resize(self, module: nn.Module, axis: Side, width: int) -> None:
        """Update the module's size attributes after its ``axis`` was cut to ``width``."""
        raise NotImplementedError

    @torch.no_grad()
    def permute_(self, module: nn.Module, side: Side, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Move channel ``src[i]`` to position ``dst[i]`` on ``side`` (same shapes after)."""
        if not self._edits(module, side):
            return
        for _, tensor, dim in self._tensors(module, self.axis(module, side)):
            moved = tensor.index_select(dim, src.to(tensor.device)).clone()
            tensor.index_copy_(dim, dst.to(tensor.device), moved)

    @torch.no_grad()
    def zero_(self, module: nn.Module, side: Side, index: torch.Tensor) -> None:
        """Zero the channels ``index`` on ``side``: produced channels output exactly zero
        (weights and bias; a batch norm's affine), read channels lose their weight columns."""
        if not self._edits(module, side):
            return
        axis = self.axis(module, side)
        names = ("weight", "bias") if axis == "out" else ("weight",)
        for name, tensor, dim in self._tensors(module, axis):
            if name in names:
                tensor.index_fill_(dim, index.to(tensor.device), 0)

    def _edits(self, module: nn.Module, side: Side) -> bool:
        """Whether a group touching ``side`` edits this layer's own tensors: a layer with one
        channel axis (batch norm, depthwise conv) is edited once, through its "out" member."""
        return side == "out" or self.reads_through_weight(module)

    # ---- standalone copies --------------------------------------------------------------------
    def standalone(self, module: nn.Module, kept_in: int, kept_out: int) -> nn.Module:
        """A fresh layer of the same kind and hyper-parameters at the given widths (latency tables)."""
        raise NotImplementedError


class Conv2dType(LayerType):
    kind = "conv"
    module_type = nn.Conv2d

    @staticmethod
    def depthwise(module: nn.Conv2d) -> bool:
        return module.groups > 1 and module.groups == module.in_channels == module.out_channels

    def grouped(self, module: nn.Conv2d) -> bool:
        """A grouped conv that is not depthwise: input channel i feeds only the output rows of
        group i // (in_channels / groups), through weight column i % (in_channels / groups)."""
        return module.groups > 1 and not self.depthwise(module)

    def _edits(self, module, side):
        return super()._edits(module, side) or self.grouped(module)

    def in_weights(self, module):
        if not self.grouped(module):
            return super().in_weights(module)
        w = module.weight.detach()  # (out, in / groups, kh, kw)
        rows = w.reshape(module.groups, module.out_channels // module.groups, *w.shape[1:])  # (G, O/G, I/G, kh, kw)
        return rows.transpose(1, 2).reshape(module.in_channels, -1)  # input channel g * I/G + j -> rows[g, :, j]

    def _local(self, module: nn.Conv2d, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per_group = module.in_channels // module.groups
        return index // per_group, index % per_group

    @torch.no_grad()
    def select_(self, module, side, keep):
        if side == "out" or not self.grouped(module):
            return super().select_(module, side, keep)
        owner, local = self._local(module, keep.cpu())
        first = local[owner == 0]
        if any(not torch.equal(local[owner == g], first) for g in range(module.groups)):
            raise ValueError(f"kept input channels of a grouped conv differ between its groups: {keep.tolist()}")
        module.weight = nn.Parameter(module.weight.index_select(1, first.to(module.weight.device)).clone(),
                                     requires_grad=module.weight.requires_grad)
        module.in_channels = len(keep)

    @torch.no_grad()
    def permute_(self, module, side, src, dst):
        if side == "out" or not self.grouped(module):
            return super().permute_(module, side, src, dst)
        src_owner, src_local = self._local(module, src.cpu())
        dst_owner, dst_local = self._local(module, dst.cpu())
        if not torch.equal(src_owner, dst_owner):
            raise ValueError("a grouped conv's input channels can only move within their convolution group")
        rows = module.out_channels // module.groups
        moved = module.weight.clone()
        for s_owner, s, d in zip(src_owner.tolist(), src_local.tolist(), dst_local.tolist()):
            moved[s_owner * rows:(s_owner + 1) * rows, d] = module.weight[s_owner * rows:(s_owner + 1) * rows, s]
        module.weight.copy_(moved)

    @torch.no_grad()
    def zero_(self, module, side, index):
        if side == "out" or not self.grouped(module):
            return super().zero_(module, side, index)
        rows = module.out_channels // module.groups
        for owner, local in zip(*(t.tolist() for t in self._local(module, index.cpu()))):
            module.weight[owner * rows:(owner + 1) * rows, local] = 0

    def info(self, name, module, output, order, input_shape):
        return LayerInfo(name, self.kind, module.in_channels, module.out_channels, module.groups,
                         int(np.prod(module.kernel_size)), int(module.stride[0]), int(output[0, 0].numel()),
                         module.bias is not None, order, input_shape)

    def axis(self, module, side):
        return "out" if self.depthwise(module) else side

    def reads_through_weight(self, module):
        return module.groups == 1

    def out_weights(self, module):
        return module.weight.detach().flatten(1)

    def resize(self, module, axis, width):
        if self.depthwise(module):
            module.in_channels = module.out_channels = module.groups = width
        elif axis == "out":
            module.out_channels = width
        else:
            module.in_channels = width

    def standalone(self, module, kept_in, kept_out):
        groups = kept_in if self.depthwise(module) else module.groups
        return nn.Conv2d(kept_in, kept_out, module.kernel_size, module.stride, module.padding, module.dilation, groups,
                         module.bias is not None, module.padding_mode)


class LinearType(LayerType):
    kind = "linear"
    module_type = nn.Linear

    def info(self, name, module, output, order, input_shape):
        return LayerInfo(name, self.kind, module.in_features, module.out_features, 1, 1, 1,
                         int(output.numel() // (output.shape[0] * module.out_features)), module.bias is not None, order,
                         input_shape)

    def reads_through_weight(self, module):
        return True

    def out_weights(self, module):
        return module.weight.detach().flatten(1)

    def resize(self, module, axis, width):
        if axis == "out":
            module.out_features = width
        else:
            module.in_features = width

    def standalone(self, module, kept_in, kept_out):
        return nn.Linear(kept_in, kept_out, bias=module.bias is not None)


class BatchNormType(LayerType):
    """BatchNorm1d/2d/3d: one channel axis (features), cut from either side."""

    kind = "bn"
    module_type = nn.modules.batchnorm._BatchNorm
    has_weights = False
    channel_tensors = ("weight", "bias", "running_mean", "running_var")

    def info(self, name, module, output, order, input_shape):
        return LayerInfo(name, self.kind, module.num_features, module.num_features, 1, 1, 1, 1, module.affine, order,
                         input_shape, has_weights=False)

    def axis(self, module, side):
        return "out"

    def resize(self, module, axis, width):
        module.num_features = width


class LayerNormType(LayerType):
    """LayerNorm over the channels alone (``normalized_shape`` of one entry, applied to
    channels-last tensors as ConvNeXt does, or torchvision's LayerNorm2d): one channel axis.
    A LayerNorm over more (or other) entries than a group's channels pins that group
    (:mod:`automlprune.space.graph`).
    Removing a channel changes the mean and variance the others are normalized with, so a
    masked network (zeroed channels still counted) differs from the materialized one: the
    materialized network, which the evaluator scores, is the reference."""

    kind = "ln"
    module_type = nn.LayerNorm
    has_weights = False
    exact_when_masked = False

    def info(self, name, module, output, order, input_shape):
        if module.elementwise_affine and module.bias is None:
            raise UnsupportedLayerError(f"layer '{name}' is a LayerNorm with a weight but no bias, which automlprune cannot cost; "
                                        "build it with bias=True (the default)")
        width = int(np.prod(module.normalized_shape))  # more than the channels when it normalizes (C, H, W): its groups are pinned
        return LayerInfo(name, self.kind, width, width, 1, 1, 1, 1, module.elementwise_affine, order, input_shape,
                         has_weights=False)

    def axis(self, module, side):
        return "out"

    def resize(self, module, axis, width):
        module.normalized_shape = (width,)


class GroupNormType(LayerType):
    """GroupNorm: one channel axis, statistics per group of channels. Its channel groups lose
    the same position in every norm group (as a grouped conv's), so ``num_groups`` stays; as
    for LayerNorm, the masked network is not the materialized one."""

    kind = "gn"
    module_type = nn.GroupNorm
    has_weights = False
    exact_when_masked = False

    def info(self, name, module, output, order, input_shape):
        return LayerInfo(name, self.kind, module.num_channels, module.num_channels, module.num_groups, 1, 1, 1,
                         module.affine, order, input_shape, has_weights=False)

    def axis(self, module, side):
        return "out"

    def resize(self, module, axis, width):
        module.num_channels = width


_TABLE: list[LayerType] = []


def register(layer_type: LayerType) -> LayerType:
    """Add a layer type to the table (a class already handled raises: one entry per type).
    Lookups go by ``isinstance``, most recently registered first, so a registered subclass
    overrides its parent's entry."""
    if any(t.module_type is layer_type.module_type for t in _TABLE):
        raise ValueError(f"layer type {layer_type.module_type.__name__} is already registered")
    _TABLE.insert(0, layer_type)
    return layer_type


def unregister(module_type: type) -> None:
    """Remove a registered type (tests of toy types clean up with it)."""
    _TABLE[:] = [t for t in _TABLE if t.module_type is not module_type]


def lookup(module: nn.Module) -> Optional[LayerType]:
    """The layer type handling ``module``, or None when automlprune does not know it."""
    return next((t for t in _TABLE if isinstance(module, t.module_type)), None)


def of(module: nn.Module) -> LayerType:
    """The layer type handling ``module`` (a module outside the table is a bug here: the space refuses them)."""
    layer_type = lookup(module)
    if layer_type is None:
        raise TypeError(f"{type(module).__name__} is not in automlprune's table of layer types")
    return layer_type


def types() -> tuple[LayerType, ...]:
    """The registered layer types, most recently registered first."""
    return tuple(_TABLE)


for _type in (GroupNormType(), LayerNormType(), BatchNormType(), LinearType(), Conv2dType()):
    register(_type)
