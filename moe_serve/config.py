"""The world config: which model is served, how it routes, and which worker holds which experts.

Parsed once (`load_config`) into frozen pydantic models and passed down; nothing
below the CLI reads YAML or the environment. Validation errors become a
`ConfigError` whose message names the field path and the expected value.
"""

from __future__ import annotations

import ipaddress
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
_HOST_NAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})$")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
_ACTIVATION_ALIASES = {"swish": "silu"}
_FIELD_PREFIX = re.compile(r"^([a-z_]+)?(\[\d+\])*: ")

# gRPC's largest message: its length travels as a signed 32-bit integer.
GRPC_MAX_MESSAGE_BYTES = (1 << 31) - 1
# What a derived message limit allows beyond the tokens' rows: scalar fields, tensor headers
# and alignment padding (< 1 KiB), and GetInfo replies, which list every expert of every layer
# on every worker (60 layers x 256 experts x 2 replicas: ~70 KiB).
MESSAGE_SLACK_BYTES = 1 << 20


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def parse_address(address: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:port") or raise ValueError naming the expected form."""
    m = _ADDRESS.match(address)
    if m is None or not 0 < int(m["port"]) < 65536:
        raise ValueError(f"expected 'host:port' with port 1..65535, got {address!r}")
    return m["host"], int(m["port"])


def bind_host(address: str) -> str:
    """The host of "host:port" as a socket binds it: "[::1]:50051" -> "::1"."""
    return parse_address(address)[0].strip("[]")


def parse_host(host: str) -> str:
    """A host name or IP address to bind (IPv6 bare or in brackets: "::1", "[::1]"), returned
    without brackets; ValueError naming the expected form otherwise."""
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        address = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        if not bracketed and _HOST_NAME.match(host):
            return host
    else:
        if not bracketed or address.version == 6:
            return host[1:-1] if bracketed else host
    raise ValueError(
        f"expected a host name or an IP address (IPv6 as '::1' or '[::1]'), got {host!r}"
    )


class ModelConfig(_Frozen):
    """Model dimensions and expert kind.

    With `checkpoint`, `parse_config` fills these from the checkpoint's config.json
    (moe_serve.families); without one, weights are seeded random.
    """

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
    # Shared experts (always-on GLU experts run on the master); 0: none.
    shared_expert_ffn_size: int = Field(0, ge=0)
    # Qwen2-MoE style: scale the shared experts' output by sigmoid(x @ shared_gate.T).
    shared_expert_gate: bool = False

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
        if self.shared_expert_gate and not self.shared_expert_ffn_size:
            raise ValueError("shared_expert_gate: needs shared_expert_ffn_size > 0")
        return self


class RoutingConfig(_Frozen):
    """Gate behaviour: scores, expert groups, top-k renormalisation and scaling, capacity."""

    scoring: Literal["softmax", "sigmoid"] = "softmax"
    normalize_topk: bool = True
    capacity_factor: float | None = Field(None, gt=0)
    # Multiplies the (renormalised) top-k weights (DeepSeek-V2/V3).
    routed_scaling_factor: float = Field(1.0, gt=0)
    # Group-limited top-k (DeepSeek): experts form n_group equal groups; each token picks
    # from its topk_group best groups, a group scoring by its best expert ("max") or by the
    # sum of its two best ("top2_sum", DeepSeek-V3).
    n_group: int | None = Field(None, gt=0)
    topk_group: int | None = Field(None, gt=0)
    group_scoring: Literal["max", "top2_sum"] = "max"
    # A per-expert bias added to the scores for selection only (DeepSeek-V3's
    # e_score_correction_bias); the combine weights stay the unbiased scores.
    correction_bias: bool = False
    # "model": router logits in the model dtype, weights rounded to it (Mixtral, Qwen, OLMoE
    # in transformers); "float32": logits in float32 (DeepSeek).
    router_dtype: Literal["model", "float32"] = "float32"

    @model_validator(mode="after")
    def _groups(self) -> RoutingConfig:
        if (self.n_group is None) != (self.topk_group is None):
            raise ValueError("n_group: set both n_group and topk_group, or neither")
        if self.n_group is not None and self.topk_group > self.n_group:
            raise ValueError(f"topk_group: {self.topk_group} exceeds n_group={self.n_group}")
        return self


class MasterConfig(_Frozen):
    """Where the master listens, where its gates run, and its request limits."""

    listen: str = "0.0.0.0:50051"
    metrics_port: int | None = Field(9400, ge=1, lt=65536)
    # Interface of the metrics exporter; None: the host of `listen` (127.0.0.1 stays local).
    metrics_host: str | None = None
    device: str = "cpu"
    max_request_tokens: int = Field(65536, gt=0)
    # gRPC message limit of every hop; None: derived from the token limit (see
    # WorldConfig.message_limit), so that no message can be much larger than a full request.
    max_message_bytes: int | None = Field(None, gt=0, le=GRPC_MAX_MESSAGE_BYTES)
    # Bound on each worker call (within the client's deadline): a worker that has not
    # answered by then is treated as down and its slice goes to a replica.
    worker_timeout_s: float = Field(30.0, gt=0)
    # Infer calls that arrive while the master is busy are gated and sent to the workers
    # together, up to this many tokens per batch; extra wait for more calls (0: none).
    max_batch_tokens: int = Field(8192, gt=0)
    batch_delay_us: int = Field(0, ge=0, le=1_000_000)
    # Tokens accepted but not yet answered; beyond it, Infer gets RESOURCE_EXHAUSTED
    # (bounded memory under overload).
    max_pending_tokens: int = Field(262144, gt=0)
    # On SIGTERM: NOT_SERVING, then in-flight calls get this long to finish.
    shutdown_grace_s: float = Field(10.0, ge=0)
    # Host shared memory (CPU) or CUDA IPC (master.device CUDA) region through which
    # workers on the master's host exchange tensors; gRPC then carries only offsets.
    # 0 turns the fast path off; workers elsewhere always use gRPC bytes.
    shared_memory_bytes: int = Field(256 << 20, ge=0)

    _listen = field_validator("listen")(lambda v: (parse_address(v), v)[1])
    _metrics_host = field_validator("metrics_host")(lambda v: v if v is None else parse_host(v))

    @property
    def metrics_bind_host(self) -> str:
        """Where the exporter binds: `metrics_host`, else the host of `listen`."""
        return self.metrics_host or bind_host(self.listen)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return _check_device_syntax(v)


class BatchingConfig(_Frozen):
    """Worker dynamic batching: merge Forward calls arriving within max_delay_us."""

    # 0: the master already batches its Infer calls (one Forward per worker per batch), so a
    # window here would only add latency; a worker shared by several masters may want one.
    max_delay_us: int = Field(0, ge=0, le=1_000_000)
    max_batch_tokens: int = Field(16384, gt=0)
    # Replay small batches (<= 64 tokens, <= 256 pairs) from CUDA graphs on CUDA workers.
    cuda_graphs: bool = True
    # Tokens a worker holds queued or in its running batch; beyond it, RESOURCE_EXHAUSTED.
    max_queue_tokens: int = Field(262144, gt=0)
    # On SIGTERM: NOT_SERVING, then in-flight calls get this long to finish.
    shutdown_grace_s: float = Field(10.0, ge=0)


def _check_device_syntax(v: str) -> str:
    if not _DEVICE.match(v):
        raise ValueError(f"expected 'cpu', 'cuda' or 'cuda:N', got {v!r}")
    return v


class TLSConfig(_Frozen):
    """TLS on every gRPC port: PEM files each process reads on its own machine.

    Used by moe_serve.transport.tls."""

    # This process's certificate chain and private key: servers present them; under
    # client_auth the master presents them to its workers too.
    cert: Path
    key: Path
    # CAs that signed the peers' certificates: clients verify servers with it (the system's
    # roots without one); servers verify client certificates with it under client_auth.
    ca: Path | None = None
    # Mutual TLS: servers refuse clients without a certificate signed by `ca`.
    client_auth: bool = False
    # Name to expect in the servers' certificates instead of the host of each address.
    server_name: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _ca_for_clients(self) -> TLSConfig:
        if self.client_auth and self.ca is None:
            raise ValueError("ca: client_auth needs the CA that signs client certificates")
        return self


class SecurityConfig(_Frozen):
    """Where the bearer tokens come from (never the tokens themselves), and TLS.

    Two tokens: the client token guards the master (MoEMaster), the worker token the
    workers (ExpertWorker); only the master and the workers hold the worker token.
    """

    # Name of an environment variable that holds the client token, or a file that does.
    token_env: str | None = None
    token_file: Path | None = None
    # The same for the worker token, which the master sends to its workers.
    worker_token_env: str | None = None
    worker_token_file: Path | None = None
    tls: TLSConfig | None = None

    @model_validator(mode="after")
    def _sources(self) -> SecurityConfig:
        if self.token_env is not None and self.token_file is not None:
            raise ValueError("token_env: set token_env or token_file, not both")
        if self.worker_token_env is not None and self.worker_token_file is not None:
            raise ValueError(
                "worker_token_env: set worker_token_env or worker_token_file, not both"
            )
        client = self.token_env is not None or self.token_file is not None
        worker = self.worker_token_env is not None or self.worker_token_file is not None
        if client and not worker:
            # One token for both hops would let any client call ExpertWorker directly
            # (Forward, AttachRegion), past the master's request and budget limits.
            raise ValueError(
                "worker_token_env: a client token is set (token_env/token_file) but no worker "
                "token; set worker_token_env or worker_token_file to a different secret, held "
                "only by the master and the workers, so that a client token cannot call the "
                "workers directly past the master's limits"
            )
        same_env = self.token_env is not None and self.token_env == self.worker_token_env
        same_file = self.token_file is not None and self.token_file == self.worker_token_file
        if same_env or same_file:
            key = "worker_token_env" if same_env else "worker_token_file"
            raise ValueError(
                f"{key}: names the client token's source; the worker token must be a "
                "different secret"
            )
        return self


class WorkerConfig(_Frozen):
    """One expert worker: its address, devices and experts (all layers, or per layer)."""

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    address: str
    listen: str | None = None
    metrics_port: int | None = Field(None, ge=1, lt=65536)
    # Interface of the metrics exporter; None: the host of `listen_address`.
    metrics_host: str | None = None
    devices: tuple[str, ...] = ("cpu",)
    # A list (same experts on every layer) or {layer: [experts]}; see _experts.
    experts: tuple[int, ...] | Mapping[int, tuple[int, ...]]

    _address = field_validator("address", "listen")(
        lambda v: v if v is None else (parse_address(v), v)[1]
    )
    _metrics_host = field_validator("metrics_host")(lambda v: v if v is None else parse_host(v))

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

    @property
    def metrics_bind_host(self) -> str:
        """Where the exporter binds: `metrics_host`, else the host of `listen_address`."""
        return self.metrics_host or bind_host(self.listen_address)

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
    security: SecurityConfig = SecurityConfig()
    workers: tuple[WorkerConfig, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _placement(self) -> WorldConfig:
        _check_unique(self.workers)
        r, m = self.routing, self.model
        if r.n_group is not None:
            if m.num_experts % r.n_group:
                raise ValueError(
                    f"routing.n_group: {r.n_group} does not divide "
                    f"model.num_experts={m.num_experts}"
                )
            if m.top_k > r.topk_group * (m.num_experts // r.n_group):
                raise ValueError(
                    f"model.top_k: {m.top_k} exceeds the {r.topk_group} selected groups' "
                    f"{r.topk_group * (m.num_experts // r.n_group)} experts"
                )
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
        if largest > self.message_limit("client"):
            limit = (
                f"gRPC's largest message ({GRPC_MAX_MESSAGE_BYTES} bytes)"
                if self.master.max_message_bytes is None
                else f"master.max_message_bytes={self.master.max_message_bytes}"
            )
            raise ValueError(
                f"master.max_request_tokens: {self.master.max_request_tokens} tokens x "
                f"hidden_size {self.model.hidden_size} x 4 bytes = {largest} bytes exceeds "
                f"{limit}; lower the token limit"
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

    def message_limit(self, hop: Literal["client", "worker"]) -> int:
        """gRPC send and receive limit, in bytes, of one hop: "client" for the master's server
        (Infer requests and their replies), "worker" for the workers' servers and the master's
        channels to them (a Forward carries a batch of Infer calls: up to
        max(max_request_tokens, max_batch_tokens) tokens).

        `master.max_message_bytes` when set. Else tokens x row + MESSAGE_SLACK_BYTES, at most
        gRPC's 2 GiB - 1, where a row is the most one token takes in any request or reply:
        hidden_size x 4 (a float32 input; outputs are the model dtype, at most 4 bytes) +
        top_k x (8 + 4) (routing: int64 expert id and float32 weight per pick; a Forward's
        int32 pair_token, pair_expert and float32 pair_weight take the same 12) +
        num_experts x 4 (routing: float32 scores). Bytes beyond their tensors are refused by
        wire.parse anyway; this limit bounds what gRPC buffers before any parse.
        """
        if self.master.max_message_bytes is not None:
            return self.master.max_message_bytes
        m = self.model
        tokens = self.master.max_request_tokens
        if hop == "worker":
            tokens = max(tokens, self.master.max_batch_tokens)
        row = m.hidden_size * 4 + m.top_k * (8 + 4) + m.num_experts * 4
        return min(tokens * row + MESSAGE_SLACK_BYTES, GRPC_MAX_MESSAGE_BYTES)

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


# Model keys a world config may set beside a checkpoint: serve a subset of its MoE layers,
# or cast its weights to another dtype. Every other model key comes from config.json.
_CHECKPOINT_OVERRIDABLE = frozenset({"checkpoint", "dtype", "moe_layers", "seed"})


def _with_checkpoint(data: Mapping[str, Any], base: Path | None) -> Mapping[str, Any]:
    """Fill `model` and default `routing` keys from the checkpoint's config.json."""
    from moe_serve.families import read_layout  # config.json only; no tensors are read

    model = data.get("model")
    if not isinstance(model, Mapping) or not isinstance(model.get("checkpoint"), str):
        return data
    path = Path(model["checkpoint"]).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path  # relative to the world config file
    layout = read_layout(path)
    derived = {"shared_expert_ffn_size": 0, "shared_expert_gate": False, **layout.model}
    for key, value in model.items():
        if key not in _CHECKPOINT_OVERRIDABLE and key in derived and value != derived[key]:
            raise ConfigError(
                f"model.{key}: {value!r} contradicts the checkpoint ({layout.family}: "
                f"{derived[key]!r}); leave it out to use the checkpoint's value"
            )
    served = model.get("moe_layers", derived["moe_layers"])
    if isinstance(served, list | tuple):
        extra = [la for la in served if la not in derived["moe_layers"]]
        if extra:
            raise ConfigError(
                f"model.moe_layers: layer {extra[0]} is not a MoE layer of the checkpoint; "
                f"its MoE layers: {derived['moe_layers']}"
            )
    routing = data.get("routing") or {}
    return {
        **data,
        "model": {**derived, **model, "checkpoint": str(path)},
        "routing": {**layout.routing, **routing} if isinstance(routing, Mapping) else routing,
    }


def parse_config(data: Any, source: str = "<config>", base: Path | None = None) -> WorldConfig:
    """Validate a decoded YAML mapping; raise ConfigError naming each bad field.

    `base` is the directory a relative `model.checkpoint` is resolved against.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: expected a mapping at the top level, got {type(data).__name__}"
        )
    try:
        data = _with_checkpoint(data, base)
    except ConfigError as exc:
        raise ConfigError(f"{source}: invalid world config:\n  {exc}") from None
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
    return parse_config(data, str(p), base=p.parent)


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
