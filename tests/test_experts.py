"""Expert maths, the grouped per-worker forward, synthetic weights, and the worker engine."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from moe_serve.config import ModelConfig, RoutingConfig, WorkerConfig
from moe_serve.errors import InvalidRequestError
from moe_serve.layer.experts import ExpertStack, expert_forward, grouped_forward
from moe_serve.weights import GLU_KEYS, MLP_KEYS, ExpertWeights, SyntheticWeights
from moe_serve.worker.engine import WorkerEngine

H, F, E = 16, 32, 6
ATOL = 1e-6
KINDS = ["mlp", "glu"]
ACTIVATIONS = ["gelu", "relu", "silu", "tanh"]

SCALAR_ACT: dict[str, Callable[[float], float]] = {
    "gelu": lambda v: 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))),
    "relu": lambda v: max(v, 0.0),
    "silu": lambda v: v / (1.0 + math.exp(-v)),
    "tanh": math.tanh,
}


def synthetic_expert(m: ModelConfig, layer: int, expert: int) -> ExpertWeights:
    return SyntheticWeights(m, RoutingConfig()).experts(layer, [expert])[0]


def synthetic_router(m: ModelConfig, layer: int) -> torch.Tensor:
    return SyntheticWeights(m, RoutingConfig()).router(layer)


def model_config(kind: str = "mlp", activation: str = "gelu", **kw: object) -> ModelConfig:
    return ModelConfig(
        hidden_size=H,
        expert_ffn_size=F,
        num_experts=E,
        top_k=2,
        expert_kind=kind,
        activation=activation,
        **kw,  # type: ignore[arg-type]
    )


def matvec(w: list[list[float]], v: list[float]) -> list[float]:
    return [sum(a * b for a, b in zip(row, v, strict=True)) for row in w]


def naive_expert(
    kind: str, activation: str, w: dict[str, torch.Tensor], x: torch.Tensor
) -> list[list[float]]:
    """mlp: fc2 act(fc1 x + b1) + b2;  glu: down(act(gate x) * up x); one token at a time."""
    act = SCALAR_ACT[activation]
    ws = {k: v.tolist() for k, v in w.items()}
    out = []
    for xt in x.tolist():
        if kind == "mlp":
            h = [act(v + b) for v, b in zip(matvec(ws["fc1"], xt), ws["fc1_bias"], strict=True)]
            y = [v + b for v, b in zip(matvec(ws["fc2"], h), ws["fc2_bias"], strict=True)]
        else:
            gate, up = matvec(ws["gate"], xt), matvec(ws["up"], xt)
            y = matvec(ws["down"], [act(g) * u for g, u in zip(gate, up, strict=True)])
        out.append(y)
    return out


def stack_of(kind: str, activation: str, experts: list[int]) -> ExpertStack:
    """A float32 CPU stack of synthetic experts of layer 0."""
    m = model_config(kind, activation)
    weights = [synthetic_expert(m, 0, e) for e in experts]
    return ExpertStack(kind, activation, weights, torch.device("cpu"), torch.float32)


def one_at_a_time(
    stack: ExpertStack,
    hidden: torch.Tensor,
    token: list[int],
    slot: list[int],
    weight: list[float],
) -> torch.Tensor:
    """Each pair through its expert alone, weighted and summed into its token's row."""
    out = torch.zeros(hidden.shape, dtype=torch.float32)
    for t, s, w in zip(token, slot, weight, strict=True):
        y = expert_forward(stack.kind, stack.activation, stack.expert(s), hidden[t : t + 1])
        out[t] += w * y[0]
    return out


# --- expert_forward ----------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_expert_forward_matches_the_formula(kind: str, activation: str) -> None:
    # float64 end to end, so the comparison checks the formula rather than rounding
    w = {k: v.double() for k, v in synthetic_expert(model_config(kind), 0, 1).items()}
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = expert_forward(kind, activation, w, x)
    assert y.shape == (3, H)
    expected = torch.tensor(naive_expert(kind, activation, w, x), dtype=torch.float64)
    torch.testing.assert_close(y, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_expert_forward_on_zero_tokens_is_empty(kind: str) -> None:
    w = synthetic_expert(model_config(kind), 0, 0)
    assert expert_forward(kind, "relu", w, torch.zeros(0, H)).shape == (0, H)


# --- grouped_forward ---------------------------------------------------------------------------

# 5 tokens, 4 experts in the stack; slot 2 gets no pairs, token 1 has three pairs,
# token 4 has none, and slots are deliberately unsorted.
TOKEN = [1, 0, 3, 1, 2, 1, 0]
SLOT = [3, 1, 0, 0, 3, 1, 0]
WEIGHT = [0.5, 0.25, 1.0, 0.3, 0.7, 0.2, 0.75]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_grouped_forward_equals_experts_one_at_a_time(kind: str, activation: str) -> None:
    stack = stack_of(kind, activation, [4, 0, 5, 2])
    hidden = torch.randn(5, H, generator=torch.Generator().manual_seed(1))
    out = grouped_forward(
        stack, hidden, torch.tensor(TOKEN), torch.tensor(SLOT), torch.tensor(WEIGHT)
    )
    assert out.dtype == torch.float32 and out.shape == (5, H)
    expected = one_at_a_time(stack, hidden, TOKEN, SLOT, WEIGHT)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)


