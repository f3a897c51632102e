"""The world config: which model is served, how it routes, and which worker holds which experts.

Parsed once (`load_config`) into frozen pydantic models and passed down; nothing
below the CLI reads YAML or the environment. Validation errors become a
`ConfigError` whose message names the field path and the expected value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moe_serve.errors import ConfigError

DType = Literal["float32", "bfloat16", "float16"]
Activation = Literal["gelu", "relu", "silu", "tanh"]
ExpertKind = Literal["mlp", "glu"]

_ADDRESS = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})$")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
_ACTIVATION_ALIASES = {"swish": "silu"}
_FIELD_PREFIX = re.compile(r"^([a-z_]+)?(\[\d+\])*: ")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def parse_address(address: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:port") or raise ValueError naming the expected form."""
    m = _ADDRESS.match(address)
    if m is None or not 0 < int(m["port"]) < 65536:
        raise ValueError(f"expected 'host:port' with port 1..65535, got {address!r}")
    return m["host"], int(m["port"])


class ModelConfig(_Frozen):
    """Model dimensions and expert kind; without a checkpoint, weights are seeded random."""

    checkpoint: str | None = None
    hidden_size: int = Field(512, gt=0)
    expert_ffn_size: int = Field(2048, gt=0)
    num_experts: int = Field(8, gt=0)
    top_k: int = Field(2, gt=0)
    expert_kind: ExpertKind = "mlp"
    activation: Activation = "gelu"
    moe_layers: tuple[Annotated[int, Field(ge=0)], ...] = (0,)
    dtype: DType = "float32"
    seed: int = 0

    @field_validator("activation", mode="before")
    @classmethod
    def _alias(cls, v: Any) -> Any:
        return _ACTIVATION_ALIASES.get(v, v) if isinstance(v, str) else v

    @field_validator("moe_layers")
    @classmethod
    def _layers(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v:
            raise ValueError("expected at least one MoE layer index")
        if len(set(v)) != len(v):
            raise ValueError(f"expected distinct layer indices, got {list(v)}")
        return tuple(sorted(v))

    @model_validator(mode="after")
    def _checks(self) -> ModelConfig:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k: {self.top_k} exceeds num_experts={self.num_experts}")
        if self.checkpoint is not None:
            raise ValueError(
                "checkpoint: loading Hugging Face checkpoints is not available in this version; "
                "remove the key to serve a synthetic model"
            )
        return self


class RoutingConfig(_Frozen):
    """Gate behaviour: score function, top-k renormalisation, per-expert capacity."""

    scoring: Literal["softmax", "sigmoid"] = "softmax"
    normalize_topk: bool = True
    capacity_factor: float | None = Field(None, gt=0)


class MasterConfig(_Frozen):
    """Where the master listens, where its gates run, and its request limits."""

    listen: str = "0.0.0.0:50051"
    metrics_port: int | None = Field(9400, ge=1, lt=65536)
    device: str = "cpu"
    max_request_tokens: int = Field(65536, gt=0)
    # gRPC message limit for requests and worker replies (gRPC's maximum is 2 GiB - 1).
    max_message_bytes: int = Field((1 << 31) - 1, gt=0, le=(1 << 31) - 1)
    # Bound on each worker call when the client sets no deadline.
    worker_timeout_s: float = Field(30.0, gt=0)

    _listen = field_validator("listen")(lambda v: (parse_address(v), v)[1])

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return _check_device_syntax(v)


class BatchingConfig(_Frozen):
    """Worker dynamic batching: merge Forward calls arriving within max_delay_us."""

    max_delay_us: int = Field(200, ge=0, le=1_000_000)
    max_batch_tokens: int = Field(16384, gt=0)


def _check_device_syntax(v: str) -> str:
    if not _DEVICE.match(v):
        raise ValueError(f"expected 'cpu', 'cuda' or 'cuda:N', got {v!r}")
    return v


class WorkerConfig(_Frozen):
    """One expert worker: its address, devices and experts (all layers, or per layer)."""

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    address: str
    listen: str | None = None
    metrics_port: int | None = Field(None, ge=1, lt=65536)
    devices: tuple[str, ...] = ("cpu",)
    # A list (same experts on every layer) or {layer: [experts]}; see _experts.
    experts: tuple[int, ...] | Mapping[int, tuple[int, ...]]

    _address = field_validator("address", "listen")(
        lambda v: v if v is None else (parse_address(v), v)[1]
    )

    @field_validator("experts", mode="plain")
    @classmethod
    def _experts(cls, v: Any) -> tuple[int, ...] | Mapping[int, tuple[int, ...]]:
        if isinstance(v, Mapping):
            # Read-only view: the config is frozen all the way down.
            return MappingProxyType(
                {_index(k, "a layer index"): _expert_ids(ids, f"[{k}]") for k, ids in v.items()}
            )
        return _expert_ids(v)

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("expected at least one device")
        for d in v:
            _check_device_syntax(d)
        cuda = [d for d in v if d != "cpu"]
        if len(set(cuda)) != len(cuda):
            raise ValueError(f"expected distinct CUDA devices, got {list(v)}")
        return v

    @property
    def listen_address(self) -> str:
        """Address to bind: `listen`, else every interface on `address`'s port."""
        return self.listen or f"0.0.0.0:{parse_address(self.address)[1]}"

    def experts_on(self, layer: int) -> tuple[int, ...]:
        """Expert ids this worker holds on `layer` (may be empty)."""
        if isinstance(self.experts, Mapping):
            return tuple(self.experts.get(layer, ()))
        return tuple(self.experts)


class WorldConfig(_Frozen):
    """The whole deployment: model, routing, master, batching and workers."""

    model: ModelConfig = ModelConfig()
    routing: RoutingConfig = RoutingConfig()
    master: MasterConfig = MasterConfig()
    batching: BatchingConfig = BatchingConfig()
    workers: tuple[WorkerConfig, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _placement(self) -> WorldConfig:
        _check_unique(self.workers)
        layers, n = set(self.model.moe_layers), self.model.num_experts
        for i, w in enumerate(self.workers):
            per_layer = w.experts if isinstance(w.experts, Mapping) else {}
            for layer in per_layer:
                if layer not in layers:
                    raise ValueError(
                        f"workers[{i}].experts: layer {layer} is not in model.moe_layers "
                        f"{sorted(layers)}"
                    )
            for layer in self.model.moe_layers:
                bad = [e for e in w.experts_on(layer) if e >= n]
                if bad:
                    raise ValueError(
                        f"workers[{i}].experts: expert {bad[0]} on layer {layer} is out of "
                        f"range; expected 0..{n - 1} (model.num_experts={n})"
                    )
        largest = self.master.max_request_tokens * self.model.hidden_size * 4  # float32 input
        if largest > self.master.max_message_bytes:
            raise ValueError(
                f"master.max_request_tokens: {self.master.max_request_tokens} tokens x "
                f"hidden_size {self.model.hidden_size} x 4 bytes = {largest} bytes exceeds "
                f"master.max_message_bytes={self.master.max_message_bytes}; lower the token limit"
            )
        for layer in self.model.moe_layers:
            placed = {e for w in self.workers for e in w.experts_on(layer)}
            missing = sorted(set(range(n)) - placed)
            if missing:
                raise ValueError(
                    f"workers[*].experts: expert {missing[0]} of layer {layer} is placed on no "
                    f"worker (unplaced on layer {layer}: {missing})"
                )
        return self

    def worker(self, worker_id: str) -> WorkerConfig:
        """The worker with this id, or ConfigError listing the known ids."""
        for w in self.workers:
            if w.id == worker_id:
                return w
        known = ", ".join(w.id for w in self.workers)
        raise ConfigError(
            f"--worker-id: {worker_id!r} is not a worker of the config; known: {known}"
        )


def _index(v: Any, what: str, where: str = "") -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{where}{': ' if where else ''}expected {what} >= 0, got {v!r}")
    return v


def _expert_ids(v: Any, where: str = "") -> tuple[int, ...]:
    if not isinstance(v, (list, tuple)):
        raise ValueError(
            f"{where}{': ' if where else ''}expected a list of expert ids or a mapping "
            f"{{layer: [expert ids]}}, got {v!r}"
        )
    ids = tuple(_index(e, "an expert id", f"{where}[{i}]") for i, e in enumerate(v))
    if len(set(ids)) != len(ids):
        raise ValueError(f"expected distinct expert ids, got {list(ids)}")
    return ids


def _check_unique(workers: tuple[WorkerConfig, ...]) -> None:
    for attr in ("id", "address"):
        seen: dict[str, int] = {}
        for i, w in enumerate(workers):
            v = getattr(w, attr)
            if v in seen:
                raise ValueError(
                    f"workers[{i}].{attr}: duplicate {v!r} (also workers[{seen[v]}].{attr}); "
                    f"expected each worker to have a distinct {attr}"
                )
            seen[v] = i


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not part.startswith(("tuple[", "dict[", "function-")):
            out += f".{part}" if out else part
    return out


def parse_config(data: Any, source: str = "<config>") -> WorldConfig:
    """Validate a decoded YAML mapping; raise ConfigError naming each bad field."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: expected a mapping at the top level, got {type(data).__name__}"
        )
    try:
        return WorldConfig.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        lines = []
        for err in errors:
            where = _loc(err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "too_short" and len(errors) > 1:
                continue  # an echo of the failing items themselves
            if where and _FIELD_PREFIX.match(msg):  # a validator naming a field below `where`
                lines.append(f"{where}{'' if msg.startswith('[') else '.'}{msg}")
            else:
                lines.append(f"{where}: {msg}" if where else msg)
        uniq = list(dict.fromkeys(lines))
        raise ConfigError(f"{source}: invalid world config:\n  " + "\n  ".join(uniq)) from None


def load_config(path: str | Path) -> WorldConfig:
    """Read and validate a world config YAML file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {str(p)!r}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    return parse_config(data, str(p))


def check_devices_exist(devices: tuple[str, ...], field: str) -> None:
    """Raise ConfigError if a CUDA device in `devices` does not exist on this machine."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for i, d in enumerate(devices):
        if d == "cpu":
            continue
        index = int(d.split(":")[1]) if ":" in d else 0
        if index >= count:
            raise ConfigError(
                f"{field}[{i}]: device {d!r} does not exist on this machine "
                f"({count} CUDA device(s) visible); expected one of "
                f"{['cpu'] + [f'cuda:{k}' for k in range(count)]}"
            )
