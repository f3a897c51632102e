"""offload_moe / restore_moe on tiny transformers models of every supported family.

The client here is `LocalBlocks`, an in-process stand-in for `MoEClient` that runs deep copies
of the model's original MoE blocks, so these tests check the plumbing (which blocks are found,
what the replacement passes and returns, generate, freeing, restoring) without a server.
`make_client` is the one place the stand-in is built, and `check_offload` takes any client
with `infer(x, layer=...)`: for a real `moe-serve up` serving the same checkpoint
(`hf_models.save_model`), pass a `MoEClient` instead.
"""

from __future__ import annotations

import copy
import gc
import weakref
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import transformers
from torch import nn

from moe_serve.integrations.hf import RemoteMoEBlock, find_moe_blocks, offload_moe, restore_moe
from tests import hf_models

FAMILIES = (*hf_models.FAMILIES, "gpt_oss")

# Sparse-MoE decoder layers per family, as hf_models (and _build_gpt_oss) configure them;
# written out rather than detected, so that detection is what is tested.
EXPECTED_LAYERS: dict[str, list[int]] = {
    "mixtral": [0, 1],
    "qwen2_moe": [0, 2],  # layer 1 dense (mlp_only_layers)
    "qwen3_moe": [0, 2],
    "olmoe": [0, 1],
    "deepseek_v2": [1, 2],  # layer 0 dense (first_k_dense_replace)
    "deepseek_v3": [1, 2],
    "gpt_oss": [0, 1],
}
REL_TOL = 1e-5
NEW_TOKENS = 16


def _build_gpt_oss(seed: int) -> Any:
    """A tiny gpt-oss (hf_models has no gpt-oss): 2 layers, 8 experts, top-2, float32."""
    config = transformers.GptOssConfig(
        vocab_size=128,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=2,
        intermediate_size=32,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        # The default YaRN scaling assumes a 4k original context; plain RoPE suits 128.
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
    )
    model = transformers.GptOssForCausalLM(config).to(torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else hf_models.WEIGHT_STD * noise)
    return model.eval()


def build(family: str, seed: int = 0) -> Any:
    if family == "gpt_oss":
        return _build_gpt_oss(seed)
    return hf_models.build_model(family, seed)


def block_at(model: nn.Module, layer: int) -> nn.Module:
    # In transformers 5.x every supported family keeps its MoE block at layers[i].mlp
    # (Mixtral too: `block_sparse_moe` survives only in the checkpoint's key names).
    return model.model.layers[layer].mlp