def test_grouped_forward_leaves_tokens_without_pairs_at_zero() -> None:
    stack = stack_of("mlp", "gelu", [0, 1, 2, 3])
    hidden = torch.randn(5, H)
    out = grouped_forward(
        stack, hidden, torch.tensor(TOKEN), torch.tensor(SLOT), torch.tensor(WEIGHT)
    )
    assert torch.equal(out[4], torch.zeros(H))


def test_grouped_forward_with_no_pairs_is_all_zero() -> None:
    stack = stack_of("glu", "silu", [0, 1])
    empty = torch.zeros(0, dtype=torch.int64)
    out = grouped_forward(stack, torch.randn(3, H), empty, empty, torch.zeros(0))
    assert torch.equal(out, torch.zeros(3, H))


def test_grouped_forward_counts_a_repeated_pair_twice() -> None:
    stack = stack_of("mlp", "relu", [0, 1])
    hidden = torch.randn(2, H)
    token, slot, weight = [0, 0, 1], [1, 1, 0], [0.25, 0.5, 1.0]
    out = grouped_forward(
        stack, hidden, torch.tensor(token), torch.tensor(slot), torch.tensor(weight)
    )
    expected = one_at_a_time(stack, hidden, token, slot, weight)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)


def test_grouped_forward_in_bfloat16_returns_float32() -> None:
    m = model_config("mlp", "gelu")
    weights = [synthetic_expert(m, 0, e) for e in range(3)]
    stack = ExpertStack("mlp", "gelu", weights, torch.device("cpu"), torch.bfloat16)
    hidden = torch.randn(4, H).bfloat16()
    token, slot, weight = [0, 1, 2, 3, 0], [0, 1, 2, 2, 1], [1.0, 0.5, 0.5, 0.25, 0.25]
    out = grouped_forward(
        stack, hidden, torch.tensor(token), torch.tensor(slot), torch.tensor(weight)
    )
    assert out.dtype == torch.float32
    expected = one_at_a_time(stack, hidden, token, slot, weight)
    torch.testing.assert_close(out, expected, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_grouped_gemm_path_equals_the_per_expert_loop(kind: str, dtype: torch.dtype) -> None:
    m = model_config(kind, "silu")
    weights = [synthetic_expert(m, 0, e) for e in (4, 0, 5, 2)]
    cpu = torch.device("cpu")
    fast = ExpertStack(kind, "silu", weights, cpu, dtype, grouped_mm=True)
    loop = ExpertStack(kind, "silu", weights, cpu, dtype, grouped_mm=False)
    assert fast.grouped_mm and not loop.grouped_mm
    hidden = torch.randn(5, H, generator=torch.Generator().manual_seed(3)).to(dtype)
    args = (hidden, torch.tensor(TOKEN), torch.tensor(SLOT), torch.tensor(WEIGHT))
    tol = ATOL if dtype == torch.float32 else 2.0**-7  # bf16: one rounding apart at most
    torch.testing.assert_close(
        grouped_forward(fast, *args), grouped_forward(loop, *args), atol=tol, rtol=tol
    )


def test_grouped_gemm_path_handles_experts_without_pairs_and_no_pairs() -> None:
    stack = stack_of("glu", "silu", [0, 1, 2])
    empty = torch.zeros(0, dtype=torch.int64)
    assert torch.equal(
        grouped_forward(stack, torch.randn(3, H), empty, empty, torch.zeros(0)),
        torch.zeros(3, H),
    )
    token, slot = torch.tensor([0, 2]), torch.tensor([2, 2])  # slots 0 and 1 idle
    out = grouped_forward(stack, torch.randn(3, H), token, slot, torch.ones(2))
    assert torch.equal(out[1], torch.zeros(H)) and out[0].abs().sum() > 0


def test_expert_stack_holds_each_expert_in_its_slot() -> None:
    m = model_config("glu")
    stack = stack_of("glu", "gelu", [5, 2])
    assert stack.num_experts == 2
    assert set(stack.weights) == {"gate_up", "down"}  # gate and up fused: one GEMM for both
    for slot, e in enumerate([5, 2]):
        for k, v in synthetic_expert(m, 0, e).items():
            assert torch.equal(stack.expert(slot)[k], v)
    assert stack.nbytes() == 2 * 3 * F * H * 4


# --- synthetic weights -------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "keys"), [("mlp", MLP_KEYS), ("glu", GLU_KEYS)])
def test_synthetic_expert_has_the_kinds_keys_and_shapes(kind: str, keys: tuple[str, ...]) -> None:
    w = synthetic_expert(model_config(kind), 0, 0)
    assert tuple(w) == keys
    shapes = {
        "fc1": (F, H),
        "fc1_bias": (F,),
        "fc2": (H, F),
        "fc2_bias": (H,),
        "gate": (F, H),
        "up": (F, H),
        "down": (H, F),
    }
    for k, v in w.items():
        assert v.shape == shapes[k] and v.dtype == torch.float32


@pytest.mark.parametrize("kind", KINDS)
def test_synthetic_expert_is_a_pure_function_of_seed_layer_expert(kind: str) -> None:
    a = synthetic_expert(model_config(kind), 2, 3)
    b = synthetic_expert(model_config(kind), 2, 3)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("layer", "expert", "seed"),
    [(2, 4, 0), (1, 3, 0), (2, 3, 1)],
    ids=["other-expert", "other-layer", "other-seed"],
)
def test_synthetic_expert_differs_when_any_key_differs(layer: int, expert: int, seed: int) -> None:
    base = synthetic_expert(model_config(seed=0), 2, 3)
    other = synthetic_expert(model_config(seed=seed), layer, expert)
    assert all(not torch.equal(base[k], other[k]) for k in base)


