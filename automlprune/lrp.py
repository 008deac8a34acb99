"""Layer-wise relevance propagation (LRP) over any network ``torch.fx`` can trace, with the rules
of the official code of Gradual Channel Pruning with feature relevance scores (Aketi et al.,
``purdue-nrl/Gradual-Channel-Pruning-using-FRS``, ``relevance_scores.py``;
``../shared/references/training-time-methods.md`` section 10a):

* **Conv2d and Linear: the alpha-beta rule** (alpha 2, beta 1): with V+ = clamp(W, min=1e-9),
  V- = clamp(W, max=-1e-9), Z+ = conv(X, V+) + 1e-9, Z- = conv(X, V-) + 1e-9 (no bias),
  R_in = X * (convT(alpha R / Z+, V+) + convT(-beta R / Z-, V-)); the transposed convolutions
  are taken as gradients of the forward ones, so strides, padding and groups are the layer's.
* **Batch norm, ReLU (ReLU6, dropout, identity): R passes unchanged.**
* **Everything else (average and max pooling, the residual add, flatten, concatenation): the
  z-rule**, R_in_i = X_i * d(Y . R / Y)/dX_i: pooling spreads R over the window in proportion to
  each input's share (max pooling: to the winner), an add y = x1 + x2 splits R as x1 R / y and
  x2 R / y, reshapes move it. The stabilizer is 1e-9 with the sign of Y (the official code adds
  +1e-9 whatever the sign; the signed one cannot divide by a near-zero negative).

Propagation starts from the one-hot true label at the logits (the softmax is not propagated),
and :meth:`Relevance.at_outputs` returns the relevance of the named layers' outputs: (N, C, ...)
tensors, one per layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from automlprune.errors import ConfigError

PASS_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Dropout, nn.Identity)
PASS_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.dropout, "relu", "relu_"}
EPS = 1e-9


class Relevance:
    """Alpha-beta LRP of ``model`` (see the module docstring); the model's parameters are used
    live, so one tracing serves a whole training run."""

    def __init__(self, model: nn.Module, alpha: float = 2.0, beta: float = 1.0) -> None:
        self.model = model
        try:
            self.graph_module = fx.symbolic_trace(model)
        except Exception as exc:  # noqa: BLE001 - any tracing failure becomes one sentence
            raise ConfigError(f"layer-wise relevance propagation needs a model torch.fx can trace, and tracing "
                              f"{type(model).__name__} failed ({type(exc).__name__}: {exc}); use another criterion or strategy") from exc
        self.alpha, self.beta = alpha, beta
        self.nodes = {node.target: node for node in self.graph_module.graph.nodes if node.op == "call_module"}

    def at_outputs(self, x: torch.Tensor, labels: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
        """Relevance of each of ``layers``' outputs for the batch ``x`` with true ``labels``."""
        missing = [name for name in layers if name not in self.nodes]
        if missing:
            raise ConfigError(f"layers {', '.join(missing)} are not called in the traced network; relevance cannot be read there")
        values = self._forward(x)
        wanted = {self.nodes[name]: name for name in layers}
        relevance: dict[fx.Node, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        for node in reversed(self.graph_module.graph.nodes):
            if node.op == "output":
                logits = values[node.args[0]]
                relevance[node.args[0]] = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
                continue
            if node not in relevance:
                continue
            r = relevance.pop(node)
            if node in wanted:
                out[wanted[node]] = r
                if len(out) == len(wanted):
                    break
            for source, r_in in self._propagate(node, r, values):
                relevance[source] = relevance[source] + r_in if source in relevance else r_in
        return out

    # ---- passes -------------------------------------------------------------------------------
    @torch.no_grad()
    def _forward(self, x: torch.Tensor) -> dict[fx.Node, Any]:
        values: dict[fx.Node, Any] = {}

        class Recorder(fx.Interpreter):
            def run_node(self, node):
                values[node] = super().run_node(node)
                return values[node]

        was_training = self.graph_module.training
        self.graph_module.eval()
        try:
            Recorder(self.graph_module).run(x)
        finally:
            self.graph_module.train(was_training)
        return values

    def _propagate(self, node: fx.Node, r: torch.Tensor, values: dict[fx.Node, Any]) -> list[tuple[fx.Node, torch.Tensor]]:
        sources = [a for a in node.all_input_nodes if isinstance(values.get(a), torch.Tensor)]
        if node.op in ("placeholder", "get_attr") or not sources:
            return []
        if node.op == "call_module":
            module = self.graph_module.get_submodule(node.target)
            if isinstance(module, PASS_MODULES):
                return [(sources[0], r)]
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                return [(sources[0], self._alpha_beta(module, values[sources[0]], r))]
        elif node.target in PASS_FUNCTIONS:
            return [(sources[0], r)]
        return self._z_rule(node, r, values, sources)

    def _alpha_beta(self, module: nn.Module, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        weight = module.weight.detach()
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros":
                raise ConfigError(f"relevance propagation supports zero-padded convolutions only, not padding_mode '{module.padding_mode}'")
            op = lambda inp, w: F.conv2d(inp, w, None, module.stride, module.padding, module.dilation, module.groups)  # noqa: E731
        else:
            op = lambda inp, w: F.linear(inp, w)  # noqa: E731
        total = torch.zeros_like(x)
        for w, factor in ((weight.clamp(min=EPS), self.alpha), (weight.clamp(max=-EPS), -self.beta)):
            with torch.enable_grad():
                leaf = x.detach().requires_grad_(True)
                z = op(leaf, w) + EPS
                (grad,) = torch.autograd.grad((z * (factor * r / z).detach()).sum(), leaf)
            total += grad
        return x * total

    def _z_rule(self, node: fx.Node, r: torch.Tensor, values: dict[fx.Node, Any],
                sources: list[fx.Node]) -> list[tuple[fx.Node, torch.Tensor]]:
        with torch.enable_grad():
            leaves = {s: values[s].detach().requires_grad_(True) for s in sources}
            args = fx.node.map_arg(node.args, lambda n: leaves.get(n, values[n]))
            kwargs = fx.node.map_arg(node.kwargs, lambda n: leaves.get(n, values[n]))
            if node.op == "call_module":
                y = self.graph_module.get_submodule(node.target)(*args, **kwargs)
            elif node.op == "call_method":
                y = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                y = node.target(*args, **kwargs)
            if not isinstance(y, torch.Tensor):
                raise ConfigError(f"relevance propagation meets '{node.name}', which does not return one tensor")
            stabilized = y.detach() + EPS * torch.where(y.detach() >= 0, 1.0, -1.0)
            grads = torch.autograd.grad((y * (r / stabilized)).sum(), list(leaves.values()), allow_unused=True)
        return [(s, values[s] * g) for s, g in zip(leaves, grads) if g is not None]
