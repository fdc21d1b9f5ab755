"""The routes that manage the endpoint's scoped keys (endpoint/keys.py), for the API token only (they sit
under the same bearer check as every admin path; a scoped key never reaches them):

- GET /v1/keys: every key, never its text or hash
- POST /v1/keys {"name", "agents"?: [NAME, ...], "all_agents"?: bool, "models"?: bool, "expires"?: "30d"}
  -> 201 {"key": {...}, "secret": "sk-stigmer-..."}: the only answer that ever holds the key's text
- DELETE /v1/keys/NAME -> {"removed": NAME}: the key fails from its next request
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from stigmer.errors import ErrorCode, StigmerError

if TYPE_CHECKING:
    from stigmer.endpoint.keys import Keys

FIELDS = ("name", "agents", "all_agents", "models", "expires")


def _invalid(message: str) -> StigmerError:
    return StigmerError(message, code=ErrorCode.INVALID_INPUT)


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _invalid(f"`{name}` must be true or false.")
    return value


def parse_create(body: dict[str, Any]) -> dict[str, Any]:
    """The arguments of Keys.create from a POST body, each of its type or a 400 naming the field."""
    from stigmer.endpoint.keys import parse_duration

    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise _invalid(f"Unknown field {unknown[0][:40]!r}: a key has {', '.join(FIELDS)}.")
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise _invalid("`name` must be the key's name.")
    agents = body.get("agents")
    if agents is not None and (not isinstance(agents, list) or not all(isinstance(a, str) for a in agents)):
        raise _invalid("`agents` must be a list of agent names.")
    expires = body.get("expires")
    if expires is not None and not isinstance(expires, str):
        raise _invalid('`expires` must be a duration such as "30d", or null for a key that does not expire.')
    return {
        "name": name,
        "agents": agents,
        "all_agents": _flag(body, "all_agents"),
        "models": _flag(body, "models"),
        "expires_in": parse_duration(expires) if expires is not None else None,
    }


def routes(keys: Callable[[], Keys]) -> list[Route]:
    from stigmer.server.api.app import body_of

    async def key_list(request: Request) -> JSONResponse:
        if request.method == "GET":
            return JSONResponse([k.to_dict() for k in keys().list()])
        args = parse_create(await body_of(request))
        key, secret = keys().create(args.pop("name"), **args)
        return JSONResponse(
            {"key": key.to_dict(), "secret": secret}, status_code=201, headers={"Cache-Control": "no-store"}
        )

    async def key(request: Request) -> JSONResponse:
        name = request.path_params["name"]
        keys().remove(name)
        return JSONResponse({"removed": name})

    return [
        Route("/v1/keys", key_list, methods=["GET", "POST"]),
        Route("/v1/keys/{name}", key, methods=["DELETE"]),
    ]
