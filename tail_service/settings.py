"""Typed, frozen settings: loaded once at start-up and passed in explicitly.

Sources, strongest first: keyword arguments (the CLI's flags), ``TAIL_*`` environment
variables (nested with ``__``, e.g. ``TAIL_SERVER__PORT=9000``; lists such as
``TAIL_MODELS`` as JSON), the YAML file (``--config PATH`` or ``TAIL_CONFIG``), then the
defaults. With no models configured, the embedded local models are served.

Strings in the YAML may reference the environment as ``${NAME}`` or
``${NAME:-default}``. A bad config fails at start-up: :func:`load_settings` raises :class:`ConfigError` whose
message names every offending field (``models.0.base_url: ...``).
"""

from __future__ import annotations

import contextvars
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    SerializationInfo,
    ValidationError,
    field_serializer,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ProviderName = Literal["openai", "anthropic", "local"]
EndpointName = Literal["chat", "completion", "embedding"]

LOCAL_CHAT_MODEL = "local/smollm2-135m-instruct"
LOCAL_EMBED_MODEL = "local/all-minilm-l6-v2"


class ConfigError(Exception):
    """The configuration is invalid; the message names each field and what is wrong."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PriceEntry(_Frozen):
    """A model's price in USD per million tokens (overrides the built-in table)."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    #: prompt tokens read from the provider's cache (default: the input price)
    cached_input: float | None = Field(default=None, ge=0)


class ModelEntry(_Frozen):
    """One deployment of a public model. Entries sharing ``name`` are one model."""

    name: str = Field(min_length=1, description="the model id clients send")
    provider: ProviderName
    base_url: str = Field(default="", description="upstream API base URL")
    upstream_model: str | None = Field(default=None, description="model sent upstream (default: name)")
    api_key_env: str | None = Field(default=None, description="environment variable holding the key")
    api_key_secret: str | None = Field(default=None, description="secret-service secret holding the key")
    endpoints: tuple[EndpointName, ...] | None = Field(
        default=None, description="endpoints served (default: by provider and model)"
    )
    weight: float = Field(default=1.0, gt=0)
    timeout: float = Field(
        default=600.0, gt=0, description="seconds per attempt (to first byte if streaming)"
    )
    connect_timeout: float = Field(default=5.0, gt=0)
    max_retries: int = Field(default=2, ge=0, le=10)
    allowed_fails: int = Field(default=3, ge=1)
    cooldown: float = Field(default=30.0, ge=0)
    supports_dimensions: bool = False
    owned_by: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    #: limits of this model for each API key (0: none); all deployments of a name share them
    rpm: int = Field(default=0, ge=0)
    tpm: int = Field(default=0, ge=0)
    max_concurrency: int = Field(default=0, ge=0)
    #: limits of this model for all API keys together (its capacity; 0: none)
    total_rpm: int = Field(default=0, ge=0)
    total_tpm: int = Field(default=0, ge=0)
    total_max_concurrency: int = Field(default=0, ge=0)
    #: the model's price (else the built-in table's, else 0 and flagged in /health);
    #: deployments of one name should agree, the first entry that gives one wins
    price: PriceEntry | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelEntry:
        if self.api_key_env and self.api_key_secret:
            raise ValueError("give api_key_env or api_key_secret, not both")
        if self.provider != "local" and not self.base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must be an http:// or https:// URL")
        return self


