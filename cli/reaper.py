"""`keybrake reaper`: watch Argo Workflows and revoke the keys of runs that ended without their
exit handler revoking them (terminated, deleted, a failed exit handler, a controller outage)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Coroutine
from datetime import timedelta
from typing import Annotated, Any

import typer

from keybrake.cli._common import EXIT_USAGE, err_console, fail
from keybrake.cli._connection import ApiKeyOption, UrlOption, connect
from keybrake.proxy.client import DEFAULT_URL
from keybrake.proxy.money import parse_duration


def _duration(text: str, option: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        fail(f"{option}: {exc}", EXIT_USAGE)


def reaper(
    cluster: Annotated[
        str,
        typer.Option(
            envvar="KEYBRAKE_CLUSTER",
            help="This cluster's name, as the issue steps record it (the templates' cluster "
            "parameter). Keys of other clusters are never touched.",
        ),
    ],
    namespace: Annotated[
        str | None,
        typer.Option(envvar="KEYBRAKE_REAPER_NAMESPACE", help="Watch one namespace (default all)."),
    ] = None,
    grace: Annotated[
        str,
        typer.Option(
            envvar="KEYBRAKE_REAPER_GRACE",
            help="How long a finished run's keys may stay live before the reaper revokes them "
            "(its exit handler normally has).",
        ),
    ] = "60s",
    orphan_grace: Annotated[
        str,
        typer.Option(
            envvar="KEYBRAKE_REAPER_ORPHAN_GRACE",
            help="How old a key must be before it is revoked when no Workflow has its uid.",
        ),
    ] = "15m",
    resync: Annotated[
        str, typer.Option(envvar="KEYBRAKE_REAPER_RESYNC", help="Sweep at least this often.")
    ] = "30s",
    kubeconfig: Annotated[
        str | None,
        typer.Option(
            envvar="KUBECONFIG",
            help="A kubeconfig file (default: in-cluster credentials, else ~/.kube/config).",
        ),
    ] = None,
    context: Annotated[
        str | None, typer.Option(help="The kubeconfig context (default: its current one).")
    ] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Revoke the keys and budgets of runs that are over: terminated or deleted at once, finished
    ones still live after --grace, and keys whose Workflow cannot be found after --orphan-grace.
    Give it a revoke-only issuer token (`keybrake issuers create --revoke-only`).

    Example: keybrake reaper --cluster prod-eu --url https://keybrake.keybrake-system:8080
    """
    from lightkube import AsyncClient
    from lightkube.config.kubeconfig import KubeConfig
    from lightkube.core.exceptions import ConfigError

    from keybrake.reaper.reaper import Reaper

    grace_span = _duration(grace, "--grace")
    orphan_span = _duration(orphan_grace, "--orphan-grace")
    resync_span = _duration(resync, "--resync")
    try:
        if kubeconfig:
            config = KubeConfig.from_file(kubeconfig.split(os.pathsep)[0])
        else:
            config = KubeConfig.from_env()
        kube = AsyncClient(config.get(context) if context else config)
    except (ConfigError, OSError, KeyError, ValueError) as exc:
        fail(f"no usable Kubernetes credentials: {exc}", EXIT_USAGE)
    logging.basicConfig(level=logging.INFO, format="keybrake reaper: %(message)s")
    with connect(url, api_key) as client:
        client.budgets_page(status="active", limit=1)  # a bad token or URL fails here, not later
        the_reaper = Reaper(
            client,
            kube,
            cluster=cluster,
            namespace=namespace,
            grace=grace_span,
            orphan_grace=orphan_span,
            resync=resync_span,
        )
        err_console().print(
            f"keybrake reaper: cluster {cluster}, watching workflows in "
            f"{namespace or 'all namespaces'}; grace {grace}, orphan grace {orphan_grace}"
        )
        asyncio.run(_until_signalled(the_reaper.run()))


async def _until_signalled(work: Coroutine[Any, Any, None]) -> None:
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task
