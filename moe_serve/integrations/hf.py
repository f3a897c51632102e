"""Run the sparse-MoE blocks of a Hugging Face transformers model on a moe_serve service.

    model = AutoModelForCausalLM.from_pretrained(DIR, dtype=torch.bfloat16)
    with MoEClient("127.0.0.1:50051") as client:
        offload_moe(model, client, free_local_experts=True)
        ids = model.generate(input_ids, max_new_tokens=32)

`offload_moe` swaps each sparse-MoE block (router, routed experts and shared experts
together) for a `RemoteMoEBlock` whose forward is `client.infer(hidden_states, layer=i)`;
attention, norms, embeddings, dense MLPs and the LM head stay local. Blocks are found by
structure (a module with an `experts` child and a `gate` or `router` child), so this module
imports transformers only for optional niceties and also handles MoE families it does not
name. See docs/integrations.md.
"""

from __future__ import annotations

import copy
import functools
import inspect
import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    import transformers

__all__ = ["RemoteMoEBlock", "SupportsInfer", "find_moe_blocks", "offload_moe", "restore_moe"]

# How many values each known block's forward returns (1: a plain tensor). In transformers
# 5.x every family returns the [B, S, H] tensor except gpt-oss, whose GptOssMLP returns
# (hidden_states, router_scores) and whose decoder layer discards the scores. Classes not
# listed are probed once with a single token (see _probe_num_outputs).
_KNOWN_NUM_OUTPUTS: dict[str, int] = {
    "MixtralSparseMoeBlock": 1,
    "Qwen2MoeSparseMoeBlock": 1,
    "Qwen3MoeSparseMoeBlock": 1,
    "OlmoeSparseMoeBlock": 1,
    "DeepseekV2Moe": 1,
    "DeepseekV3MoE": 1,
    "GptOssMLP": 2,
}

_ROUTER_LOGITS_ERROR = (
    "output_router_logits is not available while MoE layers are offloaded: the router runs "
    "on the moe_serve master, which returns only the layer's output. Call the model with "
    "output_router_logits=False (and set model.config.output_router_logits = False), or "
    "restore_moe(model) first."
)


class SupportsInfer(Protocol):
    """What offload_moe needs of a client: `MoEClient` or any blocking stand-in.

    `infer(x, layer=i)` takes hidden states x [..., H] and returns MoE layer i's output with
    the shape, dtype and device of x.
    """

    def infer(self, x: torch.Tensor, layer: int) -> torch.Tensor: ...