class LocalBlocks:
    """Stand-in for MoEClient: runs deep copies of a model's original MoE blocks.

    Like the service, it sees tokens, not sequences: x [..., H] is run as [1, T, H].
    `calls` records (layer, tokens) per call.
    """

    def __init__(self, model: nn.Module, layers: list[int]) -> None:
        self.blocks = {i: copy.deepcopy(block_at(model, i)) for i in layers}
        self.calls: list[tuple[int, int]] = []

    def infer(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        self.calls.append((layer, tokens.shape[0]))
        with torch.no_grad():
            out = self.blocks[layer](tokens.unsqueeze(0))
        if isinstance(out, tuple):  # gpt-oss: (hidden_states, router_scores)
            out = out[0]
        return out.reshape(x.shape)


def make_client(reference: nn.Module, family: str) -> Any:
    """The client the checks run against; swap in MoEClient(address) for a served model."""
    return LocalBlocks(reference, EXPECTED_LAYERS[family])


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 7 tokens, the second left-padded by 2 (as generate batches them)."""
    ids = torch.randint(2, 128, (2, 7), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    return ids, mask


def _logits(model: nn.Module, **kw: Any) -> torch.Tensor:
    ids, mask = _inputs()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def _generate(model: Any) -> torch.Tensor:
    ids, mask = _inputs()
    # min_new_tokens: eos cannot end a sequence early, so every run has NEW_TOKENS steps.
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _numel(tensors: Any) -> int:
    return sum(t.numel() for t in tensors)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def reference(family: str) -> Any:
    """The untouched model; tests offload a deep copy."""
    return build(family)


@pytest.fixture(scope="module")
def reference_logits(reference: nn.Module) -> torch.Tensor:
    return _logits(reference)


@pytest.fixture(scope="module")
def reference_ids(reference: Any) -> torch.Tensor:
    return _generate(reference)


# --- per family --------------------------------------------------------------------------


def test_finds_the_sparse_moe_blocks(family: str, reference: nn.Module) -> None:
    blocks = find_moe_blocks(reference)
    assert list(blocks) == EXPECTED_LAYERS[family]
    assert blocks == {i: f"model.layers.{i}.mlp" for i in EXPECTED_LAYERS[family]}


def check_offload(
    reference: Any,
    client: Any,
    layers: list[int],
    *,
    free_local_experts: bool = False,
    reference_logits: torch.Tensor | None = None,
    reference_ids: torch.Tensor | None = None,
) -> Any:
    """Offload a copy of `reference` onto `client`: the layers replaced, the logits within
    REL_TOL, greedy generate's ids identical. Returns the offloaded copy.

    Works with any client: the stand-in here, or a MoEClient of a `moe-serve up` serving
    `reference`'s checkpoint (hf_models.save_model).
    """
    model = copy.deepcopy(reference)
    assert offload_moe(model, client, free_local_experts=free_local_experts) == layers
    for i in layers:
        assert isinstance(block_at(model, i), RemoteMoEBlock)
        assert block_at(model, i).layer == i
    want_logits = _logits(reference) if reference_logits is None else reference_logits
    assert _rel(_logits(model), want_logits) <= REL_TOL
    want_ids = _generate(reference) if reference_ids is None else reference_ids
    assert torch.equal(_generate(model), want_ids)
    return model


def test_offloaded_model_matches_local(
    family: str,
    reference: Any,
    reference_logits: torch.Tensor,
    reference_ids: torch.Tensor,
) -> None:
    client = make_client(reference, family)
    layers = EXPECTED_LAYERS[family]
    check_offload(
        reference, client, layers, reference_logits=reference_logits, reference_ids=reference_ids
    )
    # What the blocks were sent: [B, S, H] flattened to B * S = 14 tokens for the full
    # forward, then generate's prefill (14 tokens) and a decode pass per further new token
    # with S = 1 (2 tokens), each pass calling every MoE layer in order.
    per_pass = len(layers)
    assert [layer for layer, _ in client.calls] == layers * (1 + NEW_TOKENS)
    assert [t for _, t in client.calls] == [14] * 2 * per_pass + [2] * (NEW_TOKENS - 1) * per_pass


def test_replacement_returns_what_the_block_returned(family: str, reference: nn.Module) -> None:
    layer = EXPECTED_LAYERS[family][0]
    original = block_at(reference, layer)
    model = copy.deepcopy(reference)
    offload_moe(model, make_client(reference, family), layers=[layer])
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = original(x), block_at(model, layer)(x)
    assert type(got) is type(want)
    if isinstance(want, tuple):  # gpt-oss: (hidden_states, router_scores)
        assert len(got) == len(want) and got[1] is None
        want, got = want[0], got[0]
    assert got.shape == want.shape and got.dtype == want.dtype
    assert _rel(got, want) <= REL_TOL


def test_free_local_experts_drops_the_weights(
    family: str, reference: nn.Module, reference_logits: torch.Tensor
) -> None:
    model = copy.deepcopy(reference)
    layers = EXPECTED_LAYERS[family]
    moe_params = _numel(p for i in layers for p in block_at(model, i).parameters())
    before = _numel(model.parameters())
    expert_weight = weakref.ref(next(block_at(model, layers[0]).experts.parameters()))

    offload_moe(model, make_client(reference, family), free_local_experts=True)

    assert _numel(model.parameters()) == before - moe_params
    prefixes = tuple(f"model.layers.{i}.mlp." for i in layers)
    assert not any(name.startswith(prefixes) for name, _ in model.named_parameters())
    gc.collect()
    assert expert_weight() is None  # nothing else holds the experts: the memory is freed
    assert all(block_at(model, i).local is None for i in layers)
    assert _rel(_logits(model), reference_logits) <= REL_TOL


def test_restore_moe_puts_the_original_blocks_back(
    family: str, reference: nn.Module, reference_logits: torch.Tensor
) -> None:
    model = copy.deepcopy(reference)
    originals = {i: block_at(model, i) for i in EXPECTED_LAYERS[family]}
    before = _logits(model)
    offload_moe(model, make_client(reference, family))
    # The kept blocks are not submodules: the model lists only what runs locally.
    kept = _numel(p for b in originals.values() for p in b.parameters())
    assert _numel(model.parameters()) == _numel(reference.parameters()) - kept

    restore_moe(model)
    assert all(block_at(model, i) is b for i, b in originals.items())
    assert not any(isinstance(m, RemoteMoEBlock) for m in model.modules())
    assert torch.equal(_logits(model), before)
    assert torch.equal(before, reference_logits)


# --- behaviour, on one or two families ---------------------------------------------------


def test_layers_selects_and_validates() -> None:
    reference = build("deepseek_v3")
    model = copy.deepcopy(reference)
    client = make_client(reference, "deepseek_v3")
    assert offload_moe(model, client, layers=[2]) == [2]
    assert not isinstance(block_at(model, 1), RemoteMoEBlock)
    with pytest.raises(ValueError, match="layer 2 is already offloaded"):
        offload_moe(model, client, layers=[2])
    with pytest.raises(ValueError, match=r"layer 0 has no sparse-MoE block; have \[1\]"):
        offload_moe(model, client, layers=[0])  # dense (first_k_dense_replace)
    assert offload_moe(model, client) == [1]  # the rest
    with pytest.raises(ValueError, match=r"no sparse-MoE block found \(layers \[1, 2\] are"):
        offload_moe(model, client)
    restore_moe(model)  # restores blocks offloaded in two calls
    assert find_moe_blocks(model) == find_moe_blocks(reference)


def test_dense_model_has_no_blocks() -> None:
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    with pytest.raises(ValueError, match="LlamaForCausalLM: no sparse-MoE block found"):
        offload_moe(transformers.LlamaForCausalLM(config), LocalBlocks(nn.Module(), []))


def test_async_or_infer_less_clients_are_refused() -> None:
    model = build("mixtral")

    class AsyncClient:
        async def infer(self, x: torch.Tensor, layer: int) -> torch.Tensor:
            return x

    with pytest.raises(TypeError, match="pass a blocking MoEClient"):
        offload_moe(model, AsyncClient())
    with pytest.raises(TypeError, match=r"infer\(x, layer=...\)"):
        offload_moe(model, object())
    assert not any(isinstance(m, RemoteMoEBlock) for m in model.modules())


def test_restore_after_free_raises_and_changes_nothing() -> None:
    reference = build("qwen2_moe")
    model = copy.deepcopy(reference)
    client = make_client(reference, "qwen2_moe")
    offload_moe(model, client, layers=[0])
    offload_moe(model, client, layers=[2], free_local_experts=True)
    with pytest.raises(RuntimeError, match=r"layers \[2\] were offloaded with free_local"):
        restore_moe(model)
    assert isinstance(block_at(model, 0), RemoteMoEBlock)  # not half-restored
    restore_moe(nn.Linear(2, 2))  # nothing offloaded: a no-op


def test_router_logits_are_refused_while_offloaded_and_back_after_restore() -> None:
    reference = build("mixtral")
    model = copy.deepcopy(reference)
    offload_moe(model, make_client(reference, "mixtral"))
    with pytest.raises(RuntimeError, match="output_router_logits is not available"):
        _logits(model, output_router_logits=True)
    model.config.output_router_logits = True
    with pytest.raises(RuntimeError, match="output_router_logits is not available"):
        _logits(model)
    model.config.output_router_logits = False

    # transformers hooks the routers lazily, at the first call that asks (the one above, made
    # while offloaded); offload_moe installed the hooks first, so restored routers report.
    restore_moe(model)
    ids, mask = _inputs()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
        want = reference(input_ids=ids, attention_mask=mask, output_router_logits=True)
    assert len(got.router_logits) == len(want.router_logits) == 2
    assert all(
        torch.equal(g, w) for g, w in zip(got.router_logits, want.router_logits, strict=True)
    )


def test_inference_only() -> None:
    reference = build("olmoe")
    model = copy.deepcopy(reference)
    offload_moe(model, make_client(reference, "olmoe"))
    ids, mask = _inputs()
    model.train()
    with pytest.raises(RuntimeError, match="inference-only"):
        model(input_ids=ids, attention_mask=mask)
    with torch.no_grad():  # training mode without autograd is still inference
        model(input_ids=ids, attention_mask=mask)
    model.eval()
    with pytest.warns(RuntimeWarning, match="return no gradient"):
        out = model(input_ids=ids, attention_mask=mask).logits
    assert _rel(out.detach(), _logits(reference)) <= REL_TOL


def test_deepcopy_shares_the_client_and_copies_the_kept_block() -> None:
    reference = build("deepseek_v2")
    model = copy.deepcopy(reference)
    client = make_client(reference, "deepseek_v2")
    offload_moe(model, client)
    twin = copy.deepcopy(model)  # a MoEClient (a grpc channel) cannot be copied
    assert block_at(twin, 1).client is client
    assert block_at(twin, 1).local is not block_at(model, 1).local
    restore_moe(twin)
    assert torch.equal(_logits(twin), _logits(reference))


def test_kept_block_follows_model_dtype() -> None:
    reference = build("qwen3_moe")
    model = copy.deepcopy(reference)
    offload_moe(model, make_client(reference, "qwen3_moe"))
    model.to(torch.bfloat16)  # reaches the kept blocks too, though they are not submodules
    restore_moe(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(_logits(model), _logits(reference.to(torch.bfloat16)))


class InfoBlocks(LocalBlocks):
    """LocalBlocks with MoEClient's info(): hidden size, served layers, token limit."""

    def __init__(
        self,
        model: nn.Module,
        layers: list[int],
        served: tuple[int, ...] | None = None,
        **info: Any,
    ) -> None:
        super().__init__(model, layers)
        served = tuple(layers) if served is None else served
        info = {"hidden_size": 64, "layers": served, "max_request_tokens": 5, **info}
        self._info = SimpleNamespace(**info)

    def info(self) -> SimpleNamespace:
        return self._info


def test_service_info_is_checked_and_long_calls_split() -> None:
    reference = build("mixtral")
    model = copy.deepcopy(reference)
    with pytest.raises(ValueError, match="hidden_size is 32, the model's is 64"):
        offload_moe(model, InfoBlocks(reference, [0, 1], hidden_size=32))
    with pytest.raises(ValueError, match=r"does not serve layers \[1\]"):
        offload_moe(model, InfoBlocks(reference, [0, 1], served=(0,)))
    assert not any(isinstance(m, RemoteMoEBlock) for m in model.modules())

    client = InfoBlocks(reference, [0, 1])
    offload_moe(model, client)
    assert _rel(_logits(model), _logits(reference)) <= REL_TOL
    # 14 tokens per pass against a limit of 5: 5 + 5 + 4 per layer.
    assert [t for _, t in client.calls] == [5, 5, 4] * 2


def test_structural_detection_beyond_known_families() -> None:
    """A block class offload_moe does not name: found by its children, tuple return probed."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.router = nn.Linear(8, 4)
            self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            w = self.router(x).softmax(-1)
            y = sum(w[..., e : e + 1] * ex(x) for e, ex in enumerate(self.experts))
            return y, w

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(8, 8), Block()])

    class Client:
        def __init__(self, block: nn.Module) -> None:
            self.block = copy.deepcopy(block)

        def infer(self, x: torch.Tensor, layer: int) -> torch.Tensor:
            return self.block(x)[0]

    toy = Toy()
    assert find_moe_blocks(toy) == {1: "blocks.1"}
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = toy.blocks[1](x)[0]
        offload_moe(toy, Client(toy.blocks[1]))
        got = toy.blocks[1](x)
    assert isinstance(got, tuple) and len(got) == 2 and got[1] is None
    assert torch.allclose(got[0], want)


@pytest.mark.e2e
@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_offload_to_a_real_service_matches_local_and_generates_identically(
    cluster_factory: Any, tmp_path: Any, family: str
) -> None:
    from moe_serve.client import MoEClient
    from tests.conftest import world

    reference = build(family, seed=3)
    path = hf_models.save_model(reference, tmp_path / family)
    config = world()
    config["model"] = {"checkpoint": str(path)}
    cluster = cluster_factory(config)
    with MoEClient(cluster.address) as client:
        model = check_offload(reference, client, EXPECTED_LAYERS[family], free_local_experts=True)
    remote_params = sum(p.numel() for p in model.parameters())
    assert remote_params < sum(p.numel() for p in reference.parameters())
