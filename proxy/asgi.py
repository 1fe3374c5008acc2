"""Entry point for ASGI servers: `uvicorn --factory keybrake.proxy.asgi:create_app`."""

from __future__ import annotations

from starlette.applications import Starlette

from keybrake.proxy.app import build_app
from keybrake.proxy.settings import Settings

__all__ = ["create_app"]


def create_app() -> Starlette:
    return build_app(Settings())
