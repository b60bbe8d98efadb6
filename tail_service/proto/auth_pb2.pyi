from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Limits(_message.Message):
    __slots__ = ("rpm", "tpm", "max_concurrency")
    RPM_FIELD_NUMBER: _ClassVar[int]
    TPM_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    rpm: int
    tpm: int
    max_concurrency: int
    def __init__(self, rpm: _Optional[int] = ..., tpm: _Optional[int] = ..., max_concurrency: _Optional[int] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("usd", "period")
    USD_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    usd: float
    period: str
    def __init__(self, usd: _Optional[float] = ..., period: _Optional[str] = ...) -> None: ...

class Principal(_message.Message):
    __slots__ = ("key_id", "tenant", "name", "allowed_models", "limits", "expires_at", "response_cache", "mcp_servers", "budget", "tenant_budget", "tenant_mcp_servers")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_MODELS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_CACHE_FIELD_NUMBER: _ClassVar[int]
    MCP_SERVERS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    TENANT_BUDGET_FIELD_NUMBER: _ClassVar[int]
    TENANT_MCP_SERVERS_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    tenant: str
    name: str
    allowed_models: _containers.RepeatedScalarFieldContainer[str]
    limits: Limits
    expires_at: int
    response_cache: bool
    mcp_servers: _containers.RepeatedScalarFieldContainer[str]
    budget: Budget
    tenant_budget: Budget
    tenant_mcp_servers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key_id: _Optional[str] = ..., tenant: _Optional[str] = ..., name: _Optional[str] = ..., allowed_models: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., expires_at: _Optional[int] = ..., response_cache: _Optional[bool] = ..., mcp_servers: _Optional[_Iterable[str]] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ..., tenant_budget: _Optional[_Union[Budget, _Mapping]] = ..., tenant_mcp_servers: _Optional[_Iterable[str]] = ...) -> None: ...

class KeyInfo(_message.Message):
    __slots__ = ("id", "name", "tenant", "allowed_models", "limits", "expires_at", "revoked", "prefix", "created_at", "updated_at", "response_cache", "mcp_servers", "budget")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_MODELS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_CACHE_FIELD_NUMBER: _ClassVar[int]
    MCP_SERVERS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    tenant: str
    allowed_models: _containers.RepeatedScalarFieldContainer[str]
    limits: Limits
    expires_at: int
    revoked: bool
    prefix: str
    created_at: int
    updated_at: int
    response_cache: bool
    mcp_servers: _containers.RepeatedScalarFieldContainer[str]
    budget: Budget
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., tenant: _Optional[str] = ..., allowed_models: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., expires_at: _Optional[int] = ..., revoked: _Optional[bool] = ..., prefix: _Optional[str] = ..., created_at: _Optional[int] = ..., updated_at: _Optional[int] = ..., response_cache: _Optional[bool] = ..., mcp_servers: _Optional[_Iterable[str]] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ...) -> None: ...

class VerifyKeyRequest(_message.Message):
    __slots__ = ("api_key",)
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    def __init__(self, api_key: _Optional[str] = ...) -> None: ...

class VerifyKeyResponse(_message.Message):
    __slots__ = ("principal",)
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    principal: Principal
    def __init__(self, principal: _Optional[_Union[Principal, _Mapping]] = ...) -> None: ...

class CreateKeyRequest(_message.Message):
    __slots__ = ("name", "tenant", "allowed_models", "limits", "expires_at", "response_cache", "mcp_servers", "budget")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_MODELS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_CACHE_FIELD_NUMBER: _ClassVar[int]
    MCP_SERVERS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    name: str
    tenant: str
    allowed_models: _containers.RepeatedScalarFieldContainer[str]
    limits: Limits
    expires_at: int
    response_cache: bool
    mcp_servers: _containers.RepeatedScalarFieldContainer[str]
    budget: Budget
    def __init__(self, name: _Optional[str] = ..., tenant: _Optional[str] = ..., allowed_models: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., expires_at: _Optional[int] = ..., response_cache: _Optional[bool] = ..., mcp_servers: _Optional[_Iterable[str]] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ...) -> None: ...

