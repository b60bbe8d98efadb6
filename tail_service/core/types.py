"""Internal request/result types shared by the core, the API layer and the providers.

The OpenAI chat format is the lingua franca inside the proxy: a request carries the
validated wire body as a plain ``dict`` (unknown fields kept, so they pass through to
OpenAI-compatible upstreams untouched), and providers answer with OpenAI-shaped
dicts. Adapters for other wire formats (Anthropic, the local engine) translate at
their edge with pure functions. This keeps the hot path free of a wire -> domain ->
wire round trip per request and per stream chunk.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any

from tail_service.core.ratelimit import Priority


class Endpoint(enum.StrEnum):
    """Which OpenAI operation a request is for."""

    #: ``POST /v1/chat/completions``
    CHAT = "chat"
    #: ``POST /v1/completions`` (legacy)
    COMPLETION = "completion"
    #: ``POST /v1/embeddings``
    EMBEDDING = "embedding"


@dataclass(frozen=True, slots=True)
class Deployment:
    """One upstream that serves a public model.

    Several deployments with the same ``model`` are spread by ``weight`` and fall back
    to each other. Times are in seconds.
    """

    #: unique id, ``<model>#<index>`` in config order
    id: str
    #: public model id clients send
    model: str
    #: adapter name: ``openai``, ``anthropic`` or ``local``
    provider: str
    #: base URL of the upstream API (``.../v1`` for OpenAI-compatible ones)
    base_url: str
    #: model name sent upstream
    upstream_model: str
    #: which endpoints this deployment serves
    endpoints: frozenset[Endpoint]
    weight: float = 1.0
    #: whole-attempt deadline (non-streaming) or time to first byte (streaming)
    timeout: float = 600.0
    connect_timeout: float = 5.0
    #: retries on the same deployment before falling back
    max_retries: int = 2
    #: failures in a row that put the deployment into cooldown
    allowed_fails: int = 3
    cooldown: float = 30.0
    #: whether ``dimensions`` is accepted for embeddings
    supports_dimensions: bool = False
    owned_by: str = "tail-service"
    #: extra headers sent upstream (not secret)
    headers: tuple[tuple[str, str], ...] = ()
    #: name of the credential, resolved by a ``CredentialSource`` per call
    credential: str | None = None
    #: per-key limits on this model (0: none): requests/min, tokens/min, in flight
    rpm: int = 0
    tpm: int = 0
    max_concurrency: int = 0
    #: the same, for all keys together
    total_rpm: int = 0
    total_tpm: int = 0
    total_max_concurrency: int = 0


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a verified API key and its policy (from auth-service)."""

    key_id: str
    tenant: str
    name: str = ""
    #: models this key may use; empty means every model
    allowed_models: frozenset[str] = frozenset()
    #: per-key limits; 0 means no limit of that kind
    rpm: int = 0
    tpm: int = 0
    max_concurrency: int = 0
    #: unix seconds; 0 means never
    expires_at: int = 0
    #: the key's requests use the response cache unless they say ``x-tail-cache: skip``
    response_cache: bool = False
    #: MCP servers its agent runs may use; empty means every configured one
    mcp_servers: frozenset[str] = frozenset()
    #: the key's budget in USD per period (0: none); period ``day`` or ``month`` (UTC,
    #: calendar) or ``none`` (never resets)
    budget_usd: float = 0.0
    budget_period: str = "none"
    #: the same for the key's tenant (all its keys together)
    tenant_budget_usd: float = 0.0
    tenant_budget_period: str = "none"
    #: MCP servers the agent runs of all the tenant's keys may use; empty means every one
    tenant_mcp_servers: frozenset[str] = frozenset()

    def allows_mcp_server(self, name: str) -> bool:
        """Whether both the key's list and its tenant's allow the MCP server ``name``."""
        key = not self.mcp_servers or name in self.mcp_servers
        return key and (not self.tenant_mcp_servers or name in self.tenant_mcp_servers)

    def allows(self, model: str) -> bool:
        return not self.allowed_models or model in self.allowed_models


#: the caller when authentication is disabled (development and benchmarks)
ANONYMOUS = Principal(key_id="anonymous", tenant="anonymous", name="anonymous")


