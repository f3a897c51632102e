"""The in-process reference MoE: the same model in one process, one expert at a time.

It shares the gate maths, expert definitions and weight sources with the service
but none of its dispatch, batching, wire or combine code, so comparing the two
checks the distributed path end to end.
"""

from __future__ import annotations

import torch

from moe_serve.config import ModelConfig, RoutingConfig
from moe_serve.dtypes import DTYPE_NAMES
from moe_serve.layer.experts import expert_forward, load_shared, shared_forward
from moe_serve.layer.gating import Gate, Routing
from moe_serve.weights import open_weights


class ReferenceMoE:
    """Every MoE layer of a model (synthetic or checkpoint) on one device."""

    def __init__(self, model: ModelConfig, routing: RoutingConfig, device: str = "cpu") -> None:
        self.model, self.routing = model, routing
        self.device = torch.device(device)
        self.dtype = DTYPE_NAMES[model.dtype]
        source = open_weights(model, routing)
        self.gates = {
            la: Gate.load(source, la, model.top_k, routing, self.device, self.dtype)
            for la in model.moe_layers
        }
        self.experts = {
            la: [
                {k: v.to(self.device, self.dtype) for k, v in w.items()}
                for w in source.experts(la, range(model.num_experts))
            ]
            for la in model.moe_layers
        }
        self.shared = load_shared(source, model.moe_layers, self.device, self.dtype)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, layer: int) -> tuple[torch.Tensor, Routing]:
        """x [T, H] -> (output [T, H] in the model dtype, routing)."""
        x = x.to(self.device, self.dtype)
        r = self.gates[layer](x)
        out = torch.zeros(x.shape, dtype=torch.float32, device=self.device)
        for e, w in enumerate(self.experts[layer]):
            t, k = ((r.expert_ids == e) & r.kept).nonzero(as_tuple=True)
            y = expert_forward(self.model.expert_kind, self.model.activation, w, x[t])
            out.index_add_(0, t, y.float() * r.weights[t, k].unsqueeze(1))
        if layer in self.shared:
            out += shared_forward(self.model.activation, self.shared[layer], x).float()
        return out.to(self.dtype), r