class RemoteMoEBlock(nn.Module):
    """Stands in for one sparse-MoE block; forward(hidden_states) calls the service.

    The service runs the whole block (router, routed experts, shared experts), so its output
    replaces the original block's output as is. The forward returns what the original did:
    the tensor, or for blocks that returned a tuple (gpt-oss) a tuple of the same length
    whose extra entries are None (the router's scores are not sent back).

    `local` is the original block when offload_moe kept it (free_local_experts=False), else
    None. It is deliberately not a registered submodule, so the model's `parameters()`,
    `state_dict()`, `named_modules()` and transformers' output-recording hooks see only what
    runs locally; `.to()`, `.half()`, `.cuda()` still reach it (see `_apply`), so
    `restore_moe` puts back a block on the model's current device and dtype.
    """

    client: SupportsInfer
    layer: int
    num_outputs: int
    max_tokens: int | None

    def __init__(
        self,
        client: SupportsInfer,
        layer: int,
        *,
        local: nn.Module | None = None,
        num_outputs: int = 1,
        max_tokens: int | None = None,
    ) -> None:
        """`max_tokens`: split calls larger than this many tokens (the master's limit)."""
        super().__init__()
        if num_outputs < 1:
            raise ValueError(f"num_outputs: expected >= 1, got {num_outputs}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens: expected >= 1 or None, got {max_tokens}")
        # Through __dict__: nn.Module.__setattr__ would register a module-valued client or
        # the kept block as children (their weights would then count as the model's own).
        self.__dict__["client"] = client
        self.__dict__["_local"] = local
        self.layer = layer
        self.num_outputs = num_outputs
        self.max_tokens = max_tokens

    @property
    def local(self) -> nn.Module | None:
        """The original block, kept for restore_moe; None after free_local_experts=True."""
        return self.__dict__["_local"]

    def forward(self, hidden_states: torch.Tensor) -> Any:
        """hidden_states [B, S, H] -> the MoE layer's output, in the original block's form."""
        if self.training and torch.is_grad_enabled():
            raise RuntimeError(
                f"layer {self.layer}: the remote MoE layer is inference-only (no gradient "
                "comes back from the service); call model.eval() or run under torch.no_grad()"
            )
        collector = _output_collector()
        if collector is not None and "router_logits" in (collector.get() or {}):
            raise RuntimeError(_ROUTER_LOGITS_ERROR)
        if hidden_states.requires_grad and torch.is_grad_enabled():
            # Eval-mode forward with autograd on (a bare model(ids)): the output is correct
            # but carries no gradient; say so once rather than fail such common calls.
            warnings.warn(
                "remote MoE layers return no gradient; wrap inference in torch.no_grad()",
                RuntimeWarning,
                stacklevel=2,
            )
        y = self._infer(hidden_states)
        if self.num_outputs == 1:
            return y
        return (y, *([None] * (self.num_outputs - 1)))

    def _infer(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // x.shape[-1] if x.dim() else 0
        if self.max_tokens is None or tokens <= self.max_tokens:
            y = self.client.infer(x, layer=self.layer)
        else:
            # A long prefill (B * S tokens) can exceed master.max_request_tokens; tokens are
            # independent in an MoE layer, so chunks give the same result.
            flat = x.reshape(-1, x.shape[-1])
            parts = [self.client.infer(c, layer=self.layer) for c in flat.split(self.max_tokens)]
            y = torch.cat(parts).reshape(x.shape)
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise RuntimeError(
                f"layer {self.layer}: client.infer returned {got}, expected shape {tuple(x.shape)}"
            )
        return y

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> RemoteMoEBlock:
        # .to()/.cuda()/.half()/.double()/.to_empty() reach modules only through _apply on
        # registered children; forward it to the kept block so it follows the model.
        if recurse and self.local is not None:
            self.local._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def __deepcopy__(self, memo: dict[int, Any]) -> RemoteMoEBlock:
        # A client holds a connection, which cannot be copied (MoEClient's grpc channel
        # refuses): copies of an offloaded model share it; gRPC channels are thread-safe.
        memo[id(self.client)] = self.client
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def extra_repr(self) -> str:
        return f"layer={self.layer}, kept_local={self.local is not None}"


def find_moe_blocks(model: nn.Module) -> dict[int, str]:
    """The sparse-MoE blocks of `model`: decoder layer index -> qualified module name.

    A block is a module with an `experts` child and a `gate` or `router` child; its layer
    index is its position in the nearest enclosing nn.ModuleList (the decoder layers).
    Dense layers (DeepSeek's first_k_dense_replace, Qwen's mlp_only_layers) are not listed,
    nor are blocks already replaced by a RemoteMoEBlock.
    """
    found: dict[int, str] = {}
    inside: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue  # the experts' own children are not blocks
        children = dict(module.named_children())
        if "experts" not in children or not ({"gate", "router"} & children.keys()):
            continue
        inside += (f"{name}.",)
        layer = _layer_index(model, name)
        if layer in found:
            raise ValueError(
                f"{name}: layer index {layer} is also that of {found[layer]}; "
                "a model with several stacks of MoE layers is not supported"
            )
        found[layer] = name
    return dict(sorted(found.items()))


def offload_moe(
    model: transformers.PreTrainedModel | nn.Module,
    client: SupportsInfer | Any,
    *,
    free_local_experts: bool = False,
    layers: Iterable[int] | None = None,
) -> list[int]:
    """Replace every sparse-MoE block of a loaded transformers model so its forward calls
    the service. Returns the layer indices replaced.

    Each block at `model...layers[i].mlp` (found by structure, see find_moe_blocks) becomes
    a RemoteMoEBlock calling `client.infer(hidden_states, layer=i)`, so `model(...)` and
    `model.generate(...)` work unchanged. `layers` restricts the swap to those indices (each
    must hold a MoE block not yet replaced); None replaces all.

    free_local_experts=True drops the original blocks: their weights are freed once nothing
    else refers to them, and restore_moe cannot undo the swap. Otherwise each block is kept
    as `RemoteMoEBlock.local` (still in memory) and restore_moe(model) puts it back.

    If the client has a blocking `info()` (MoEClient does), it is called once to check that
    the service's hidden size matches the model's and that it serves every replaced layer,
    and calls larger than its max_request_tokens are split. The client must be blocking:
    an AsyncMoEClient is refused, since the model's forward is synchronous.
    """
    infer = getattr(client, "infer", None)
    if not callable(infer):
        raise TypeError(f"client: expected an object with infer(x, layer=...), got {client!r}")
    if inspect.iscoroutinefunction(infer):
        raise TypeError(
            "client: infer is a coroutine function (AsyncMoEClient?); the model's forward is "
            "synchronous, so pass a blocking MoEClient"
        )
    blocks = find_moe_blocks(model)
    remote = {m.layer for m in model.modules() if isinstance(m, RemoteMoEBlock)}
    if layers is None:
        chosen = sorted(blocks)
        if not chosen:
            why = f" (layers {sorted(remote)} are already offloaded)" if remote else ""
            raise ValueError(f"{type(model).__name__}: no sparse-MoE block found{why}")
    else:
        chosen = sorted({int(i) for i in layers})
        for i in chosen:
            if i in remote:
                raise ValueError(f"layers: layer {i} is already offloaded")
            if i not in blocks:
                raise ValueError(
                    f"layers: layer {i} has no sparse-MoE block; have {sorted(blocks)}"
                )
    hidden_size = _hidden_size(model)
    max_tokens = _check_service(client, hidden_size, chosen)

    # Decide every replacement before swapping any, so a failure leaves the model untouched.
    swaps: list[tuple[nn.Module, str, RemoteMoEBlock]] = []
    for i in chosen:
        parent_name, _, attr = blocks[i].rpartition(".")
        parent = model.get_submodule(parent_name)
        block = getattr(parent, attr)
        num_outputs = _KNOWN_NUM_OUTPUTS.get(type(block).__name__) or _probe_num_outputs(
            block, hidden_size
        )
        new = RemoteMoEBlock(
            client,
            i,
            local=None if free_local_experts else block,
            num_outputs=num_outputs,
            max_tokens=max_tokens,
        )
        new.train(block.training)
        swaps.append((parent, attr, new))
    if not free_local_experts:
        # transformers installs its output-recording hooks (router_logits, ...) lazily, on
        # the modules present at the first call that asks. Install them now, so that blocks
        # put back by restore_moe carry them even if that first call happens while offloaded.
        _install_output_hooks(model, [blocks[i] for i in chosen])
    for parent, attr, new in swaps:
        setattr(parent, attr, new)
    return chosen


def restore_moe(model: nn.Module) -> None:
    """Put back the original blocks that offload_moe(model, ..., free_local_experts=False) kept.

    Raises RuntimeError, changing nothing, if any offloaded block was freed. A model with no
    offloaded block is left as is.
    """
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, RemoteMoEBlock)]
    freed = sorted(m.layer for _, m in found if m.local is None)
    if freed:
        raise RuntimeError(
            f"restore_moe: layers {freed} were offloaded with free_local_experts=True; "
            "their weights are gone (reload the model instead)"
        )
    for name, m in found:
        parent_name, _, attr = name.rpartition(".")
        local = m.local
        assert local is not None
        local.train(m.training)  # model.train()/eval() since the swap reached only m
        setattr(model.get_submodule(parent_name), attr, local)


