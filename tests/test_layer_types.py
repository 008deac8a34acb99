"""The table of layer types: a new layer type is one registration, and every consumer (space,
cost model, materialization, masking, reordering, latency tables) then handles it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from automlprune.cost import CostModel, count_macs
from automlprune.importance import channel_order
from automlprune.materialize import mask, materialize
from automlprune.nn import layer_types
from automlprune.nn.layer_types import Conv2dType
from automlprune.nn.reorder import reorder_channels_
from automlprune.space import SearchSpace


class GatedConv2d(nn.Conv2d):
    """A conv with a per-output-channel gate buffer multiplied into its output: a toy "masked
    wrapper", the kind training-time methods add. Its gate must shrink with its filters."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("gate", torch.linspace(0.5, 1.5, self.out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.gate.view(1, -1, 1, 1)


class GatedConvType(Conv2dType):
    kind = "gated_conv"
    module_type = GatedConv2d
    channel_tensors = ("weight", "bias", "gate")

    def standalone(self, module, kept_in, kept_out):
        return GatedConv2d(kept_in, kept_out, module.kernel_size, module.stride, module.padding, bias=module.bias is not None)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(GatedConv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         GatedConv2d(8, 12, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(12, 10)).eval()


@pytest.fixture
def gated_type():
    layer_types.register(GatedConvType())
    yield
    layer_types.unregister(GatedConv2d)


def test_without_its_registration_a_gated_layer_breaks_the_materialized_network():
    model, x = _model(), torch.randn(2, 1, 8, 8)
    space = SearchSpace(model, x[:1])  # handled as a plain Conv2d: its gate is not cut
    with pytest.raises(RuntimeError):
        materialize(model, space.uniform(0.5), space)(x)


def test_one_registration_makes_every_consumer_handle_a_new_layer_type(gated_type):
    model, x = _model(), torch.randn(4, 1, 8, 8)
    space = SearchSpace(model, x[:1])
    assert space.layer_by_name["0"].kind == "gated_conv" and space.layer_by_name["3"].kind == "gated_conv"
    candidate = space.uniform(0.5)
    small = materialize(model, candidate, space)
    assert small[0].gate.shape == (4,) and small[3].gate.shape == (6,) and small[3].in_channels == 4
    torch.testing.assert_close(small(x), mask(model, candidate, space)(x), atol=1e-5, rtol=1e-5)
    assert CostModel(space, model)(candidate).macs == count_macs(small, x[:1])
    # reordering permutes the gate with its filters: same function
    reordered = _model()
    reorder_channels_(reordered, space, channel_order(reordered, space, "l1"))
    torch.testing.assert_close(reordered(x), model(x), atol=1e-5, rtol=1e-5)
    standalone = layer_types.of(model[3]).standalone(model[3], 4, 6)
    assert isinstance(standalone, GatedConv2d) and standalone.gate.shape == (6,)


def test_the_table_refuses_a_second_entry_for_one_class():
    with pytest.raises(ValueError, match="already registered"):
        layer_types.register(Conv2dType())
