"""The gateway's view of budgets: :class:`AuthClient` fills the core principal's budget
fields, and a tenant budget change evicts the tenant's cached verdicts at once."""

from __future__ import annotations

import asyncio

from tail_service.clients.auth import AuthClient, principal_from_proto
from tail_service.clients.grpc_channel import ReloadingChannel
from tail_service.proto import auth_pb2
from tail_service.settings import AuthSettings
from tests.stack_fixtures import Stack


def test_a_principal_without_budgets_has_none() -> None:
    """An older auth-service sends no ``Budget``: no budget, period ``none``."""
    p = principal_from_proto(auth_pb2.Principal(key_id="key_1", tenant="acme"))
    assert (p.budget_usd, p.budget_period, p.tenant_budget_usd, p.tenant_budget_period) == (
        0,
        "none",
        0,
        "none",
    )


async def test_tenant_budget_change_reaches_cached_verdicts(stack: Stack) -> None:
    key = stack.create_key(budget=auth_pb2.Budget(usd=5, period="day"))
    stack.create_key(tenant="beta")
    settings = AuthSettings(address=f"127.0.0.1:{stack.auth_port}", tls=stack.tls_for("tail"), cache_ttl=60)
    client = AuthClient(ReloadingChannel(settings.address or "", stack.tls_for("tail")), settings)
    client.start()
    try:
        async with asyncio.timeout(10):
            while not client.watch_connected:  # noqa: ASYNC110 - a flag, polled with a bound
                await asyncio.sleep(0.02)
        p = await client.authenticate(key)  # cached now, for 60 s
        assert (p.budget_usd, p.budget_period, p.tenant_budget_usd, p.tenant_budget_period) == (
            5.0,
            "day",
            0.0,
            "none",
        )
        request = auth_pb2.SetTenantBudgetRequest(tenant="acme", budget=auth_pb2.Budget(usd=100))
        await asyncio.to_thread(lambda: stack.admin_auth().SetTenantBudget(request, timeout=5))
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(5):  # the UPDATED event evicts the verdict cached for 60 s
            while (await client.authenticate(key)).tenant_budget_usd != 100:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        assert loop.time() - started < 2.0
        p = await client.authenticate(key)
        assert (p.budget_usd, p.tenant_budget_usd, p.tenant_budget_period) == (5.0, 100.0, "month")
    finally:
        await client.close()
