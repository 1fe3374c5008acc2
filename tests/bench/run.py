"""Load bench: keybrake against a direct call, nginx `proxy_pass` and a bare Python passthrough.

    make bench                     # everything, ~10 minutes; results to docs/benchmarks.md
    make bench COMPARE_WITH=d52dceb   # priced calls, this checkout against a git revision
    python -m tests.bench.run --seconds 3 --connections 1,64 --soak 0   # a quick look

Upstream: nginx answering Stripe-shaped JSON, a PaymentIntent and `Request-Id` of its own per call
(installed from
Debian packages with wrk when missing). wrk runs one thread pinned to core 0 (with nginx); the
process under test is pinned to core 1. Bodies are distinct per request so no dedupe window turns
calls into replays. Not part of `make test`: tests never time anything.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.fakes.server import bound_socket, free_port  # noqa: E402
from tests.proxyproc import ADMIN_KEY, STRIPE_SECRET, wait_until_ready  # noqa: E402

PG_ADMIN = os.environ.get("KEYBRAKE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
# Each answer a PaymentIntent of its own, as Stripe's are (nginx's $request_id: 32 hex digits
# per request): a fixed id made every call of the bench pay for the same object, one row the
# ledger's paid-for marks updated on every call, which no real workload does.
UPSTREAM_BODY = (
    '{"id":"pi_$request_id","object":"payment_intent","amount":100,"currency":"usd",'
    '"status":"requires_payment_method"}'
)
WRK_SCRIPT = """
counter = 0
request = function()
  counter = counter + 1
  local body = "amount=100&currency=usd&metadata[n]=" .. counter .. "-" .. math.random(1, 1e9)
  return wrk.format("{method}", "{path}", {{
    ["Authorization"] = "Bearer {key}",
    ["Content-Type"] = "application/x-www-form-urlencoded",
  }}, body)
end
"""


@dataclass
class Cell:
    scenario: str
    backend: str
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    rss_mb: float | None


def pin(cpu: int) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", str(cpu)]
    return []


def ensure_tools() -> None:
    wanted = {"wrk": "wrk", "nginx": "nginx-light"}
    missing = [
        pkg
        for tool, pkg in wanted.items()
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists()
    ]
    if missing:
        print(f"installing {' '.join(missing)} (Debian packages)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True, env=env)


def rss(pid: int) -> tuple[float | None, float | None]:
    """(current, peak) resident set size in MB."""
    values: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line.split(":")[0]] = int(line.split()[1]) / 1024
    except OSError:
        return None, None
    return values.get("VmRSS"), values.get("VmHWM")


@contextmanager
def nginx(workdir: Path) -> Iterator[tuple[str, str]]:
    """Static upstream, and a proxy_pass in front of it (the C reverse-proxy anchor)."""
    static, proxied = free_port(), free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
error_log {workdir}/nginx-error.log;
pid {workdir}/nginx.pid;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {workdir}/body;
  proxy_temp_path {workdir}/proxy;
  keepalive_requests 1000000;
  upstream static {{ server 127.0.0.1:{static}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{static};
    location / {{
      default_type application/json;
      add_header Request-Id req_$request_id;
      return 200 '{UPSTREAM_BODY}';
    }}
  }}
  server {{
    listen 127.0.0.1:{proxied};
    location /stripe/ {{
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer sk_test_bench";
      proxy_pass http://static/;
    }}
  }}
}}
""")
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = subprocess.Popen([*pin(0), exe, "-c", str(conf), "-p", str(workdir)])
    try:
        wait_until_ready(f"http://127.0.0.1:{static}/", proc, "nginx")
        yield f"http://127.0.0.1:{static}", f"http://127.0.0.1:{proxied}"
    finally:
        proc.terminate()
        proc.wait()


