"""`keybrake serve`: run the proxy under uvicorn."""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import socket
import ssl
import tempfile
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError
from rich.markup import escape

from keybrake.cli._common import EXIT_USAGE, console, err_console, fail
from keybrake.proxy.errors import ConfigError, StoreUnavailable
from keybrake.proxy.redact import redact
from keybrake.proxy.settings import Settings, read_settings_file, unknown_variables

if TYPE_CHECKING:
    import uvicorn


class EventLoop(StrEnum):
    asyncio = "asyncio"
    uvloop = "uvloop"


def serve(
    ctx: typer.Context,
    host: Annotated[
        str, typer.Option(help="Interface to listen on (0.0.0.0 in a container).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8080,
    workers: Annotated[
        int, typer.Option(min=1, max=64, help="Processes sharing one database.")
    ] = 1,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            envvar="KEYBRAKE_DATABASE_URL",
            help="sqlite:///PATH or postgresql://...",
        ),
    ] = None,
    generate_api_key: Annotated[
        bool,
        typer.Option(
            "--generate-api-key", help="No KEYBRAKE_API_KEY set? Make one and print it once."
        ),
    ] = False,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "warning",
    loop: Annotated[
        EventLoop,
        typer.Option(
            "--loop",
            help="Event loop. uvloop gives up to ~10 % more calls/s, but in our benchmark it "
            "stalled some connections for seconds at 256 concurrent ones (docs/benchmarks.md).",
        ),
    ] = EventLoop.asyncio,
    fd: Annotated[
        int | None, typer.Option("--fd", hidden=True, help="Serve on an already bound socket.")
    ] = None,
    settings_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            envvar="KEYBRAKE_CONFIG",
            help="File of KEYBRAKE_*=value lines; the environment wins over it.",
        ),
    ] = None,
) -> None:
    """Start the vault-key proxy.

    Example: KEYBRAKE_API_KEY=... KEYBRAKE_STRIPE_SECRET_KEY=sk_live_... keybrake serve --port 8080
    """
    # The server's own modules load here, not when any other command starts.
    import uvicorn

    from keybrake.cli.db import upgrade_database
    from keybrake.proxy.app import build_app
    from keybrake.proxy.tls import ReloadingCertificate, TLSConfig

    if settings_file is not None:
        try:
            for name, value in read_settings_file(settings_file).items():
                if not os.environ.get(name):  # the environment wins over the file
                    os.environ[name] = value
        except ConfigError as exc:
            fail(str(exc), EXIT_USAGE)
    if database_url:
        os.environ["KEYBRAKE_DATABASE_URL"] = database_url
    if not os.environ.get("KEYBRAKE_API_KEY"):
        if not generate_api_key:
            fail(
                "KEYBRAKE_API_KEY is not set; the admin API needs a token.",
                EXIT_USAGE,
                "Set it (e.g. export KEYBRAKE_API_KEY=$(openssl rand -hex 32)) "
                "or pass --generate-api-key to have one made and printed.",
            )
        os.environ["KEYBRAKE_API_KEY"] = "kba_" + secrets.token_urlsafe(32)
        err_console().print(f"generated admin token: {os.environ['KEYBRAKE_API_KEY']}")
    try:
        settings = Settings()
        warn_of_unknown_variables(_command_variables(ctx))
        build_app(settings)  # validates settings and the pricing table before forking workers
        upgrade_database(settings.database_url)
    except (ConfigError, StoreUnavailable) as exc:
        fail(str(exc), EXIT_USAGE)
    except ValidationError as exc:
        fail(setting_error(exc), EXIT_USAGE)
    except SettingsError as exc:
        fail(setting_error(exc), EXIT_USAGE)
    except ValueError as exc:
        fail(f"invalid setting: {exc}", EXIT_USAGE)
    vendors = ", ".join(sorted(settings.vendor_credentials())) or "none (set KEYBRAKE_<VENDOR>_*)"
    database = (
        settings.database_url.split("@")[-1]
        if "@" in settings.database_url
        else (settings.database_url)
    )
    tls = settings.tls_cert_file is not None
    if tls != (settings.tls_key_file is not None):
        fail("KEYBRAKE_TLS_CERT_FILE and KEYBRAKE_TLS_KEY_FILE go together", EXIT_USAGE)
    if tls:
        try:
            assert settings.tls_cert_file is not None and settings.tls_key_file is not None
            ReloadingCertificate(settings.tls_cert_file, settings.tls_key_file)
        except (OSError, ssl.SSLError) as exc:
            fail(f"cannot use the TLS certificate and key: {exc}", EXIT_USAGE)
    scheme = "https" if tls else "http"
    # Bind before saying where: the address printed is the real one (a free port for --port 0),
    # and a busy port is one line, not uvicorn's traceback after a "listening" that was not true.
    sock = socket.socket(fileno=fd) if fd is not None else listen_on(host, port)
    where = f"{scheme}://{_address(sock)}"
    if fd is not None:
        where += f" (file descriptor {fd})"
    console().print(
        f"keybrake proxy listening on {where} "
        f"(workers: {workers}, database: {database}, vendors: {vendors})",
        soft_wrap=True,
    )
    config = TLSConfig(
        "keybrake.proxy.asgi:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        access_log=False,
        loop=loop.value,
        http="httptools",
        timeout_graceful_shutdown=int(settings.upstream_timeout) + 5,
        ssl_certfile=str(settings.tls_cert_file) if tls else None,
        ssl_keyfile=str(settings.tls_key_file) if tls else None,
    )
    # Serving on our own socket: socket(fileno=) for --fd keeps the socket's real family
    # (uvicorn's own --fd assumes AF_UNIX, which leaves Nagle on for TCP and costs ~40 ms per
    # small response).
    if workers == 1:
        uvicorn.Server(config).run(sockets=[sock])
    else:
        _multiprocess(config, sock)