def _layer_index(model: nn.Module, name: str) -> int:
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i].isdigit() and isinstance(
            model.get_submodule(".".join(parts[:i])), nn.ModuleList
        ):
            return int(parts[i])
    raise ValueError(f"{name}: a MoE block outside an nn.ModuleList of layers has no layer index")


def _hidden_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    # Multimodal configs nest the language model's; get_text_config returns it (or self).
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "hidden_size", None)
    return size if isinstance(size, int) else None


def _check_service(client: Any, hidden_size: int | None, layers: list[int]) -> int | None:
    """Validate against client.info() when the client has one; returns the token limit."""
    info = getattr(client, "info", None)
    if not callable(info) or inspect.iscoroutinefunction(info):
        return None  # a bare stand-in: nothing to check against
    si = info()
    served = getattr(si, "hidden_size", None)
    if hidden_size is not None and served is not None and served != hidden_size:
        raise ValueError(
            f"the service's hidden_size is {served}, the model's is {hidden_size}: "
            "it serves another model"
        )
    served_layers = getattr(si, "layers", None)
    if served_layers is not None:
        missing = sorted(set(layers) - set(served_layers))
        if missing:
            raise ValueError(
                f"the service does not serve layers {missing} (serves {sorted(served_layers)}); "
                "pass layers= to offload only the served ones"
            )
    limit = getattr(si, "max_request_tokens", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def _probe_num_outputs(block: nn.Module, hidden_size: int | None) -> int:
    """Run an unknown block class once on one zero token to see if it returns a tuple."""
    if hidden_size is None:  # no config: the router's weight is [E, H]
        router = getattr(block, "gate", None) or getattr(block, "router", None)
        weight = getattr(router, "weight", None)
        hidden_size = weight.shape[-1] if isinstance(weight, torch.Tensor) else None
    tensor = next(iter(block.parameters()), None)
    if tensor is None or hidden_size is None or tensor.device.type == "meta":
        # Nothing to run (weights never materialised): assume the usual plain tensor.
        warnings.warn(
            f"{type(block).__name__}: cannot probe its return type; assuming a plain tensor",
            RuntimeWarning,
            stacklevel=3,
        )
        return 1
    dtype = tensor.dtype if tensor.is_floating_point() else torch.float32
    x = torch.zeros(1, 1, hidden_size, dtype=dtype, device=tensor.device)
    with torch.no_grad():
        out = block(x)
    return len(out) if isinstance(out, tuple) else 1


@functools.cache
def _output_collector() -> Any:
    """transformers' record of the outputs the running forward collects, if available.

    Private API (transformers 5.x: a ContextVar-like `.get()` returning a dict keyed by
    output name, or None). Without it the router-logits check is skipped, and a model asking
    for router logits fails inside transformers instead (IndexError in the aux loss).
    """
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return None
    return _active_collector if callable(getattr(_active_collector, "get", None)) else None


def _install_output_hooks(model: nn.Module, block_names: list[str]) -> None:
    try:
        from transformers import PreTrainedModel
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:
        return  # older transformers, or not a transformers model: nothing installed lazily
    # The hooks are installed by the model whose forward records outputs, the innermost
    # PreTrainedModel around the layers (MixtralModel, not MixtralForCausalLM); installing
    # from an outer one would hook the inner one's modules a second time.
    owners: dict[int, PreTrainedModel] = {}
    for name in block_names:
        parts = name.split(".")
        for n in range(len(parts) - 1, -1, -1):
            owner = model.get_submodule(".".join(parts[:n]))
            if isinstance(owner, PreTrainedModel):
                owners[id(owner)] = owner
                break
    for owner in owners.values():
        maybe_install_capturing_hooks(owner)