@contextmanager
def passthrough(upstream: str, pool: int = 256) -> Iterator[tuple[str, int]]:
    """The bare passthrough, with an upstream pool of `pool` connections (0: unlimited)."""
    port = free_port()
    env = {
        **os.environ,
        "KEYBRAKE_BENCH_UPSTREAM": upstream,
        "KEYBRAKE_BENCH_POOL": str(pool),
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.Popen(
        [
            *pin(1),
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "tests.bench.passthrough:create_app",
            "--port",
            str(port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        env=env,
    )
    try:
        wait_until_ready(f"http://127.0.0.1:{port}/stripe/", proc, "passthrough")
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        proc.wait()


@contextmanager
def keybrake(
    workdir: Path,
    upstream: str,
    database_url: str,
    exe: Path | None = None,
    settings: dict[str, str] | None = None,
) -> Iterator[tuple[str, int]]:
    """`keybrake serve` of this checkout, or of another installation (`exe`)."""
    sock = bound_socket()
    env = {
        **os.environ,
        "KEYBRAKE_API_KEY": ADMIN_KEY,
        "KEYBRAKE_DATABASE_URL": database_url,
        "KEYBRAKE_STRIPE_SECRET_KEY": STRIPE_SECRET,
        "KEYBRAKE_STRIPE_API_BASE": upstream,
        **(settings or {}),
    }
    proc = subprocess.Popen(
        [
            *pin(1),
            str(exe or Path(sys.executable).parent / "keybrake"),
            "serve",
            "--fd",
            str(sock.fileno()),
        ],
        env=env,
        pass_fds=(sock.fileno(),),
        stdout=subprocess.DEVNULL,
        cwd=workdir,
    )
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    try:
        wait_until_ready(url + "/readyz", proc, "keybrake serve", timeout=120)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait()


@contextmanager
def pg_database() -> Iterator[str]:
    import asyncpg

    name = "keybrake_bench_" + uuid.uuid4().hex[:8]

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def issue_key(proxy: str, cap: int = 1_000_000, dedupe: str = "0") -> tuple[str, str]:
    response = httpx.post(
        f"{proxy}/vault/keys",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        json={
            "vendor": "stripe",
            "daily_usd_cap": cap,
            "allowed_endpoints": ["POST /v1/payment_intents", "GET /v1/balance"],
            "expires_in": "2h",
            "agent_run_label": f"argo/bench-{uuid.uuid4().hex[:6]}",
            "dedupe_window": dedupe,
        },
    )
    response.raise_for_status()
    return str(response.json()["vault_key"]), str(response.json()["key_id"])


def wrk(
    url: str, method: str, path: str, key: str, connections: int, seconds: int, workdir: Path
) -> tuple[float, float, float, int]:
    script = workdir / f"bench-{method}.lua"
    script.write_text(WRK_SCRIPT.format(method=method, path=path, key=key))
    out = subprocess.run(
        [
            *pin(0),
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--timeout",
            "10s",
            "--latency",
            "-s",
            str(script),
            url + path,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"50%\s+([\d.]+\w+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"99%\s+([\d.]+\w+)", out).group(1))  # type: ignore[union-attr]
    errors = 0
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(match.group(1))
    if match := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    ):
        errors += sum(int(x) for x in match.groups())
    return rps, p50, p99, errors


def _ms(text: str) -> float:
    number = re.match(r"[\d.]+", text).group(0)  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[text[len(number) :]]


def seed(database_url: str, keys: int, audit_rows: int) -> None:
    """Fill the database the way months of use would: many keys, a long audit log."""
    if database_url.startswith("sqlite:///"):
        import sqlite3

        from keybrake.proxy.store.sqlite import SQLiteStore

        path = database_url.removeprefix("sqlite:///")
        SQLiteStore(path).migrate()
        conn = sqlite3.connect(path)
        conn.executescript(f"""
            WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < {keys})
            INSERT INTO vault_keys (key_id, key_hash, vendor, label, daily_cap_micros, max_per_call_micros,
              allowed_endpoints, metadata, dedupe_window_s, created_at, expires_at, revoked_at)
            SELECT 'vk_seed' || x, randomblob(32), 'stripe', 'argo/seed-' || (x % 5000),
              300000000, NULL, '["POST /v1/payment_intents"]', '{{}}', 600,
              '2026-01-01T00:00:00.000000Z', '2026-01-01T02:00:00.000000Z', NULL FROM n;
            INSERT INTO usage_counts (owner_id, calls) SELECT key_id, 10 FROM vault_keys;
            INSERT INTO spend_window (owner_id, bucket, settled_micros)
              SELECT key_id, 492048, 10000000 FROM vault_keys;
            WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < {audit_rows})
            INSERT INTO audit (ts, key_id, label, vendor, method, path, status, decision, reserved_micros,
              settled_micros, amount, currency, vendor_request_id, idempotency_key, latency_ms, caller_tag)
            SELECT '2026-01-01T00:00:00.000000Z', 'vk_seed' || (x % {keys}), 'argo/seed-' || (x % 5000), 'stripe',
              'POST', '/v1/payment_intents', 200, 'forwarded', 1000000, 1000000, 100, 'usd', 'req_' || x,
              'idem-' || x, 1.5, 'pod-' || x FROM n;
        """)
        conn.commit()
        conn.close()
        return

    import asyncpg

    from keybrake.proxy.store.postgres import migrate_connection

    async def run() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await migrate_connection(conn)
            await conn.execute(f"""
                INSERT INTO vault_keys (key_id, key_hash, vendor, label, daily_cap_micros, max_per_call_micros,
                  allowed_endpoints, metadata, dedupe_window_s, created_at, expires_at)
                SELECT 'vk_seed' || x, decode(md5(x::text) || md5(x::text), 'hex'),
                  'stripe', 'argo/seed-' || (x % 5000), 300000000, NULL, '["POST /v1/payment_intents"]', '{{}}',
                  600, '2026-01-01', '2026-01-01 02:00' FROM generate_series(1, {keys}) x;
                INSERT INTO usage_counts (owner_id, calls) SELECT key_id, 10 FROM vault_keys;
                INSERT INTO spend_window (owner_id, bucket, settled_micros)
                  SELECT key_id, 492048, 10000000 FROM vault_keys;
                INSERT INTO audit (ts, key_id, label, vendor, method, path, status, decision, reserved_micros,
                  settled_micros, amount, currency, vendor_request_id, idempotency_key, latency_ms, caller_tag)
                SELECT '2026-01-01', 'vk_seed' || (x % {keys}), 'argo/seed-' || (x % 5000), 'stripe', 'POST',
                  '/v1/payment_intents', 200, 'forwarded', 1000000, 1000000, 100, 'usd', 'req_' || x,
                  'idem-' || x, 1.5, 'pod-' || x FROM generate_series(1, {audit_rows}) x;
            """)
            # Vacuum now, or autovacuum wakes up for the million new rows during the measurement.
            await conn.execute("VACUUM ANALYZE")
        finally:
            await conn.close()

    asyncio.run(run())


async def burst(proxy: str, vault_key: str, key_id: str, calls: int) -> tuple[float, int, int, str]:
    """`calls` pods at once against a $300 cap: seconds until every one is answered."""
    connector = aiohttp.TCPConnector(limit=calls)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def pod(index: int) -> int:
            async with session.post(
                f"{proxy}/stripe/v1/payment_intents",
                data={"amount": "100", "currency": "usd", "metadata[pod]": str(index)},
                headers={"Authorization": f"Bearer {vault_key}.pod-{index}"},
            ) as response:
                await response.read()
                return response.status

        started = time.perf_counter()
        statuses = await asyncio.gather(*(pod(i) for i in range(calls)))
        elapsed = time.perf_counter() - started
    info = httpx.get(
        f"{proxy}/vault/keys/{key_id}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ).json()
    return elapsed, statuses.count(200), statuses.count(429), info["spent_usd"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", default="1,16,64,256")
    parser.add_argument(
        "--soak", type=int, default=300, help="seconds of the memory soak (0 = skip)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell; the median is kept")
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--audit-rows", type=int, default=1_000_000)
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument(
        "--compare-with",
        metavar="REV|KEYBRAKE",
        help="only compare priced calls at 64 connections with another build: a git revision "
        "of this repository (built in a temporary venv) or another build's `keybrake` "
        "executable (alternating runs, --repeat pairs per backend)",
    )
    parser.add_argument("--this", metavar="KEYBRAKE", help="with --compare-with: this side's build")
    args = parser.parse_args()
    ensure_tools()
    if args.compare_with:
        with other_build(args.compare_with) as other:
            compare_builds(other, args)
        return
    conns = [int(c) for c in args.connections.split(",")]
    cells: list[Cell] = []
    notes: list[str] = []
    results = Results()

    def measure(
        name: str,
        backend: str,
        url: str,
        method: str,
        path: str,
        key: str,
        pid: int | None,
        connections: list[int] | None = None,
    ) -> None:
        for c in connections or conns:
            # This machine's speed drifts by tens of percent over seconds (a shared host), so each
            # cell is measured `--repeat` times and the run with the median req/s is kept.
            runs = sorted(
                (wrk(url, method, path, key, c, args.seconds, workdir) for _ in range(args.repeat)),
                key=lambda run: run[0],
            )
            rps, p50, p99, errors = runs[len(runs) // 2]
            errors = max(errors, *(run[3] for run in runs))
            cells.append(
                Cell(name, backend, c, rps, p50, p99, errors, rss(pid)[1] if pid else None)
            )
            print(
                f"{name:34s} {backend:9s} c={c:<4d} {rps:9.0f} req/s  p50 {p50:7.2f} ms  p99 {p99:8.2f} ms  err {errors}",
                flush=True,
            )

    with (
        tempfile.TemporaryDirectory(prefix="keybrake-bench-") as tmp,
        nginx(Path(tmp)) as (upstream, nginx_proxy),
        # Kept up all run (idle when not measured) for the paired comparisons below.
        passthrough(upstream) as (bare_url, bare_pid),
    ):
        workdir = Path(tmp)

        def pair(first: tuple[str, str], second: tuple[str, str]) -> Pairing:
            return paired(first, second, workdir, args.seconds, args.repeat)

        measure("direct to upstream", "-", upstream, "POST", "/v1/payment_intents", "none", None)
        measure(
            "nginx proxy_pass", "-", nginx_proxy, "POST", "/stripe/v1/payment_intents", "none", None
        )
        measure(
            "bare Python passthrough",
            "-",
            bare_url,
            "POST",
            "/stripe/v1/payment_intents",
            "none",
            bare_pid,
        )
        for backend in args.backends.split(","):
            with database(backend, workdir) as database_url:
                with keybrake(workdir, upstream, database_url) as (url, pid):
                    key, _ = issue_key(url)
                    measure(
                        "keybrake free endpoint",
                        backend,
                        url,
                        "GET",
                        "/stripe/v1/balance",
                        key,
                        pid,
                    )
                    measure(
                        "keybrake priced, one key",
                        backend,
                        url,
                        "POST",
                        "/stripe/v1/payment_intents",
                        key,
                        pid,
                    )
                    results.against_bare[backend] = pair((bare_url, "none"), (url, key))
                    print(f"paired with the passthrough: {results.against_bare[backend]}")
                    vault_key, key_id = issue_key(url, cap=300, dedupe="10m")
                    seconds, ok, capped, spent = asyncio.run(burst(url, vault_key, key_id, 500))
                    exact = ok == 300 and spent == "300.00"
                    results.bursts[backend] = (seconds, exact)
                    notes.append(
                        f"500-pod burst ({backend}): all answered in {seconds:.2f} s; {ok} forwarded, "
                        f"{capped} cap hits, spent ${spent} of $300 (overspend 0)"
                        if exact
                        else f"500-pod burst ({backend}): {seconds:.2f} s, {ok} forwarded, {capped} cap hits, spent ${spent} — WRONG"
                    )
                    print(notes[-1], flush=True)
            with database(backend, workdir, "grown") as database_url:
                started = time.perf_counter()
                seed(database_url, args.keys, args.audit_rows)
                print(
                    f"seeded {args.keys:,} keys and {args.audit_rows:,} audit rows in {time.perf_counter() - started:.0f}s",
                    flush=True,
                )
                with (
                    keybrake(workdir, upstream, database_url) as (url, pid),
                    database(backend, workdir) as empty_url,
                    keybrake(workdir, upstream, empty_url) as (empty, _),
                ):
                    key, _ = issue_key(url)
                    measure(
                        f"keybrake priced, {args.keys // 1000}k keys + {args.audit_rows // 1_000_000}M rows",
                        backend,
                        url,
                        "POST",
                        "/stripe/v1/payment_intents",
                        key,
                        pid,
                        connections=[64],
                    )
                    results.growth[backend] = pair((empty, issue_key(empty)[0]), (url, key))
                    print(f"paired, empty database then grown: {results.growth[backend]}")
                    if args.soak and backend == "sqlite":
                        note, results.soak_rss = soak(url, key, pid, args.soak, workdir)
                        notes.append(note)
                        print(notes[-1], flush=True)
            if backend == "postgres":
                results.commit_ms = durable_commit_ms()
                print(f"PostgreSQL durable commit round trip p50 {results.commit_ms:.3f} ms")
    write_report(Path(args.out), cells, notes, args, results)


@contextmanager
def other_build(spec: str) -> Iterator[Path]:
    """The `keybrake` executable of another build: `spec` itself if it is a file, else a git
    revision checked out in a temporary worktree and installed, without its dependencies, in a
    venv that reuses this one's packages (so only keybrake's own code differs)."""
    if Path(spec).is_file():
        yield Path(spec)
        return
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{spec}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if commit.returncode != 0:
        raise SystemExit(f"--compare-with {spec}: neither a file nor a git revision")
    with tempfile.TemporaryDirectory(prefix="keybrake-other-") as tmp:
        tree, venv = Path(tmp) / "tree", Path(tmp) / "venv"
        subprocess.run(
            [
                "git",
                "-C",
                str(ROOT),
                "worktree",
                "add",
                "--detach",
                "-q",
                str(tree),
                commit.stdout.strip(),
            ],
            check=True,
        )
        try:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            python = venv / "bin" / "python"
            ours = subprocess.run(
                [sys.executable, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            theirs = subprocess.run(
                [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            Path(theirs, "keybrake-bench-deps.pth").write_text(ours + "\n")
            subprocess.run(
                [
                    str(python),
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--no-deps",
                    "-e",
                    str(tree),
                ],
                check=True,
            )
            print(f"other build: {spec} ({commit.stdout.strip()[:12]})", flush=True)
            yield venv / "bin" / "keybrake"
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False
            )


def compare_builds(other: Path, args: argparse.Namespace) -> None:
    """This checkout (or `--this`) against another build, each on a fresh database of each
    backend: the ratio of priced req/s at 64 connections (this / other), in pairs of runs whose
    order alternates (ABBA)."""
    this = Path(args.this) if args.this else None
    with tempfile.TemporaryDirectory(prefix="keybrake-bench-") as tmp, nginx(Path(tmp)) as ngx:
        workdir, upstream = Path(tmp), ngx[0]
        for backend in args.backends.split(","):
            with (
                database(backend, workdir, "other") as other_url,
                database(backend, workdir, "this") as this_url,
                keybrake(workdir, upstream, other_url, exe=other) as (before, _),
                keybrake(workdir, upstream, this_url, exe=this) as (after, _),
            ):
                pairing = paired(
                    (before, issue_key(before)[0]),
                    (after, issue_key(after)[0]),
                    workdir,
                    args.seconds,
                    args.repeat,
                    swap=True,
                )
                # (The pairs list other/this, each pair's order as the tables list theirs.)
                print(
                    f"priced, 64 connections, {backend}: this/other {pairing} (other/this)",
                    flush=True,
                )


@contextmanager
def _sqlite(workdir: Path, name: str = "bench") -> Iterator[str]:
    path = workdir / f"{name}-{uuid.uuid4().hex[:6]}.db"
    yield f"sqlite:///{path}"


def database(backend: str, workdir: Path, name: str = "bench") -> AbstractContextManager[str]:
    """A fresh, empty database of `backend`; dropped (PostgreSQL) or left in `workdir` after."""
    return pg_database() if backend == "postgres" else _sqlite(workdir, name)


def soak(url: str, key: str, pid: int, seconds: int, workdir: Path) -> tuple[str, list[float]]:
    """Priced calls at 256 connections for `seconds`; RSS sampled while it runs."""
    script = workdir / "soak.lua"
    script.write_text(WRK_SCRIPT.format(method="POST", path="/stripe/v1/payment_intents", key=key))
    proc = subprocess.Popen(
        [
            *pin(0),
            "wrk",
            "-t1",
            "-c256",
            f"-d{seconds}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url + "/stripe/v1/payment_intents",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    samples: list[float] = []
    while proc.poll() is None:
        current, _ = rss(pid)
        if current:
            samples.append(current)
        time.sleep(5)  # sampling period of a measurement, not synchronisation
    out = proc.communicate()[0]
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    quarter = max(1, len(samples) // 4)
    return (
        f"memory soak (SQLite, 256 connections, {seconds} s, {float(rps.group(1)) if rps else 0:,.0f} req/s): "
        f"RSS {samples[0]:.0f} MB at start, {max(samples[:quarter]):.0f} MB max in the first quarter, "
        f"{max(samples[-quarter:]):.0f} MB max in the last quarter, {max(samples):.0f} MB peak"
    ), samples


def durable_commit_ms(samples: int = 3000) -> float:
    """p50 of the cheapest durable write a client can make (a one-row INSERT and its commit), from
    a process pinned where the proxy runs: the floor under each of the two commits of a call."""
    code = f"""
import asyncio, time, uuid, asyncpg
async def main():
    conn = await asyncpg.connect({PG_ADMIN!r})
    table = "keybrake_bench_floor_" + uuid.uuid4().hex[:8]
    await conn.execute(f"CREATE TABLE {{table}} (id bigserial PRIMARY KEY, v integer)")
    try:
        times = []
        for _ in range({samples}):
            started = time.perf_counter()
            await conn.fetchval(f"INSERT INTO {{table}} (v) VALUES (1) RETURNING id")
            times.append(time.perf_counter() - started)
        print(sorted(times)[len(times) // 2] * 1000)
    finally:
        await conn.execute(f"DROP TABLE {{table}}")
        await conn.close()
asyncio.run(main())
"""
    out = subprocess.run(
        [*pin(1), sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return float(out.strip())


@dataclass
class Pairing:
    """Alternating runs of two servers at 64 connections: a drift of the machine's speed hits
    both sides of each pair, so the median of the per-pair ratios is steadier than two cells."""

    pairs: list[tuple[float, float]]

    @property
    def ratio(self) -> float:
        ratios = sorted(second / first for first, second in self.pairs)
        return ratios[len(ratios) // 2]

    def __str__(self) -> str:
        runs = ", ".join(f"{a:,.0f}/{b:,.0f}" for a, b in self.pairs)
        return f"{self.ratio:.2f}× (median of {runs} req/s)"


def paired(
    first: tuple[str, str],
    second: tuple[str, str],
    workdir: Path,
    seconds: int,
    rounds: int,
    *,
    swap: bool = False,
) -> Pairing:
    """`rounds` pairs of runs; with `swap`, every other pair runs the second server first (ABBA),
    so a bias towards whichever runs first in a pair cancels out."""
    path = "/stripe/v1/payment_intents"
    pairs = []
    for index in range(rounds):
        order = [first, second] if not (swap and index % 2) else [second, first]
        runs = {id(s): wrk(s[0], "POST", path, s[1], 64, seconds, workdir)[0] for s in order}
        pairs.append((runs[id(first)], runs[id(second)]))
    return Pairing(pairs)


@dataclass
class Results:
    against_bare: dict[str, Pairing] = field(default_factory=dict)
    growth: dict[str, Pairing] = field(default_factory=dict)
    bursts: dict[str, tuple[float, bool]] = field(default_factory=dict)  # seconds, exact
    soak_rss: list[float] = field(default_factory=list)
    commit_ms: float | None = None


def write_report(
    path: Path, cells: list[Cell], notes: list[str], args: argparse.Namespace, results: Results
) -> None:
    def anchor(name: str, c: int) -> Cell | None:
        return next((x for x in cells if x.scenario == name and x.connections == c), None)

    lines = [
        "# Benchmarks",
        "",
        f"Run {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC with `make bench` ({args.seconds} s per run, the median of {args.repeat} runs per cell, wrk -t1 with distinct bodies).",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}.",
        "wrk and nginx pinned to core 0, the process under test (one process, no `--workers`) to core 1.",
        "Upstream: nginx answering Stripe-shaped JSON, a PaymentIntent id and `Request-Id` of "
        "its own per call.",
        "Ratios are req/s against the same connection count of the anchor.",
        "",
        "| scenario | db | conns | req/s | p50 ms | p99 ms | errors | peak RSS MB | ÷ direct | ÷ nginx | ÷ passthrough | p50 added ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for cell in cells:
        direct = anchor("direct to upstream", cell.connections)
        ngx = anchor("nginx proxy_pass", cell.connections)
        bare = anchor("bare Python passthrough", cell.connections)

        def ratio(base: Cell | None) -> str:
            return f"{cell.rps / base.rps:.2f}" if base and base is not cell else "-"

        added = f"{cell.p50_ms - direct.p50_ms:.2f}" if direct and direct is not cell else "-"
        lines.append(
            f"| {cell.scenario} | {cell.backend} | {cell.connections} | {cell.rps:,.0f} | {cell.p50_ms:.2f} | "
            f"{cell.p99_ms:.2f} | {cell.errors} | {f'{cell.rss_mb:.0f}' if cell.rss_mb else '-'} | "
            f"{ratio(direct)} | {ratio(ngx)} | {ratio(bare)} | {added} |"
        )
    lines += ["", *[f"- {note}" for note in notes], "", *targets(cells, results)]
    # What this run measures is replaced; the sections after it (other benches' numbers, the
    # history) are kept as they are.
    previous = path.read_text() if path.exists() else ""
    kept = next(
        (
            previous[heading.start() :]
            for heading in re.finditer(r"\n## (.+)", previous)
            if not heading.group(1).startswith("Against the targets")
        ),
        "",
    )
    path.write_text("\n".join(lines) + "\n" + kept)
    print(f"wrote {path}")


def targets(cells: list[Cell], results: Results) -> list[str]:
    """The issue's targets against this run's cells: computed, so the verdicts cannot go stale."""

    def cell(scenario: str, backend: str, connections: int) -> Cell | None:
        return next(
            (
                x
                for x in cells
                if x.scenario.startswith(scenario)
                and x.backend == backend
                and x.connections == connections
            ),
            None,
        )

    rows: list[tuple[str, str, bool]] = []
    for backend, floor in (("sqlite", 0.7), ("postgres", 0.5)):
        if pairing := results.against_bare.get(backend):
            rows.append(
                (
                    f"priced ≥ {floor}× the bare Python passthrough at 64 connections, {backend}",
                    f"{pairing} (passthrough/keybrake, alternating)",
                    pairing.ratio >= floor,
                )
            )
    direct = cell("direct to upstream", "-", 1)
    for backend in ("sqlite", "postgres"):
        priced = cell("keybrake priced, one key", backend, 1)
        if direct and priced:
            added = priced.p50_ms - direct.p50_ms
            rows.append(
                (
                    f"p50 added latency ≤ 1 ms at 1 connection, {backend}",
                    f"{added:.2f} ms",
                    added <= 1.0,
                )
            )
    bare256 = cell("bare Python passthrough", "-", 256)
    for backend in ("sqlite", "postgres"):
        priced = cell("keybrake priced, one key", backend, 256)
        if priced:
            # Little's law: with every connection always waiting, the mean latency is
            # connections / throughput, so the p99 cannot be lower at this throughput.
            mean = 256 / priced.rps * 1000
            anchor = f"; the bare passthrough's p99: {bare256.p99_ms:.0f} ms" if bare256 else ""
            rows.append(
                (
                    f"p99 ≤ 100 ms at 256 connections, {backend}",
                    f"{priced.p99_ms:.0f} ms (mean at {priced.rps:,.0f} req/s: {mean:.0f} ms{anchor})",
                    priced.p99_ms <= 100,
                )
            )
    for backend in ("sqlite", "postgres"):
        grown = next((x for x in cells if x.backend == backend and "keys +" in x.scenario), None)
        if grown and (pairing := results.growth.get(backend)):
            rows.append(
                (
                    f"growth: {grown.scenario.removeprefix('keybrake priced, ')} within 10 % of "
                    f"the empty database, {backend}",
                    f"{pairing} (empty/grown, alternating)",
                    pairing.ratio >= 0.90,
                )
            )
    peaks = [x.rss_mb for x in cells if x.connections == 256 and x.rss_mb and x.backend != "-"]
    if results.soak_rss:
        quarter = max(1, len(results.soak_rss) // 4)
        first, last = max(results.soak_rss[:quarter]), max(results.soak_rss[-quarter:])
        rows.append(
            (
                "proxy RSS ≤ 150 MB at 256 connections, flat over the soak",
                f"peak {max([*peaks, *results.soak_rss]):.0f} MB; soak {first:.0f} MB in the first "
                f"quarter, {last:.0f} MB in the last",
                max([*peaks, *results.soak_rss]) <= 150 and last <= first * 1.10,
            )
        )
    for backend, (seconds, exact) in results.bursts.items():
        rows.append(
            (
                f"500-pod burst answered in under 1 s, overspend 0, {backend}",
                f"{seconds:.2f} s, {'exact' if exact else 'NOT exact'}",
                seconds < 1 and exact,
            )
        )
    lines = [
        "## Against the targets (this run)",
        "",
        "| target | measured | met |",
        "| --- | --- | --- |",
        *[
            f"| {name} | {measured} | {'yes' if met else '**no**'} |"
            for name, measured, met in rows
        ],
    ]
    bare1 = cell("bare Python passthrough", "-", 1)
    if results.commit_ms is not None and bare1 and direct:
        passthrough_added = bare1.p50_ms - direct.p50_ms
        floor = passthrough_added + 2 * results.commit_ms
        lines += [
            "",
            f"The floor under PostgreSQL's latency at 1 connection, measured in this run: the bare "
            f"passthrough adds {passthrough_added:.2f} ms over a direct call, and the cheapest "
            f"durable write (a one-row INSERT and its commit, `synchronous_commit = on`) takes "
            f"{results.commit_ms:.2f} ms from the proxy's core. A call makes two (the reservation "
            f"before forwarding, the outcome and audit row before answering), so no proxy that keeps "
            f"both durable can add less than {floor:.2f} ms here, before any accounting work.",
        ]
    return lines


if __name__ == "__main__":
    main()