class ServerSettings(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    #: seconds a client may stay connected to one request, end to end
    request_timeout: float = Field(default=900.0, gt=0)
    #: comment line sent on idle SSE streams every N seconds (0 disables)
    sse_keepalive: float = Field(default=15.0, ge=0)
    #: seconds to finish in-flight requests on shutdown
    graceful_timeout: float = Field(default=30.0, ge=0)
    #: bytes of request line and headers a request may send; more is a 431 and a close
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    #: seconds from a connection (or a request's first byte) until its headers are complete
    header_timeout: float = Field(default=10.0, gt=0)
    #: seconds a request body may go without a new chunk before a 408
    body_idle_timeout: float = Field(default=30.0, gt=0)
    #: bytes per second a request body must average once it has been read for
    #: ``body_idle_timeout`` seconds (a trickle is a 408 too); 0 disables
    body_min_rate: int = Field(default=1024, ge=0)
    #: one line per request at info level (``tail_service.access``): id, key id, model,
    #: status, latency, tokens; never the key or any content
    access_log: bool = True


class LocalSettings(_Frozen):
    """The embedded local model provider."""

    chat_threads: int = Field(default=2, ge=1)
    embed_threads: int = Field(default=1, ge=1)
    max_embed_batch: int = Field(default=64, ge=1)
    #: load the local models at start-up instead of on first use
    preload: bool = False


class TLSFiles(_Frozen):
    """PEM files for mutual TLS: this side's certificate and key, and the CA that signs peers."""

    ca_file: Path
    cert_file: Path
    key_file: Path


class _GrpcClient(_Frozen):
    #: ``host:port`` of the service
    address: str | None = None
    tls: TLSFiles | None = None
    #: deadline of one call attempt, seconds
    timeout: float = Field(default=1.0, gt=0)
    #: extra attempts on UNAVAILABLE / DEADLINE_EXCEEDED
    retries: int = Field(default=2, ge=0, le=10)


class AuthSettings(_GrpcClient):
    """How the HTTP service authenticates API keys."""

    #: ``grpc``: every call needs a key verified by auth-service; ``disabled``: no auth
    #: (development and benchmarks only: every caller is the anonymous principal)
    mode: Literal["grpc", "disabled"] = "grpc"
    #: seconds a positive verdict is cached (revocations are pushed, not waited for)
    cache_ttl: float = Field(default=60.0, gt=0)
    #: seconds an unknown/revoked key's rejection is cached
    negative_ttl: float = Field(default=5.0, ge=0)
    #: most verdicts kept in memory
    cache_size: int = Field(default=100_000, ge=1)


class SecretsSettings(_GrpcClient):
    """Where the HTTP service gets provider credentials named by ``api_key_secret``."""

    #: seconds between checks for new versions of the credentials in use
    refresh_interval: float = Field(default=2.0, gt=0)


class AuthServiceSettings(_Frozen):
    """``tail-service auth-service``."""

    listen: str = "127.0.0.1:50051"
    #: SQLAlchemy URL: ``sqlite:///path/auth.db`` or ``postgresql+psycopg://...``
    database_url: str = "sqlite:///auth.db"
    tls: TLSFiles | None = None
    #: file holding the key-hashing pepper (created in embedded mode)
    pepper_file: Path | None = None
    #: environment variable holding the pepper, if no file
    pepper_env: str = "TAIL_AUTH_PEPPER"
    #: certificate identities allowed to call the admin RPCs
    admin_identities: tuple[str, ...] = ("admin",)
    #: certificate identities allowed to verify keys and watch key events
    client_identities: tuple[str, ...] = ("tail",)
    #: seconds between polls of the key-event table (revocations from other replicas)
    event_poll_interval: float = Field(default=0.25, gt=0)


class SecretServiceSettings(_Frozen):
    """``tail-service secret-service``."""

    listen: str = "127.0.0.1:50052"
    database_url: str = "sqlite:///secrets.db"
    tls: TLSFiles | None = None
    #: file holding the base64 256-bit master key
    master_key_file: Path | None = None
    #: environment variable holding the base64 master key, if no file
    master_key_env: str = "TAIL_SECRETS_MASTER_KEY"
    #: embedded mode: create the master key file if it is missing
    embedded: bool = False
    #: identities that may only read secrets
    reader_identities: tuple[str, ...] = ("tail",)
    #: identities that may put, list, delete and rotate
    admin_identities: tuple[str, ...] = ("admin",)


class RedisSettings(_Frozen):
    """Shared state of all replicas: rate limits and concurrency slots."""

    #: ``redis://host:6379/0``, ``rediss://...`` or ``unix:///path``; ``up`` starts its own
    url: str | None = None
    #: ``url`` is one node of a Redis Cluster (the limiter routes by slot, follows MOVED/ASK)
    cluster: bool = False
    #: seconds one admission may wait for Redis before the failure policy applies
    timeout: float = Field(default=0.05, gt=0)
    #: when Redis cannot answer: ``open`` admits without limits, ``closed`` answers 503
    failure_mode: Literal["open", "closed"] = "open"
    #: failures in a row that open the circuit breaker (Redis is then skipped)
    breaker_failures: int = Field(default=3, ge=1)
    #: seconds the breaker stays open before one trial call
    breaker_reset: float = Field(default=5.0, gt=0)
    #: while the breaker is open, seconds between background pings; the first answer
    #: closes it (a restarted Redis enforces limits again within about this long)
    breaker_probe_interval: float = Field(default=0.25, gt=0)


class RateLimitSettings(_Frozen):
    """Admission control: per-key limits from auth-service, per-model limits from config."""

    enabled: bool = True
    #: tokens reserved for the answer when the request gives no max_tokens
    default_max_tokens: int = Field(default=1024, ge=1)
    #: seconds a concurrency slot survives a process that died holding it
    lease_ttl: float = Field(default=600.0, gt=0)
    #: share of each limit that batch traffic leaves free for interactive calls
    batch_headroom: float = Field(default=0.1, ge=0, lt=1)


class CacheSettings(_Frozen):
    """The exact-match response cache (in Redis), opt-in per request: ``x-tail-cache``."""

    #: seconds an answer is kept
    ttl: float = Field(default=300.0, gt=0)
    #: what requests without an ``x-tail-cache`` header do
    default: Literal["use", "skip", "refresh"] = "skip"


class StoreSettings(_Frozen):
    """Where files, batches and their results live: shared by every replica and worker."""

    #: SQLAlchemy URL: ``sqlite:///store.db`` (relative to the state directory) or
    #: ``postgresql://...`` (replicas and workers on several machines share it)
    database_url: str = "sqlite:///store.db"
    #: bytes of file content per stored chunk row
    chunk_bytes: int = Field(default=1024 * 1024, ge=4096, le=64 * 1024 * 1024)
    #: largest file ``POST /v1/files`` accepts (OpenAI: 512 MB)
    max_file_bytes: int = Field(default=512 * 1024 * 1024, ge=1024)
    #: threads that run store queries for one process (off the event loop)
    threads: int = Field(default=4, ge=1, le=64)


class BatchSettings(_Frozen):
    """The batch engine (``/v1/batches``, ``/v1/batch``) and its workers."""

    #: most request lines in one batch input file (OpenAI: 50,000)
    max_lines: int = Field(default=50_000, ge=1)
    #: largest batch input file (OpenAI: 200 MB)
    max_input_bytes: int = Field(default=200 * 1024 * 1024, ge=1024)
    #: lines per chunk workflow
    chunk_lines: int = Field(default=200, ge=1, le=10_000)
    #: chunk workflows one worker runs at once
    worker_concurrency: int = Field(default=8, ge=1, le=256)
    #: lines of one chunk in flight at once
    line_concurrency: int = Field(default=200, ge=1, le=10_000)
    #: seconds a batch may run before it expires with partial results (``24h``)
    completion_window_seconds: int = Field(default=86_400, ge=1)
    #: requests ``POST /v1/batch`` accepts in one call
    sync_max_requests: int = Field(default=1000, ge=1, le=100_000)
    #: lines of one ``POST /v1/batch`` call in flight at once
    sync_concurrency: int = Field(default=64, ge=1, le=10_000)
    #: this worker's durable identity: a worker that restarts with the same id resumes
    #: its own unfinished work at once (default: the host name)
    executor_id: str | None = Field(default=None, min_length=1, max_length=128)
    #: seconds between a worker's heartbeats in the store
    heartbeat_interval: float = Field(default=2.0, gt=0)
    #: seconds without a heartbeat after which another worker takes over a worker's work
    dead_after: float = Field(default=30.0, gt=0)
    #: seconds a line waits before trying again when the rate limits have no spare capacity
    max_backoff: float = Field(default=5.0, gt=0)
    #: run a worker inside ``tail-service up`` (a supervised child process)
    embedded_worker: bool = True


class McpServerEntry(_Frozen):
    """An MCP server agent runs may call, configured by the operator (requests only name it).

    Streamable HTTP (``url``, optional ``headers``) or stdio (``command``, optional ``env``).
    Header and environment values are secrets: masked in reprs and dumps (the CLI passes
    them on to its own children with ``context={"reveal_secrets": True}``).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="what requests and key policies call it")
    #: kept out of reprs: a URL may carry a token
    url: str | None = Field(
        default=None, pattern=r"^https?://", repr=False, description="streamable HTTP endpoint"
    )
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    command: tuple[str, ...] | None = Field(default=None, min_length=1, description="stdio server argv")
    env: dict[str, SecretStr] = Field(default_factory=dict)
    #: seconds one tool call may take (default: ``agent.tool_timeout``)
    timeout: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_transport(self) -> McpServerEntry:
        if (self.url is None) == (self.command is None):
            raise ValueError("give exactly one of url (streamable HTTP) and command (stdio)")
        if self.headers and self.url is None:
            raise ValueError("headers apply to url servers only")
        if self.env and self.command is None:
            raise ValueError("env applies to command (stdio) servers only")
        return self

    @field_serializer("headers", "env")
    def _dump_secrets(self, values: dict[str, SecretStr], info: SerializationInfo) -> dict[str, str]:
        reveal = bool(info.context and info.context.get("reveal_secrets"))
        return {k: (v.get_secret_value() if reveal else str(v)) for k, v in values.items()}


class Limit(_Frozen):
    """A per-run limit: what a run gets when it does not ask, and the most it may ask for."""

    default: int = Field(ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _default_within(self) -> Limit:
        if self.default > self.max:
            raise ValueError("default must not exceed max")
        return self


class AgentSettings(_Frozen):
    """Agent runs (``/v1/agentic``): the server policy that caps what a request may ask for."""

    #: model calls in one run
    max_steps: Limit = Limit(default=10, max=100)
    #: tool calls in one run (client function calls included)
    max_tool_calls: Limit = Limit(default=32, max=512)
    #: seconds a run may work (time paused in ``requires_action`` does not count)
    max_time_s: Limit = Limit(default=600, max=3600)
    #: prompt plus completion tokens over all its model calls
    max_total_tokens: Limit = Limit(default=1_000_000, max=10_000_000)
    #: tools one run may offer the model
    max_tools: int = Field(default=128, ge=1, le=1024)
    #: seconds one tool call may take (built-in, or MCP unless its server says otherwise)
    tool_timeout: float = Field(default=30.0, gt=0)
    #: bytes of one tool result kept and sent to the model (the rest is cut, and marked)
    max_tool_output_bytes: int = Field(default=64 * 1024, ge=256)
    #: seconds a model call waits at most before it tries again (rate-limited, upstream down)
    max_backoff: float = Field(default=5.0, gt=0)
    #: runs one worker works on at once
    worker_concurrency: int = Field(default=64, ge=1, le=4096)
    #: seconds between a worker's looks for runs to start (with Redis, the HTTP service
    #: also tells the workers at once)
    start_poll: float = Field(default=0.25, gt=0)
    #: seconds between an HTTP replica's looks at a run it waits for or streams
    watch_poll: float = Field(default=0.05, gt=0)


class UsageSettings(_Frozen):
    """The usage ledger: records go to a Redis stream with the request's settlement, and
    drainers (in the workers) move them into the store in batches."""

    #: the Redis stream the records ride in (one Cluster slot: keep the braces)
    stream: str = Field(default="tail:usage:v1:{ledger}", min_length=1)
    #: records written to the store per transaction, at most
    batch_size: int = Field(default=500, ge=1, le=10_000)
    #: how long the drainer waits for more records before writing what it has (seconds)
    flush_interval: float = Field(default=0.2, gt=0)
    #: a record another drainer read but never stored is taken over after this (seconds)
    claim_after: float = Field(default=30.0, gt=0)
    #: records held in memory while Redis is unreachable (then written to the store directly)
    max_buffer: int = Field(default=100_000, ge=100)
    #: workers always drain the stream (they share the work); HTTP replicas only with this
    #: (for a deployment that runs no worker), as it costs them CPU beside the requests
    drain_in_http: bool = False
    #: the bearer token of ``GET /v1/organization/usage/completions`` (usage of every key);
    #: without one that view is off (``tail-service usage`` reads the store directly)
    admin_token: SecretStr | None = Field(default=None, repr=False)


class TracingSettings(_Frozen):
    """OpenTelemetry traces, exported over OTLP/HTTP; off unless ``enabled``."""

    enabled: bool = False
    #: the OTLP/HTTP traces endpoint of a collector
    otlp_endpoint: str = "http://127.0.0.1:4318/v1/traces"
    #: extra headers for the exporter (e.g. an API key of a tracing vendor); never logged
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    service_name: str = "tail-service"
    #: the fraction of new traces sampled (a request with a sampled parent is always kept)
    sample_ratio: float = Field(default=1.0, ge=0, le=1)


class Settings(BaseSettings):
    """Everything the service reads from its environment, frozen after load."""

    model_config = SettingsConfigDict(
        env_prefix="TAIL_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    server: ServerSettings = ServerSettings()
    local: LocalSettings = LocalSettings()
    auth: AuthSettings = AuthSettings()
    secrets: SecretsSettings = SecretsSettings()
    redis: RedisSettings = RedisSettings()
    ratelimit: RateLimitSettings = RateLimitSettings()
    cache: CacheSettings = CacheSettings()
    store: StoreSettings = StoreSettings()
    batch: BatchSettings = BatchSettings()
    agent: AgentSettings = AgentSettings()
    usage: UsageSettings = UsageSettings()
    tracing: TracingSettings = TracingSettings()
    #: MCP servers agent runs may call (keys may be limited to some of them)
    mcp_servers: tuple[McpServerEntry, ...] = ()
    auth_service: AuthServiceSettings = AuthServiceSettings()
    secret_service: SecretServiceSettings = SecretServiceSettings()
    models: tuple[ModelEntry, ...] = ()
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool = False
    state_dir: Path = Path(".tail")
    #: credentials resolved from ``api_key_env`` at load time; never printed
    credentials: dict[str, SecretStr] = Field(default_factory=dict, exclude=True, repr=False)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init kwargs (CLI flags) > TAIL_* environment > the YAML file (passed in as
        # ``_FILE_DATA`` context); pydantic-settings deep-merges nested sections.
        return (init_settings, env_settings, _YamlSource(settings_cls))

    @model_validator(mode="after")
    def _unique_mcp_names(self) -> Settings:
        names = [s.name for s in self.mcp_servers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"mcp_servers: names must be unique ({', '.join(dup)} repeated)")
        return self

    def dump_for_child(self) -> str:
        """These settings as JSON for a child process of ours, secrets included (it gets
        them through its environment, never a command line)."""
        return self.model_dump_json(context={"reveal_secrets": True})

    def model_entries(self) -> tuple[ModelEntry, ...]:
        """The configured models, or the embedded local ones when none are configured."""
        if self.models:
            return self.models
        return (
            ModelEntry(name=LOCAL_CHAT_MODEL, provider="local", upstream_model="smollm2-135m-instruct"),
            ModelEntry(name=LOCAL_EMBED_MODEL, provider="local", upstream_model="all-minilm-l6-v2"),
        )


class _YamlSource(PydanticBaseSettingsSource):
    """The YAML document, already read and expanded, as the weakest settings source."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return _FILE_DATA.get({}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_FILE_DATA.get({}))


#: the file's contents for the one ``load_settings`` call in progress (a constant key,
#: not shared state: each call sets and resets it in its own context)
_FILE_DATA: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("tail_config_file")


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        lines.append(f"  {loc}: {err['msg']}")
    return "invalid configuration:\n" + "\n".join(lines)


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, where: str) -> Any:
    """Replace ``${NAME}`` / ``${NAME:-default}`` in every string of the YAML document."""
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{where}.{i}") for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        found = os.environ.get(name, default)
        if found is None:
            raise ConfigError(f"invalid configuration:\n  {where}: environment variable {name} is not set")
        return found

    return _ENV_REF.sub(sub, value)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    expanded: dict[str, Any] = _expand_env(data, "")
    return expanded


