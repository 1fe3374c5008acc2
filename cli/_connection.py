"""Where the proxy is and how to reach it: the options every client command shares."""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, TypeVar

import typer

from keybrake.cli._common import EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE, fail
from keybrake.proxy.client import KeybrakeClient
from keybrake.proxy.errors import ApiError, ProxyUnreachable

__all__ = ["ApiKeyOption", "IgnoreNotFoundOption", "UrlOption", "ask_proxy", "connect"]

T = TypeVar("T")

UrlOption = Annotated[
    str,
    typer.Option("--url", envvar="KEYBRAKE_URL", help="The proxy's base URL.", show_default=True),
]
ApiKeyOption = Annotated[
    str,
    typer.Option("--api-key", envvar="KEYBRAKE_API_KEY", help="Admin token.", show_default=False),
]


# Set by the `--ca-bundle` option (or KEYBRAKE_CA_BUNDLE) of each invocation.
ca_bundle: str | None = None


IgnoreNotFoundOption = Annotated[
    bool,
    typer.Option(
        "--ignore-not-found", help="Exit 0, printing nothing, when it does not exist (scripts)."
    ),
]


@contextmanager
def connect(url: str, api_key: str, *, ignore_not_found: bool = False) -> Iterator[KeybrakeClient]:
    """A client whose expected failures become one-line errors and the documented exit codes.
    An https proxy's certificate is checked against KEYBRAKE_CA_BUNDLE (or `keybrake
    --ca-bundle`) when set, else the system's CAs."""
    if not api_key:
        fail("no admin token: set KEYBRAKE_API_KEY or pass --api-key", EXIT_USAGE)
    if ca_bundle and not os.path.isfile(ca_bundle):
        fail(f"KEYBRAKE_CA_BUNDLE: no such file {ca_bundle!r}", EXIT_USAGE)
    try:
        client = KeybrakeClient(url, api_key, ca_bundle=ca_bundle)
    except ssl.SSLError as exc:
        fail(f"KEYBRAKE_CA_BUNDLE: not a PEM bundle of CA certificates: {exc}", EXIT_USAGE)
    try:
        yield client
    except ProxyUnreachable as exc:
        fail(
            str(exc),
            EXIT_UNREACHABLE,
            "Is it running? Start one with `keybrake serve`, or point --url / KEYBRAKE_URL at it.",
        )
    except ApiError as exc:
        if exc.status == 404 and ignore_not_found:
            raise typer.Exit(0) from None
        fail(f"the proxy refused: {exc.message} (HTTP {exc.status})", EXIT_REFUSED)
    finally:
        client.close()


def ask_proxy(
    url: str,
    api_key: str,
    request: Callable[[KeybrakeClient], T],
    *,
    ignore_not_found: bool = False,
) -> T:
    """The answer to one request (`request(client)`), with `connect`'s errors and exit codes:
    for the commands that make a single request."""
    with connect(url, api_key, ignore_not_found=ignore_not_found) as client:
        return request(client)
