"""A small MCP server (stdio) to try agent runs with: ``population`` and ``area`` of a few
cities. Written with the official ``mcp`` SDK; Tail Service starts it itself when the
config names it:

    mcp_servers:
      - name: facts
        command: [python, examples/mcp_facts_server.py]
"""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

CITIES = {
    "Paris": (2_102_650, 105.4),
    "Berlin": (3_878_100, 891.1),
    "Tokyo": (14_187_176, 627.5),
    "Lagos": (15_388_000, 1171.3),
}

server: MCPServer = MCPServer("facts", log_level="WARNING")


def _city(name: str) -> tuple[int, float]:
    found = CITIES.get(name.strip().title())
    if found is None:
        raise ToolError(f"I know no city called {name!r}; I know {', '.join(CITIES)}.")
    return found


@server.tool(description="The number of people living in a city (Paris, Berlin, Tokyo or Lagos).")
def population(city: str) -> str:
    return str(_city(city)[0])


@server.tool(description="The area of a city in square kilometres (Paris, Berlin, Tokyo or Lagos).")
def area(city: str) -> str:
    return str(_city(city)[1])


if __name__ == "__main__":
    server.run("stdio")