def load_settings(
    config_path: str | Path | None = None,
    **overrides: Any,
) -> Settings:
    """Build the one ``Settings`` object of a process.

    ``config_path`` defaults to ``$TAIL_CONFIG``. ``overrides`` (CLI flags) win over the
    environment, which wins over the file. Each model's ``api_key_env`` is resolved
    here, once; a named variable that is unset is an error.
    """
    path = config_path or os.environ.get("TAIL_CONFIG")
    file_data = _read_yaml(Path(path)) if path else {}
    given = {k: v for k, v in overrides.items() if v is not None and v != {}}
    token = _FILE_DATA.set(file_data)
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None
    finally:
        _FILE_DATA.reset(token)
    return resolve_credentials(settings)


def resolve_credentials(settings: Settings) -> Settings:
    """Read each model's ``api_key_env`` from the environment, once.

    A variable that is named but unset is a configuration error.
    """
    creds: dict[str, SecretStr] = {}
    missing = []
    for i, m in enumerate(settings.models):
        if m.api_key_env:
            value = os.environ.get(m.api_key_env)
            if value is None:
                missing.append(f"  models.{i}.api_key_env: environment variable {m.api_key_env} is not set")
            else:
                creds[m.api_key_env] = SecretStr(value)
    if missing:
        raise ConfigError("invalid configuration:\n" + "\n".join(missing))
    return settings.model_copy(update={"credentials": creds})


def check_http_settings(settings: Settings) -> None:
    """What the HTTP service needs beyond field validation; raises :class:`ConfigError`."""
    problems = []
    if settings.auth.mode == "grpc" and not settings.auth.address:
        problems.append(
            "  auth.address: required when auth.mode is grpc "
            "(set auth.mode: disabled to run without authentication, for development only)"
        )
    if settings.auth.mode == "grpc" and settings.auth.tls is None:
        problems.append("  auth.tls: required (ca_file, cert_file, key_file): every hop uses mutual TLS")
    uses_secrets = [i for i, m in enumerate(settings.models) if m.api_key_secret]
    if uses_secrets and not settings.secrets.address:
        problems.append(f"  secrets.address: required because models.{uses_secrets[0]}.api_key_secret is set")
    if uses_secrets and settings.secrets.tls is None:
        problems.append("  secrets.tls: required (ca_file, cert_file, key_file): every hop uses mutual TLS")
    if settings.ratelimit.enabled and not settings.redis.url:
        problems.append(
            "  redis.url: required for rate limiting (or set ratelimit.enabled: false); "
            "`tail-service up` starts its own"
        )
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(problems))


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/tail-service``, else ``~/.local/state/tail-service``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tail-service"