def test_synthetic_expert_does_not_depend_on_other_model_fields() -> None:
    a = synthetic_expert(model_config(activation="relu"), 0, 1)
    b = ModelConfig(hidden_size=H, expert_ffn_size=F, num_experts=8, top_k=1)
    assert all(torch.equal(a[k], v) for k, v in synthetic_expert(b, 0, 1).items())


def test_synthetic_router_is_a_pure_function_of_seed_and_layer() -> None:
    m = model_config()
    assert torch.equal(synthetic_router(m, 0), synthetic_router(m, 0))
    assert synthetic_router(m, 0).shape == (E, H)
    assert not torch.equal(synthetic_router(m, 0), synthetic_router(m, 1))
    assert not torch.equal(synthetic_router(m, 0), synthetic_router(model_config(seed=1), 0))


def test_synthetic_weights_lie_in_the_linear_init_range() -> None:
    w = synthetic_expert(model_config(), 0, 0)
    assert w["fc1"].abs().max() <= 1 / math.sqrt(H)
    assert w["fc2"].abs().max() <= 1 / math.sqrt(F)


# --- WorkerEngine ------------------------------------------------------------------------------


def engine(devices: list[str], experts: list[int], kind: str = "mlp") -> WorkerEngine:
    m = model_config(kind, "silu", moe_layers=(0, 3))
    w = WorkerConfig(
        id="w0", address="localhost:50061", devices=tuple(devices), experts=tuple(experts)
    )
    return WorkerEngine(m, w, SyntheticWeights(m, RoutingConfig()))


def pairs(experts: list[int], tokens: int, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """n random (token, expert, weight) pairs over `experts`, as the wire delivers them."""
    g = torch.Generator().manual_seed(seed)
    token = torch.randint(0, tokens, (n,), generator=g, dtype=torch.int32)
    pick = torch.randint(0, len(experts), (n,), generator=g)
    expert = torch.tensor(experts, dtype=torch.int32)[pick]
    return token, expert, torch.rand(n, generator=g)


@pytest.mark.parametrize("kind", KINDS)
def test_engine_with_two_cpu_stacks_equals_one_stack(kind: str) -> None:
    held = [0, 2, 3, 5]
    one, two = engine(["cpu"], held, kind), engine(["cpu", "cpu"], held, kind)
    assert sum(s is not None for s in two.stacks[3]) == 2
    hidden = torch.randn(7, H, generator=torch.Generator().manual_seed(2))
    token, expert, weight = pairs(held, 7, 20, seed=3)
    for layer in (0, 3):
        a = one.forward(layer, hidden, token, expert, weight)
        b = two.forward(layer, hidden, token, expert, weight)
        torch.testing.assert_close(b, a, atol=ATOL, rtol=ATOL)


def test_engine_forward_equals_naive_weighted_sum_of_synthetic_experts() -> None:
    held = [1, 4, 5]
    eng = engine(["cpu", "cpu"], held)
    hidden = torch.randn(6, H, generator=torch.Generator().manual_seed(4))
    token, expert, weight = pairs(held, 6, 15, seed=5)
    out = eng.forward(3, hidden, token, expert, weight)
    expected = torch.zeros(6, H)
    for t, e, w in zip(token.tolist(), expert.tolist(), weight.tolist(), strict=True):
        ew = synthetic_expert(eng.model, 3, e)
        expected[t] += w * expert_forward("mlp", "silu", ew, hidden[t : t + 1])[0]
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)


