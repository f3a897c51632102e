"""The world config: which model is served, how it routes, and which worker holds which experts.

Parsed once (`load_config`) into frozen pydantic models and passed down; nothing
below the CLI reads YAML or the environment. Validation errors become a
`ConfigError` whose message names the field path and the expected value. Every path
key is resolved here, against the YAML file's directory (`resolve_path`), so the code
that opens the files (weights, auth, tls) opens what it is given. Each field's
`description` is the reference text of docs/config.md (scripts/gen_config_docs.py).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

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


def resolve_path(path: str | Path, base: Path | None) -> Path:
    """A path as the world config means it: `~` expanded, a relative one taken from `base`
    (the directory of the YAML file that names it), an absolute one as written.

    One rule for every path key (model.checkpoint, security.token_file,
    security.worker_token_file, security.tls.cert/key/ca), so that a config means the same
    files whatever directory a process starts in (systemd's WorkingDirectory, `up`'s
    children, a container's). Without a file (`base` None) a relative path stays relative
    to the working directory.
    """
    p = Path(path).expanduser()
    return p if p.is_absolute() or base is None else base / p


def _in_config_dir(value: Path, info: ValidationInfo) -> Path:
    return resolve_path(value, (info.context or {}).get("base"))


def _checkpoint_in_config_dir(value: str, info: ValidationInfo) -> str:
    return str(_in_config_dir(Path(value), info))


# A file named by the world config; parse_config resolves it against the YAML's directory.
ConfigPath = Annotated[Path, AfterValidator(_in_config_dir)]
# The same for model.checkpoint, which the rest of the code reads as a string.
CheckpointPath = Annotated[str, AfterValidator(_checkpoint_in_config_dir)]


def _doc_type(text: str) -> dict[str, Any]:
    """The type column of this key in docs/config.md, where the annotation alone says too
    little (a string with a syntax)."""
    return {"doc_type": text}


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

    checkpoint: CheckpointPath | None = Field(
        None,
        json_schema_extra=_doc_type("path or null"),
        description="A Hugging Face model directory (`config.json` + `*.safetensors`). Every "
        "other `model` key then comes from its `config.json` (a contradicting value is an "
        "error); `dtype` may cast it, `moe_layers` may pick a subset. See "
        "[models](models.md). `null`: a synthetic model.",
    )
    hidden_size: int = Field(512, gt=0, description="H, the width of the hidden states.")
    expert_ffn_size: int = Field(2048, gt=0, description="F, the inner width of each expert.")
    num_experts: int = Field(8, gt=0, description="E, experts per MoE layer (ids `0..E-1`).")
    top_k: int = Field(2, gt=0, description="K, experts per token; at most `num_experts`.")
    expert_kind: ExpertKind = Field(
        "mlp",
        description="`mlp`: `fc2(act(fc1·x + b1)) + b2`; `glu`: `down(act(gate·x) * up·x)`, "
        "no biases.",
    )
    activation: Activation = Field(
        "gelu", description="The expert activation; `swish` is accepted as `silu`."
    )
    moe_layers: tuple[Annotated[int, Field(ge=0)], ...] = Field(
        (0,),
        description="Model layer indices served, non-empty and distinct; requests name one "
        "of them.",
    )
    dtype: DType = Field(
        "float32",
        description="Expert weights, tensors on the wire, and the reply. Gates and combines "
        "compute in float32.",
    )
    seed: int = Field(0, description="Seed of the synthetic weights.")
    shared_expert_ffn_size: int = Field(
        0,
        ge=0,
        description="Width of the layer's shared experts (a GLU run on the master for every "
        "token and added to the routed sum); `0`: none.",
    )
    shared_expert_gate: bool = Field(
        False,
        description="Scale the shared experts' output by `sigmoid(x · w_gate)` (Qwen2-MoE).",
    )
    batch_invariant: bool = Field(
        True,
        description="A token's output is the same bits whatever its batch mates: gate, "
        "expert and shared-expert GEMMs on shapes that do not follow the batch, each token's "
        "expert outputs summed in a fixed order (docs/models.md#batch-invariant-results). "
        "`false`: the library's fastest kernels for each shape.",
    )

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

    scoring: Literal["softmax", "sigmoid"] = Field(
        "softmax", description="Score function over the router logits."
    )
    normalize_topk: bool = Field(True, description="Renormalise the K chosen scores to sum to 1.")
    capacity_factor: float | None = Field(
        None,
        gt=0,
        description="Per-request expert capacity `ceil(cf · T · K / E)`; pairs over it are "
        "dropped (weight 0, reported in `dropped_pairs`). Priority is choice-major: every "
        "token's first choice before any second choice. `null`: no limit.",
    )
    routed_scaling_factor: float = Field(
        1.0,
        gt=0,
        description="Multiplies the (renormalised) top-k weights (DeepSeek-V2/V3).",
    )
    n_group: int | None = Field(
        None,
        gt=0,
        description="Group-limited top-k (DeepSeek): the experts form `n_group` equal groups "
        "and a token picks only from its `topk_group` best groups. Set both or neither.",
    )
    topk_group: int | None = Field(
        None, gt=0, description="Groups a token picks from; see `n_group`."
    )
    group_scoring: Literal["max", "top2_sum"] = Field(
        "max",
        description="A group's score: its best expert's (V2) or the sum of its two best (V3).",
    )
    correction_bias: bool = Field(
        False,
        description="Add the layer's per-expert bias (`e_score_correction_bias`) to the scores "
        "for selection only (DeepSeek-V3); the combine weights stay the unbiased scores.",
    )
    router_dtype: Literal["float32", "model"] = Field(
        "float32",
        description="Compute router logits in float32 (DeepSeek), or in the model dtype with "
        "the top-k weights rounded to it (as transformers does for Mixtral, Qwen, OLMoE).",
    )

    @model_validator(mode="after")
    def _groups(self) -> RoutingConfig:
        if (self.n_group is None) != (self.topk_group is None):
            raise ValueError("n_group: set both n_group and topk_group, or neither")
        if (
            self.n_group is not None
            and self.topk_group is not None
            and self.topk_group > self.n_group
        ):
            raise ValueError(f"topk_group: {self.topk_group} exceeds n_group={self.n_group}")
        return self


class MasterConfig(_Frozen):
    """Where the master listens, where its gates run, and its request limits."""

    listen: str = Field(
        "0.0.0.0:50051",
        json_schema_extra=_doc_type("`host:port`"),
        description="Where the master binds (IPv6 as `[::1]:50051`).",
    )
    metrics_port: int | None = Field(
        9400,
        ge=1,
        lt=65536,
        description="Port of the Prometheus exporter (on `metrics_host`); `null` disables it.",
    )
    metrics_host: str | None = Field(
        None,
        json_schema_extra=_doc_type("host or IP (IPv6 as `::1` or `[::1]`) or null"),
        description="Interface the exporter binds. `null`: the host of `listen` "
        "(`127.0.0.1:50051` exports on `127.0.0.1` only, `[::1]:50051` on `::1`); set "
        "`0.0.0.0` to let a Prometheus on another machine scrape a master that listens on "
        "loopback. The metrics show per-expert traffic and error codes.",
    )
    device: str = Field(
        "cpu",
        json_schema_extra=_doc_type("`cpu` \\| `cuda` \\| `cuda:N`"),
        description="Where the gates run and partial sums are added. Must exist when the "
        "master starts.",
    )
    max_request_tokens: int = Field(
        65536,
        gt=0,
        description="Largest request in tokens; larger ones get RESOURCE_EXHAUSTED.",
    )
    # None derives the limit from the token limit (WorldConfig.message_limit), so that no
    # message can be much larger than a full request.
    max_message_bytes: int | None = Field(
        None,
        gt=0,
        le=GRPC_MAX_MESSAGE_BYTES,
        description="gRPC send/receive limit of the master's server, its channels to the "
        "workers, and the workers' servers. `null` derives it from the token limit: "
        "`tokens × (hidden_size × 4 + top_k × 12 + num_experts × 4) + 1 MiB`, at most "
        "2³¹−1, where a row is a float32 input plus a reply's routing and `tokens` is "
        "`max_request_tokens` (master) or `max(max_request_tokens, max_batch_tokens)` "
        "(workers); see [operations](operations.md#message-size). Set, it must hold "
        "`max_request_tokens × hidden_size × 4` bytes (a float32 request at the token "
        "limit), else the config is rejected.",
    )
    reload_grace_s: float = Field(
        30.0,
        gt=0,
        description="After a reload (SIGHUP or `moe-serve reload`): how long a worker keeps "
        "serving the experts the new config took from it, so that requests keep flowing "
        "while their new holders load them (set it above the slowest expert load), and the "
        "longest a master waits for a removed worker's calls in flight before closing its "
        "connections.",
    )
    worker_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Bound on each worker call, within the time the client has left. A "
        "worker that has not answered by then (frozen, or far behind) is marked down and its "
        "slice resent to replicas; if the client's own deadline is what ran out, the request "
        "gets DEADLINE_EXCEEDED. Set it a few times above your slowest worker call, and "
        "below client deadlines, so a replica still has time.",
    )
    max_batch_tokens: int = Field(
        8192,
        gt=0,
        description="Infer calls that arrive while the master is busy with an earlier batch "
        "are gated and fanned out together, up to this many tokens per batch (a larger call "
        "runs alone); each client still gets only its own rows, routing and errors. With "
        "`routing.capacity_factor` set, each call is gated on its own rows, since capacity "
        "is per request.",
    )
    batch_delay_us: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="Extra wait for more Infer calls before a batch starts. `0`: batch only "
        "what is already queued, so an idle master adds no latency.",
    )
    max_pending_tokens: int = Field(
        262144,
        gt=0,
        description="Tokens of Infer calls accepted and not yet answered. A call that would "
        "go beyond it gets RESOURCE_EXHAUSTED naming this key (unless nothing is pending: "
        "one call up to `max_request_tokens` always runs), so memory stays bounded under "
        "overload; clients retry later.",
    )
    shutdown_grace_s: float = Field(
        10.0,
        ge=0,
        description="On SIGTERM the master reports NOT_SERVING, refuses new calls, and gives "
        "in-flight ones this long to finish before it exits.",
    )
    shared_memory_bytes: int = Field(
        256 << 20,
        ge=0,
        description="Size (default 256 MiB) of the region through which workers on the "
        "master's host exchange tensors: a sealed memfd (no file in `/dev/shm`; it counts "
        "towards the process's memory) when `device` is `cpu`, CUDA IPC memory on `device` "
        "otherwise. gRPC then carries only offsets. Only workers of the same host, PID "
        "namespace and Unix user can map it; the others (another host, another container "
        "without a shared PID namespace, another user) use gRPC bytes, and so does a call "
        "that finds the region full. `0` turns the fast path off.",
    )
    worker_channels: int = Field(
        1,
        ge=1,
        le=64,
        description="gRPC connections the master opens to each worker. One HTTP/2 "
        "connection carries one large message at a time; calls that carry bytes (not shared "
        "memory) are spread over these, so a large slice's chunks travel side by side. See "
        "[benchmarks](benchmarks.md#bytes-path).",
    )
    worker_chunk_bytes: int = Field(
        0,
        ge=0,
        description="A worker's slice whose hidden states exceed this many bytes goes as "
        "several Forward calls of whole rows (at most `batching.max_batch_tokens` each), in "
        "flight together over `worker_channels` connections, so the worker computes one "
        "chunk while the next is on the wire. Results match one call within float "
        "tolerance, not bit for bit (a worker's GEMMs round a row differently in batches of "
        "other sizes). `0` (default) sends every slice as one call. Shared-memory calls are "
        "never chunked.",
    )
    wire_dtype: Literal["float8_e4m3fn"] | None = Field(
        None,
        description="FP8 dispatch: `float8_e4m3fn` sends each worker its hidden rows as FP8 "
        "E4M3 with a float32 scale per 128 elements of a row, and the workers answer their "
        "partial sums the same way: about half the bytes of bfloat16 (a quarter of float32) "
        "on both hops, at a relative error of ~5% in the layer output; routing is unchanged "
        "(the gate runs before). Shared-memory calls apply the same rounding, so results do "
        "not depend on the transport. `null` (default): the model dtype. Workers need no "
        "setting: they answer in the format a request came in. See "
        "[models](models.md#fp8-dispatch).",
    )

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

    # 0 by default: the master already batches its Infer calls (one Forward per worker per
    # batch), so a window here would only add latency.
    max_delay_us: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="The first waiting Forward call opens a window of this many "
        "microseconds; calls arriving before it closes join the batch. `0`: only calls "
        "already queued join; the master already sends one Forward per worker per batch of "
        "Infer calls (`master.max_batch_tokens`), so a window only adds latency unless "
        "several masters share the workers.",
    )
    max_batch_tokens: int = Field(
        16384,
        gt=0,
        description="Stop adding calls once the batch would exceed this many tokens (the "
        "call that does not fit opens the next batch). A single larger call still runs, "
        "alone.",
    )
    cuda_graphs: bool = Field(
        True,
        description="On CUDA devices with the grouped GEMM (bfloat16, compute capability "
        "9.0+), batches of at most 64 tokens and 256 (token, expert) pairs replay a CUDA "
        "graph captured on first use per size bucket (powers of two), instead of launching "
        "some fifteen kernels each.",
    )
    max_queue_tokens: int = Field(
        262144,
        gt=0,
        description="What a worker holds queued or in its running batch, each Forward "
        "counting the larger of its tokens and its (token, expert) pairs (a master sends up "
        "to `top_k` pairs per token, and pairs are what a batch's expert GEMMs grow with); a "
        "Forward beyond it gets RESOURCE_EXHAUSTED naming this key (a lone call always "
        "runs). A Forward with more pairs than its tokens × the experts the worker holds on "
        "the layer is INVALID_ARGUMENT naming `pair_token`, before any work.",
    )
    shutdown_grace_s: float = Field(
        10.0,
        ge=0,
        description="On SIGTERM a worker reports NOT_SERVING, refuses new calls, and gives "
        "in-flight ones this long to finish before it exits.",
    )


def _check_device_syntax(v: str) -> str:
    if not _DEVICE.match(v):
        raise ValueError(f"expected 'cpu', 'cuda' or 'cuda:N', got {v!r}")
    return v


class TLSConfig(_Frozen):
    """TLS on every gRPC port: PEM files each process reads on its own machine.

    Used by moe_serve.transport.tls."""

    cert: ConfigPath = Field(
        description="PEM certificate chain this process presents as a server (and, with "
        "`client_auth`, the master to its workers). It must name every host the process is "
        "dialled by (subjectAltName)."
    )
    key: ConfigPath = Field(description="PEM private key of `cert`.")
    ca: ConfigPath | None = Field(
        None,
        description="PEM bundle of the CAs that signed the servers' certificates, used by "
        "the master (to its workers), `moe-serve up`'s probes and `moe-serve health`; "
        "`null`: the system's roots. With `client_auth`, also the CAs that sign client "
        "certificates.",
    )
    client_auth: bool = Field(
        False,
        description="Mutual TLS: servers refuse a client without a certificate signed by "
        "`ca` (requires `ca`).",
    )
    server_name: str | None = Field(
        None,
        min_length=1,
        description="Name to expect in the servers' certificates instead of each address's "
        "host (e.g. addresses are IPs, certificates carry a DNS name).",
    )

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

    token_env: str | None = Field(
        None,
        description="Name of an environment variable holding the client bearer token. The "
        "master reads it at start (unset: exit 2 naming the key); every call to the master "
        "but gRPC health and reflection must then carry `authorization: Bearer <token>`, "
        "else UNAUTHENTICATED. Clients pass `MoEClient(..., token=...)`. Requires a worker "
        "token (below), else the config is refused (exit 2 naming "
        "`security.worker_token_env`).",
    )
    token_file: ConfigPath | None = Field(
        None,
        description="The same, read from a file (surrounding whitespace stripped). Set one "
        "of the two, never the token itself. How to make one: "
        "[operations](operations.md#creating-the-tokens).",
    )
    worker_token_env: str | None = Field(
        None,
        description="Name of an environment variable holding the worker token: what every "
        "worker checks on every call but health and reflection (else UNAUTHENTICATED), and "
        "what the master sends them. Workers and the master read it at start (unset: exit 2 "
        "naming the key); workers never need the client token. It must be a different "
        "secret from the client token (the master exits 2 if they are equal), so that a "
        "client token cannot call `ExpertWorker` (`Forward`, `AttachRegion`, `GetInfo`) "
        "past the master's limits.",
    )
    worker_token_file: ConfigPath | None = Field(
        None, description="The same, read from a file. Set one of the two."
    )
    tls: TLSConfig | None = Field(
        None,
        description="TLS on every gRPC port of every process (see "
        "[`security.tls`](#securitytls)); `null`: plaintext.",
    )

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


class TracingConfig(_Frozen):
    """OpenTelemetry spans of the master, the workers and the embedded client.

    Needs the `otel` extra (`pip install 'moe-serve[otel]'`); used by moe_serve.tracing."""

    enabled: bool = Field(
        False,
        description="Record spans of each call: the master's `Infer` and the workers' "
        "`Forward` (server spans whose parent is the caller's W3C `traceparent`), their "
        "stages and batches, and the master's calls to the workers (client spans whose "
        "context travels to the worker). Needs the `otel` extra, else exit 2 naming this "
        "key. `false`: no OpenTelemetry import, no span, no `traceparent` sent "
        "([operations](operations.md#tracing)).",
    )
    exporter: Literal["otlp", "console"] = Field(
        "otlp",
        description="Where spans go: `otlp`, OTLP over gRPC to `endpoint` (a collector, "
        "Jaeger, Tempo); `console`, one JSON object per span on standard output.",
    )
    endpoint: str = Field(
        "http://localhost:4317",
        min_length=1,
        description="The OTLP collector: `http://host:port` in plaintext, `https://host:port` "
        "over TLS with the system's roots. Only with `exporter: otlp`.",
    )
    service_name: str | None = Field(
        None,
        min_length=1,
        description="`service.name` of the spans; `null`: `moe-serve-master`, "
        "`moe-serve-worker` (with `service.instance.id` the worker's id) or "
        "`moe-serve-client` (the embedded client).",
    )
    sample_ratio: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Fraction of new traces recorded; a call that carries a parent follows "
        "its parent's sampling decision.",
    )


class WorkerConfig(_Frozen):
    """One expert worker: its address, devices and experts (all layers, or per layer)."""

    id: str = Field(
        min_length=1,
        pattern=r"^[A-Za-z0-9_.-]+$",
        json_schema_extra=_doc_type("string of `[A-Za-z0-9_.-]`"),
        description="Name used by `--worker-id`; distinct across workers.",
    )
    address: str = Field(
        json_schema_extra=_doc_type("`host:port`"),
        description="Where the master dials this worker; distinct across workers.",
    )
    listen: str | None = Field(
        None,
        json_schema_extra=_doc_type("`host:port` or null"),
        description="Where the worker binds; `null`: `0.0.0.0` on `address`'s port.",
    )
    metrics_port: int | None = Field(
        None,
        ge=1,
        lt=65536,
        description="Port of this worker's Prometheus exporter; `null`: none (the examples "
        "use 9401, 9402, ...).",
    )
    metrics_host: str | None = Field(
        None,
        json_schema_extra=_doc_type("host or IP or null"),
        description="Interface of this worker's exporter; `null`: the host of its `listen` "
        "address (`0.0.0.0` when `listen` is unset).",
    )
    devices: tuple[str, ...] = Field(
        ("cpu",),
        json_schema_extra=_doc_type("list of `cpu` \\| `cuda` \\| `cuda:N`"),
        description="Devices the worker's experts are spread over, round-robin in listed "
        "order (1st, 3rd, ... expert on the first device). CUDA devices must be distinct and "
        "exist when the worker starts.",
    )
    # A list (same experts on every layer) or {layer: [experts]}; see _experts.
    experts: tuple[int, ...] | Mapping[int, tuple[int, ...]] = Field(
        json_schema_extra=_doc_type("list of int, or `{layer: [int]}`"),
        description="Expert ids held on every MoE layer, or per layer (a layer missing from "
        "the mapping holds none on this worker). Mapping keys must be in `model.moe_layers`; "
        "ids must be `< num_experts`; every expert of every layer must be placed on some "
        "worker.",
    )

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

    model: ModelConfig = Field(ModelConfig(), description="What is served.")
    routing: RoutingConfig = Field(RoutingConfig(), description="How the gates route.")
    master: MasterConfig = Field(MasterConfig(), description="The master process.")
    batching: BatchingConfig = Field(
        BatchingConfig(), description="Dynamic batching on the workers."
    )
    security: SecurityConfig = Field(SecurityConfig(), description="Tokens and TLS.")
    tracing: TracingConfig = Field(
        TracingConfig(), description="OpenTelemetry spans; off by default."
    )
    workers: tuple[WorkerConfig, ...] = Field(
        min_length=1, description="The expert workers, at least one."
    )

    @model_validator(mode="after")
    def _placement(self) -> WorldConfig:
        _check_unique(self.workers)
        r, m = self.routing, self.model
        if r.n_group is not None and r.topk_group is not None:  # set together (RoutingConfig)
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
    path = resolve_path(model["checkpoint"], base)
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

    `base` is the directory of the YAML file: every relative path in the config
    (`resolve_path`) is taken from it. Without one, relative paths stay relative to the
    working directory.
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
        return WorldConfig.model_validate(data, context={"base": base})
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
    # Made absolute lexically, symlinks kept: a YAML mounted through a link (a Kubernetes
    # ConfigMap's ..data/) names files beside the path it is read at.
    return parse_config(data, str(p), base=Path(os.path.abspath(p)).parent)


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


def config_difference(old: object, new: object, where: str) -> str | None:
    """The first key that differs between two config values, as "key: old -> new" (keys
    under `security` without their values), or None when they are equal: what a reload
    names when it refuses a change."""
    if old == new:
        return None
    if isinstance(old, BaseModel) and isinstance(new, BaseModel) and type(old) is type(new):
        for key in type(old).model_fields:
            found = config_difference(getattr(old, key), getattr(new, key), f"{where}.{key}")
            if found is not None:
                return found
    if where.startswith("security"):
        return f"{where}: changed"
    return f"{where}: {old!r} -> {new!r}"
