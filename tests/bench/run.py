"""Load bench: the proxy against a direct call, with nginx as a static Stripe-shaped upstream.

    make bench            # installs wrk and nginx from Debian packages when missing

Scenarios run in one go so their ratios sit side by side; results go to docs/benchmarks.md.
wrk and the proxy are pinned to different cores where the machine has two or more. Not part of
`make test`: tests never time anything.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.fakes.server import bound_socket, free_port  # noqa: E402
from tests.proxyproc import ADMIN_KEY, STRIPE_SECRET, wait_until_ready  # noqa: E402

UPSTREAM_BODY = (
    '{"id":"pi_bench","object":"payment_intent","amount":100,"currency":"usd",'
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
class Result:
    scenario: str
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    peak_rss_mb: float | None


def ensure_tools() -> None:
    missing = [
        tool
        for tool in ("wrk", "nginx")
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()
    ]
    if missing:
        packages = ["wrk" if "wrk" in missing else "", "nginx-light" if "nginx" in missing else ""]
        print(f"installing {' '.join(p for p in packages if p)} (Debian packages)")
        subprocess.run(
            ["apt-get", "install", "-y", "-q", *[p for p in packages if p]],
            check=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )


def start_nginx(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
error_log {workdir}/nginx-error.log;
pid {workdir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {workdir}/body;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port};
    location / {{
      default_type application/json;
      add_header Request-Id req_bench_static;
      return 200 '{UPSTREAM_BODY}';
    }}
  }}
}}
""")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = subprocess.Popen(_pin(0) + [nginx, "-c", str(conf), "-p", str(workdir)])
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(url + "/", proc, "nginx")
    return proc, url


def _pin(cpu: int) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", str(cpu)]
    return []


def start_proxy(
    workdir: Path, upstream: str, database_url: str
) -> tuple[subprocess.Popen[bytes], str]:
    sock = bound_socket()
    port = sock.getsockname()[1]
    env = {
        **os.environ,
        "KEYBRAKE_API_KEY": ADMIN_KEY,
        "KEYBRAKE_DATABASE_URL": database_url,
        "KEYBRAKE_STRIPE_SECRET_KEY": STRIPE_SECRET,
        "KEYBRAKE_STRIPE_API_BASE": upstream,
    }
    keybrake = str(Path(sys.executable).parent / "keybrake")
    proc = subprocess.Popen(
        _pin(1) + [keybrake, "serve", "--fd", str(sock.fileno())],
        env=env,
        pass_fds=(sock.fileno(),),
        stdout=subprocess.DEVNULL,
        cwd=workdir,
    )
    sock.close()
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(url + "/readyz", proc, "keybrake serve")
    return proc, url


def issue_key(proxy: str) -> str:
    response = httpx.post(
        f"{proxy}/vault/keys",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        json={
            "vendor": "stripe",
            "daily_usd_cap": 1_000_000,
            "allowed_endpoints": ["POST /v1/payment_intents", "GET /v1/balance"],
            "expires_in": "2h",
            "agent_run_label": "argo/bench",
        },
    )
    response.raise_for_status()
    return str(response.json()["vault_key"])


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def wrk(
    url: str, method: str, path: str, key: str, connections: int, seconds: int, workdir: Path
) -> tuple[float, float, float, int]:
    script = workdir / f"bench-{method}.lua"
    script.write_text(WRK_SCRIPT.format(method=method, path=path, key=key))
    out = subprocess.run(
        _pin(0)
        + ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"50%\s+([\d.]+\w+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"99%\s+([\d.]+\w+)", out).group(1))  # type: ignore[union-attr]
    errors = 0
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if match:
        errors += int(match.group(1))
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if match:
        errors += sum(int(x) for x in match.groups())
    return rps, p50, p99, errors


def _ms(text: str) -> float:
    value = float(re.match(r"[\d.]+", text).group(0))  # type: ignore[union-attr]
    unit = text[len(re.match(r"[\d.]+", text).group(0)) :]  # type: ignore[union-attr]
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", default="1,16,64,256")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    ensure_tools()
    connections = [int(c) for c in args.connections.split(",")]
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="keybrake-bench-") as tmp:
        workdir = Path(tmp)
        nginx, upstream = start_nginx(workdir)
        proxy, proxy_url = start_proxy(workdir, upstream, f"sqlite:///{workdir / 'bench.db'}")
        try:
            key = issue_key(proxy_url)
            scenarios = [
                ("direct to upstream", upstream, "POST", "/v1/payment_intents"),
                ("keybrake, free endpoint (SQLite)", proxy_url, "GET", "/stripe/v1/balance"),
                (
                    "keybrake, priced endpoint (SQLite)",
                    proxy_url,
                    "POST",
                    "/stripe/v1/payment_intents",
                ),
            ]
            for name, base, method, path in scenarios:
                for conns in connections:
                    rps, p50, p99, errors = wrk(
                        base + path, method, path, key, conns, args.seconds, workdir
                    )
                    peak = rss_mb(proxy.pid) if base == proxy_url else None
                    results.append(Result(name, conns, rps, p50, p99, errors, peak))
                    print(
                        f"{name:40s} c={conns:<4d} {rps:9.0f} req/s  p50 {p50:7.2f} ms  p99 {p99:8.2f} ms  errors {errors}"
                    )
        finally:
            proxy.terminate()
            nginx.terminate()
            proxy.wait()
            nginx.wait()
    write_report(Path(args.out), results, args.seconds)


def write_report(path: Path, results: list[Result], seconds: int) -> None:
    direct = {r.connections: r for r in results if r.scenario == "direct to upstream"}
    lines = [
        "# Benchmarks",
        "",
        f"Run: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, `make bench` ({seconds}s per cell, wrk -t1,"
        " distinct bodies so no dedupe replays).",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()},"
        f" {platform.platform()}. wrk pinned to core 0 with nginx, the proxy (one process) to core 1.",
        "Upstream: nginx answering fixed Stripe-shaped JSON with a `Request-Id` header.",
        "",
        "| scenario | conns | req/s | p50 ms | p99 ms | errors | proxy peak RSS MB | ratio to direct | p50 added ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        base = direct.get(r.connections)
        ratio = f"{r.rps / base.rps:.3f}" if base and r.scenario != base.scenario else "-"
        added = f"{r.p50_ms - base.p50_ms:.2f}" if base and r.scenario != base.scenario else "-"
        rss = f"{r.peak_rss_mb:.0f}" if r.peak_rss_mb else "-"
        lines.append(
            f"| {r.scenario} | {r.connections} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.errors} | {rss} | {ratio} | {added} |"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = path.read_text() if path.exists() else ""
    marker = "\n## History"
    history = previous[previous.index(marker) :] if marker in previous else ""
    path.write_text("\n".join(lines) + "\n" + history)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