def test_engine_forward_returns_on_the_requested_device_in_the_model_dtype() -> None:
    held = [1, 4, 5]
    eng = engine(["cpu"], held)
    hidden = torch.randn(6, H, generator=torch.Generator().manual_seed(4))
    token, expert, weight = pairs(held, 6, 15, seed=5)
    out = eng.forward(3, hidden, token, expert, weight, out_device="meta")
    assert out.device.type == "meta" and out.dtype == eng.dtype and out.shape == (6, H)


def test_engine_holds_the_configured_experts() -> None:
    eng = engine(["cpu", "cpu"], [5, 1, 3])
    assert eng.held(0) == (1, 3, 5)
    assert eng.held(3) == (1, 3, 5)


def validation_error(
    eng: WorkerEngine, tokens: int, token: list[int], expert: list[int], weight: list[float]
) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        eng.validate(
            0,
            tokens,
            torch.tensor(token, dtype=torch.int32),
            torch.tensor(expert, dtype=torch.int32),
            torch.tensor(weight),
        )
    return info.value


@pytest.mark.parametrize("bad_token", [-1, 4, 100])
def test_validate_rejects_out_of_range_tokens(bad_token: int) -> None:
    err = validation_error(engine(["cpu"], [0, 1]), 4, [0, bad_token], [0, 1], [0.5, 0.5])
    assert err.field == "pair_token"
    assert str(err) == "pair_token: values must be in [0, 4)"


def test_validate_rejects_experts_not_held_and_lists_the_held_ones() -> None:
    err = validation_error(engine(["cpu", "cpu"], [4, 0, 2]), 3, [0, 1], [0, 3], [0.5, 0.5])
    assert err.field == "pair_expert"
    assert "not held by worker 'w0' on layer 0" in str(err)
    assert "held: [0, 2, 4]" in str(err)


@pytest.mark.parametrize("bad_expert", [-1, E, 1000])
def test_validate_rejects_experts_outside_the_model(bad_expert: int) -> None:
    err = validation_error(engine(["cpu"], [0, 1]), 2, [0, 1], [0, bad_expert], [0.5, 0.5])
    assert err.field == "pair_expert"
    assert f"values must be in [0, {E})" in str(err)


@pytest.mark.parametrize("bad_weight", [float("nan"), float("inf"), float("-inf")])
def test_validate_rejects_non_finite_weights(bad_weight: float) -> None:
    err = validation_error(engine(["cpu"], [0, 1]), 2, [0, 1], [0, 1], [0.5, bad_weight])
    assert err.field == "pair_weight"
    assert "NaN or Inf" in str(err)


@pytest.mark.parametrize(
    ("expert", "weight"), [([0], [0.5, 0.5]), ([0, 1], [0.5]), ([0, 1, 1], [0.5, 0.5, 0.5])]
)
def test_validate_rejects_mismatched_pair_lengths(expert: list[int], weight: list[float]) -> None:
    err = validation_error(engine(["cpu"], [0, 1]), 2, [0, 1], expert, weight)
    for name in ("pair_expert", "pair_weight"):
        assert name in err.field
    assert f"lengths {len(expert)}/{len(weight)}; expected 2 (one per pair_token)" in str(err)


def test_validate_accepts_well_formed_pairs_and_no_pairs() -> None:
    eng = engine(["cpu", "cpu"], [0, 1, 2])
    token, expert, weight = pairs([0, 1, 2], 4, 10, seed=0)
    eng.validate(0, 4, token, expert, weight)
    empty = torch.zeros(0, dtype=torch.int32)
    eng.validate(0, 0, empty, empty, torch.zeros(0))