@dataclass(frozen=True, slots=True)
class RequestParams:
    """The request fields the gateway itself acts on, parsed strictly once at the edge.

    Everything else in the body passes through to the upstream as the client sent it
    (validated, but not read here).
    """

    stream: bool = False
    #: ``stream_options.include_usage`` as the client asked
    include_usage: bool = False
    #: choices asked for (``n``)
    n: int = 1
    #: ``max_completion_tokens``, else ``max_tokens``; ``None`` when the client set neither
    max_output_tokens: int | None = None
    #: embeddings: ``dimensions`` when given
    dimensions: int | None = None
    #: embeddings: ``encoding_format`` is ``base64``
    base64: bool = False


class Source(enum.StrEnum):
    """What kind of billable unit a request is (for the usage ledger)."""

    API = "api"
    BATCH = "batch"
    AGENT = "agent"


@dataclass(slots=True)
class RequestStats:
    """What one HTTP request learns on its way, for its metrics and its access log line.

    Created per request by the request-id middleware (``scope["state"]["stats"]``) and
    filled in by whoever learns something: the handlers (key id, model), the inference
    service (usage, cache verdict), the proxy (the deployment that answered), the SSE
    response (a stream's final status). Only bounded, non-secret facts: never the key,
    the prompt or the answer.
    """

    #: the principal's key id (never the key); ``-`` before authentication
    key_id: str = "-"
    #: the model as the client named it (metrics map unconfigured names to ``unknown``)
    model: str = ""
    #: the deployment that answered (``<model>#<index>``)
    deployment: str = ""
    #: token usage, once recorded
    usage: TokenUsage | None = None
    #: the response cache's verdict: ``hit``, ``miss`` or ``""`` (not consulted)
    cache: str = ""
    #: an SSE response
    stream: bool = False
    #: ``time.perf_counter()`` when the first body chunk of a stream was sent (0: not yet)
    first_byte: float = 0.0
    #: the final status when it differs from the one sent: a stream that failed after its
    #: first byte (the in-band error's status) or whose client left (499); 0 otherwise
    status: int = 0
    #: a 429's bounded reason (:attr:`tail_service.errors.RateLimitError.reason`)
    reject_reason: str = ""


@dataclass(frozen=True, slots=True)
class ProxyRequest:
    """A validated client request on its way to a deployment."""

    endpoint: Endpoint
    #: public model id as the client sent it
    model: str
    #: the validated wire body; unknown fields are kept for pass-through
    body: dict[str, Any]
    params: RequestParams = RequestParams()
    request_id: str = ""
    #: headers to forward upstream (already filtered)
    forward_headers: tuple[tuple[str, str], ...] = ()
    principal: Principal = ANONYMOUS
    #: ``x-tail-cache``: ``use``, ``skip`` or ``refresh`` (see :mod:`tail_service.core.cache`)
    cache_mode: str = "skip"
    #: size of the request body in bytes (large prompts are counted off the event loop)
    body_bytes: int = 0
    #: batch lines are admitted only into the capacity interactive calls leave spare
    priority: Priority = Priority.INTERACTIVE
    #: an API call, a batch line or an agent step
    source: Source = Source.API
    #: what the HTTP request learns on its way, for its metrics and access log (API only)
    stats: RequestStats | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole answer: the OpenAI-shaped body, its usage, and the headers for the reply."""

    body: dict[str, Any]
    usage: TokenUsage
    #: rate-limit and cache headers for the response
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class ChunkStream:
    """A stream that has produced its first chunk: nothing has been sent to the client yet.

    ``first`` is already in hand, so failures before it were ordinary errors with a status
    code; ``rest`` yields the remaining chunks and must be closed (``aclose``) if dropped.
    """

    first: dict[str, Any]
    rest: AsyncGenerator[dict[str, Any], None]
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class UpstreamCall:
    """What a provider needs for one attempt against one deployment."""

    deployment: Deployment
    #: OpenAI-shaped body with ``model`` already set to ``deployment.upstream_model``
    body: dict[str, Any]
    #: plaintext credential for this attempt; never logged or put in a repr
    api_key: str | None = field(default=None, repr=False)
    request_id: str = ""
    #: seconds left for this attempt
    timeout: float = 600.0
    forward_headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Token counts of one request (summed over all choices)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: prompt tokens the provider read from its prompt cache (included in ``prompt_tokens``)
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_openai(cls, usage: Any) -> TokenUsage | None:
        """Read an OpenAI ``usage`` object; ``None`` when absent or malformed."""
        if not isinstance(usage, dict):
            return None
        p = usage.get("prompt_tokens")
        c = usage.get("completion_tokens", 0)
        if not isinstance(p, int) or not isinstance(c, int):
            return None
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        return cls(p, c, cached if isinstance(cached, int) and 0 <= cached <= p else 0)

    def to_openai(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