def listen_on(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one), or a one-line error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        fail(f"cannot listen on {host}:{port}: unknown host ({exc.strerror})", EXIT_USAGE)
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        fail(
            f"cannot listen on {host}:{port}: {reason}",
            EXIT_USAGE,
            "Pick another with --port (0 for any free one)."
            if exc.errno == errno.EADDRINUSE
            else None,
        )
    sock.set_inheritable(True)
    return sock


def _address(sock: socket.socket) -> str:
    name = sock.getsockname()
    host, port = str(name[0]), int(name[1])
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def warn_of_unknown_variables(also_known: set[str]) -> None:
    """One line on stderr per KEYBRAKE_ variable that is neither a setting (the settings ignore
    it) nor in `also_known`, with the setting it likely misspells. Printed once the settings
    parse: a start refused for a bad value stays that one line. Names only: a value may be a
    secret."""
    for name, closest in unknown_variables(os.environ, also_known):
        guess = f"; did you mean {closest}?" if closest else ""
        err_console().print(
            f"[yellow]warning:[/yellow] {escape(name)} is not a keybrake setting and is "
            f"ignored{guess}",
            soft_wrap=True,
        )


def _command_variables(ctx: typer.Context) -> set[str]:
    """The variables the `keybrake` commands read (their options' `envvar`:
    KEYBRAKE_URL, KEYBRAKE_CA_BUNDLE, KEYBRAKE_CONFIG, KEYBRAKE_REAPER_GRACE, ...): a proxy's
    environment may well hold them, and they are no typo."""
    found: set[str] = set()
    pending = [ctx.find_root().command]
    while pending:
        command = pending.pop()
        for param in command.params:
            if isinstance(param.envvar, str):
                found.add(param.envvar)
            elif param.envvar:
                found.update(param.envvar)
        pending.extend(getattr(command, "commands", {}).values())
    return found


def setting_error(exc: ValidationError | SettingsError) -> str:
    """A bad setting in one line that names its variable (pydantic's own text is several, with
    a link)."""
    if isinstance(exc, SettingsError):
        match = re.search(r'field "(\w+)"', str(exc))
        name = f"KEYBRAKE_{match.group(1).upper()}" if match else "a KEYBRAKE_ setting"
        return f'{name}: cannot be parsed (a list or mapping is given as JSON, e.g. ["a"])'
    parts = []
    for item in exc.errors():
        field = str(item["loc"][0]) if item["loc"] else ""
        name = f"KEYBRAKE_{field.upper()}" if field else "settings"
        message = str(item["msg"]).removeprefix("Value error, ")
        given = item.get("input")
        model_field = Settings.model_fields.get(field)
        secret = model_field is not None and "SecretStr" in str(model_field.annotation)
        shown = (
            f" (got {redact(str(given))[:40]!r})"
            if isinstance(given, str | int) and not secret
            else ""
        )
        parts.append(f"{name}: {message}{shown}")
    return "; ".join(parts)


def _multiprocess(config: uvicorn.Config, sock: socket.socket) -> None:
    """N workers on one socket. Their metrics go to a folder they share (prometheus_client's
    multiprocess mode, read by whichever worker a scrape reaches); the workers are spawned, so
    the variable set here reaches them before they import prometheus_client."""
    from uvicorn.supervisors import Multiprocess

    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    folder = Path(given) if given else Path(tempfile.mkdtemp(prefix="keybrake-metrics-"))
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):  # an earlier run's counts would be added to this one's
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    try:
        Multiprocess(config, sockets=[sock]).run()
    finally:
        if not given:
            shutil.rmtree(folder, ignore_errors=True)