class CreateKeyResponse(_message.Message):
    __slots__ = ("key", "api_key")
    KEY_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    key: KeyInfo
    api_key: str
    def __init__(self, key: _Optional[_Union[KeyInfo, _Mapping]] = ..., api_key: _Optional[str] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ("tenant", "include_revoked")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_REVOKED_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    include_revoked: bool
    def __init__(self, tenant: _Optional[str] = ..., include_revoked: _Optional[bool] = ...) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[KeyInfo]
    def __init__(self, keys: _Optional[_Iterable[_Union[KeyInfo, _Mapping]]] = ...) -> None: ...

class RevokeKeyRequest(_message.Message):
    __slots__ = ("id", "api_key")
    ID_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    id: str
    api_key: str
    def __init__(self, id: _Optional[str] = ..., api_key: _Optional[str] = ...) -> None: ...

class RevokeKeyResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: KeyInfo
    def __init__(self, key: _Optional[_Union[KeyInfo, _Mapping]] = ...) -> None: ...

class UpdateKeyRequest(_message.Message):
    __slots__ = ("id", "rpm", "tpm", "max_concurrency", "name", "expires_at", "set_allowed_models", "allowed_models", "response_cache", "set_mcp_servers", "mcp_servers", "budget_usd", "budget_period")
    ID_FIELD_NUMBER: _ClassVar[int]
    RPM_FIELD_NUMBER: _ClassVar[int]
    TPM_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    SET_ALLOWED_MODELS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_MODELS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_CACHE_FIELD_NUMBER: _ClassVar[int]
    SET_MCP_SERVERS_FIELD_NUMBER: _ClassVar[int]
    MCP_SERVERS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_USD_FIELD_NUMBER: _ClassVar[int]
    BUDGET_PERIOD_FIELD_NUMBER: _ClassVar[int]
    id: str
    rpm: int
    tpm: int
    max_concurrency: int
    name: str
    expires_at: int
    set_allowed_models: bool
    allowed_models: _containers.RepeatedScalarFieldContainer[str]
    response_cache: bool
    set_mcp_servers: bool
    mcp_servers: _containers.RepeatedScalarFieldContainer[str]
    budget_usd: float
    budget_period: str
    def __init__(self, id: _Optional[str] = ..., rpm: _Optional[int] = ..., tpm: _Optional[int] = ..., max_concurrency: _Optional[int] = ..., name: _Optional[str] = ..., expires_at: _Optional[int] = ..., set_allowed_models: _Optional[bool] = ..., allowed_models: _Optional[_Iterable[str]] = ..., response_cache: _Optional[bool] = ..., set_mcp_servers: _Optional[bool] = ..., mcp_servers: _Optional[_Iterable[str]] = ..., budget_usd: _Optional[float] = ..., budget_period: _Optional[str] = ...) -> None: ...

class UpdateKeyResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: KeyInfo
    def __init__(self, key: _Optional[_Union[KeyInfo, _Mapping]] = ...) -> None: ...

class GetPrincipalsRequest(_message.Message):
    __slots__ = ("key_ids",)
    KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    key_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetPrincipalsResponse(_message.Message):
    __slots__ = ("principals",)
    PRINCIPALS_FIELD_NUMBER: _ClassVar[int]
    principals: _containers.RepeatedCompositeFieldContainer[Principal]
    def __init__(self, principals: _Optional[_Iterable[_Union[Principal, _Mapping]]] = ...) -> None: ...

class WatchKeyEventsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KeyEvent(_message.Message):
    __slots__ = ("event_id", "key_id", "kind")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[KeyEvent.Kind]
        REVOKED: _ClassVar[KeyEvent.Kind]
        UPDATED: _ClassVar[KeyEvent.Kind]
        HELLO: _ClassVar[KeyEvent.Kind]
    KIND_UNSPECIFIED: KeyEvent.Kind
    REVOKED: KeyEvent.Kind
    UPDATED: KeyEvent.Kind
    HELLO: KeyEvent.Kind
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    event_id: int
    key_id: str
    kind: KeyEvent.Kind
    def __init__(self, event_id: _Optional[int] = ..., key_id: _Optional[str] = ..., kind: _Optional[_Union[KeyEvent.Kind, str]] = ...) -> None: ...

class TenantInfo(_message.Message):
    __slots__ = ("tenant", "budget", "updated_at", "mcp_servers")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    MCP_SERVERS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    budget: Budget
    updated_at: int
    mcp_servers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tenant: _Optional[str] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ..., updated_at: _Optional[int] = ..., mcp_servers: _Optional[_Iterable[str]] = ...) -> None: ...

class SetTenantBudgetRequest(_message.Message):
    __slots__ = ("tenant", "budget")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    budget: Budget
    def __init__(self, tenant: _Optional[str] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ...) -> None: ...

class SetTenantBudgetResponse(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: TenantInfo
    def __init__(self, tenant: _Optional[_Union[TenantInfo, _Mapping]] = ...) -> None: ...

class SetTenantMcpServersRequest(_message.Message):
    __slots__ = ("tenant", "mcp_servers")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MCP_SERVERS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    mcp_servers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tenant: _Optional[str] = ..., mcp_servers: _Optional[_Iterable[str]] = ...) -> None: ...

class SetTenantMcpServersResponse(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: TenantInfo
    def __init__(self, tenant: _Optional[_Union[TenantInfo, _Mapping]] = ...) -> None: ...

class GetTenantRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class GetTenantResponse(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: TenantInfo
    def __init__(self, tenant: _Optional[_Union[TenantInfo, _Mapping]] = ...) -> None: ...
