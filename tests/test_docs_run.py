"""Docs that run: every shell block of README.md and docs/*.md that a reader would type runs here,
in document order, against a live proxy, or says why it cannot.

The convention. A fenced block is a shell block when its info string is `sh`, `bash`, `shell`,
`console` or `zsh`, or when it has none and either holds a `$ ` line (a transcript: the `$ `
lines are run, the rest is their output) or starts with a command (`keybrake`, `kubectl`, ...).
A shell block runs unless the line right before its opening fence is a marker:

    <!-- docs-test: needs a cluster -->          kubectl or argo against Kubernetes / Argo
    <!-- docs-test: needs a registry -->         docker push
    <!-- docs-test: needs a vendor account -->   a real Stripe, Twilio or Resend account
    <!-- docs-test: placeholder -->              a shape to fill in, not a command to type
    <!-- docs-test: run elsewhere: PATH ... -->  another test runs it (each PATH must exist)

A marker needs a block right after it and a reason from that list, and a block marked as needing
a cluster or a registry must use kubectl / argo or docker push: a marker never hides a block that
could run here. A new unmarked block runs; one calling kubectl, argo, docker, make, pip and the
like is refused before it runs, with the list above.

How a document runs: as a reader's shell session, one command at a time (`\\` and open quotes join
lines), each in bash with `set -eo pipefail` (a transcript's `$ ` line without `-e`, as typed)
and stdout on a terminal (the CLI prints tables there, JSON when piped), the session's exports
kept from command to command, in a scratch checkout: the repository's `templates/`, and a
`workflows/billing-agent.yaml` (plus `billing-agent.yaml`) holding the unconverted billing agent
(`tests/adopt/workflows/before-billing-agent.yaml`) that `keybrake lint` and `wrap` are shown on.

- `keybrake serve` is not run: it is the proxy this test serves (`tests/served.py`), configured
  with the `KEYBRAKE_*` settings the session exported before it (vendor upstreams point at
  localstripe or at nothing: the real secrets are placeholders), and `KEYBRAKE_URL` points at
  it; its comment's `vendors: ...` must be the vendors those settings configure. A document
  without a `serve` has a proxy from the start, with Stripe, Twilio and Resend configured, and
  `KEYBRAKE_URL` / `KEYBRAKE_API_KEY` exported (deploy.md's step 3 does that on a cluster).
- Placeholders: `bg_…` is the budget id an earlier command printed; `$VAULT_KEY` the vault key
  one printed; `<workflow name>` a run this test makes as `keybrake-fanout` would (a $25 key,
  one $1 PaymentIntent through the proxy, revoked by its label when it ends). Any other `…` or
  `<...>` left in a command fails it: teach this file the placeholder.
- A command passes when it exits 0 (`keybrake lint` may exit 1: it finds what the reader's
  workflows hold, as documented; 2, an unreadable path, still fails), prints no `null` line (a
  `jq -r .field` of an error), prints a transcript's `exit=N` lines, and prints what `PROMISES`
  says its comment promises.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import shlex
import shutil
import signal
import struct
import subprocess
import tempfile
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from keybrake.proxy.settings import Settings
from tests.proxyproc import BIN, Localstripe
from tests.served import ServedProxy, serve_proxy

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SAMPLE_WORKFLOW = ROOT / "tests" / "adopt" / "workflows" / "before-billing-agent.yaml"

SHELL_INFO = {"sh", "bash", "shell", "console", "zsh"}
COMMAND_WORDS = {"keybrake", "kubectl", "argo", "curl", "make", "docker", "pip", "export", "helm"}
MARKER = re.compile(r"^<!--\s*docs-test:\s*(?P<reason>[^:>]+?)\s*(?::\s*(?P<detail>.*?))?\s*-->$")
# Each reason, and what a block marked with it must use (None: nothing to check).
REASONS: dict[str, re.Pattern[str] | None] = {
    "needs a cluster": re.compile(r"^\s*(kubectl|argo)\s", re.M),
    "needs a registry": re.compile(r"\bdocker push\b"),
    "needs a vendor account": None,
    "placeholder": None,
    "run elsewhere": None,
}
# Never run from a document: these need the marker (or would change this machine).
NEVER_RUN = re.compile(
    r"(^|[|;&(`]|\$\()\s*(kubectl|argo|docker|helm|make|pip3?|sudo|apt(-get)?|keybrake demo)\b",
    re.M,
)
FENCE = re.compile(r"^ {0,3}```(?P<info>[^\n`]*)\n(?P<body>.*?)^ {0,3}```[ \t]*$", re.M | re.S)
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07")
BUDGET_ID = re.compile(r"\bbg_[0-9a-f]{16}\b")
VAULT_KEY = re.compile(r"\bkbv_[A-Za-z0-9_-]{20,}")
FANOUT_RUN = "keybrake-fanout-x7k2p"
FANOUT_SPEND = "$1.00"
COMMAND_TIMEOUT = 30.0
NOWHERE = "http://127.0.0.1:9"  # the discard port: no call of a document reaches a real vendor


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence
    info: str
    body: str
    marker: str | None  # the marker's reason
    detail: str | None

    @property
    def where(self) -> str:
        return f"{relative(self.path)}:{self.line}"

    @property
    def transcript(self) -> bool:
        return any(line.startswith("$ ") for line in self.body.splitlines())


@dataclass
class Command:
    block: Block
    code: str  # what bash runs, comments left out
    comment: str  # the comments on its lines, joined
    expected: list[str] = field(default_factory=list)  # a transcript's output lines


def is_shell(info: str, body: str) -> bool:
    if info:
        return info.split()[0] in SHELL_INFO
    lines = [line for line in body.splitlines() if line.strip()]
    return bool(lines) and (
        any(line.startswith("$ ") for line in lines) or lines[0].split()[0] in COMMAND_WORDS
    )


def markers(path: Path) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if "docs-test:" in line:
            yield number, line.strip()


def shell_blocks(path: Path) -> list[Block]:
    text = path.read_text()
    lines = text.splitlines()
    blocks = []
    for match in FENCE.finditer(text):
        info, body = match.group("info").strip(), match.group("body")
        if not is_shell(info, body):
            continue
        line = text.count("\n", 0, match.start()) + 1
        before = lines[line - 2].strip() if line >= 2 else ""
        found = MARKER.match(before)
        blocks.append(
            Block(
                path,
                line,
                info,
                body,
                found.group("reason") if found else None,
                found.group("detail") if found else None,
            )
        )
    return blocks


def split_comment(line: str, quote: str | None) -> tuple[str, str, str | None]:
    """A physical line's code and comment, given the quote open at its start (bash's rules: `#`
    starts a comment at the start of a word, outside quotes); and the quote open at its end."""
    index, escaped = 0, False
    while index < len(line):
        char = line[index]
        if escaped:
            escaped = False
        elif quote == "'":
            quote = None if char == "'" else quote
        elif char == "\\":
            escaped = True
        elif quote == '"':
            quote = None if char == '"' else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1] in " \t;|&("):
            return line[:index].rstrip(), line[index + 1 :].strip(), quote
        index += 1
    return line, "", quote


def commands(block: Block) -> list[Command]:
    """The block's commands: a line, joined with the next while it ends in `\\` or a quote is
    open; in a transcript, the `$ ` lines, each with the output lines after it."""
    found: list[Command] = []
    code: list[str] = []
    comments: list[str] = []
    quote: str | None = None
    for line in block.body.splitlines():
        if block.transcript and not code:
            if not line.startswith("$ "):
                if found:
                    found[-1].expected.append(line)
                continue
            line = line[2:]
        part, comment, quote = split_comment(line, quote)
        if comment:
            comments.append(comment)
        if not part.strip() and not code:
            continue
        code.append(part)
        if quote is None and not part.endswith("\\"):
            found.append(Command(block, "\n".join(code), " ".join(comments)))
            code, comments = [], []
    assert not code, f"{block.where}: a command is not finished: {code}"
    return found


# What a command's comment promises it prints: (the command, as written, starts with; what the
# output must hold). A promise no document makes any more fails, as a stale one would mislead.
PROMISES: dict[str, list[re.Pattern[str]]] = {
    # docs/deploy.md, step 6: the run's key, revoked, and what it spent.
    "keybrake keys list --label argo/<workflow name>": [
        re.compile(rf"{FANOUT_RUN}.*revoked", re.S),
        re.compile(re.escape(FANOUT_SPEND)),
    ],
    # docs/deploy.md, step 6: who issued and revoked what.
    "keybrake events --since 1h": [re.compile(r"issue"), re.compile(r"revoke")],
}
# Exit statuses a command may end with besides 0, and why.
MAY_EXIT: list[tuple[re.Pattern[str], set[int]]] = [
    # "exit 1 on medium or worse findings": the reader's workflows/ holds a vendor key in pods.
    (re.compile(r"^keybrake lint\b"), {1}),
]


def serve_comment_vendors(command: Command) -> str | None:
    found = re.search(
        r"^# keybrake proxy listening on .*vendors: ([^)]*)\)", command.block.body, re.M
    )
    return found.group(1) if found else None


class Session:
    """A reader's shell session through one document."""

    def __init__(self, tmp: Path, localstripe: Localstripe, has_serve: bool) -> None:
        self.tmp = tmp
        self.localstripe = localstripe
        self.checkout = tmp / "checkout"
        (self.checkout / "workflows").mkdir(parents=True)
        (self.checkout / "templates").symlink_to(ROOT / "templates")
        shutil.copy(SAMPLE_WORKFLOW, self.checkout / "workflows" / "billing-agent.yaml")
        shutil.copy(SAMPLE_WORKFLOW, self.checkout / "billing-agent.yaml")
        keep = {k: v for k, v in os.environ.items() if not k.startswith("KEYBRAKE_")}
        for name in ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE"):
            keep.pop(name, None)
        self.env = {**keep, "PATH": f"{BIN}:{keep.get('PATH', '/usr/bin:/bin')}"}
        self.env["TERM"] = "xterm-256color"
        self.proxy: ServedProxy | None = None
        self.budget_id: str | None = None
        self.fanout_done = False
        if not has_serve:
            self.serve(
                {
                    "KEYBRAKE_API_KEY": "kba_docs_reader_token_0123456789",
                    "KEYBRAKE_STRIPE_SECRET_KEY": "sk_live_docs",
                    "KEYBRAKE_TWILIO_ACCOUNT_SID": "AC" + "1" * 32,
                    "KEYBRAKE_TWILIO_AUTH_TOKEN": "twilio-docs-token",
                    "KEYBRAKE_RESEND_API_KEY": "re_docs",
                }
            )

    def serve(self, exported: dict[str, str]) -> Settings:
        """The proxy `keybrake serve` would be with the settings exported, on a loopback port
        and a SQLite file of its own, its vendor upstreams local."""
        assert self.proxy is None, "a second `keybrake serve` in one document"
        assert exported.get("KEYBRAKE_API_KEY"), "`keybrake serve` refuses to start without it"
        settings: dict[str, str | None] = {
            "KEYBRAKE_STRIPE_SECRET_KEY": None,  # (serve_proxy would configure Stripe)
            **{
                name: value
                for name, value in exported.items()
                if name.removeprefix("KEYBRAKE_").lower() in Settings.model_fields
            },
            "KEYBRAKE_DATABASE_URL": f"sqlite:///{self.tmp / 'keybrake.db'}",
            "KEYBRAKE_STRIPE_API_BASE": self.localstripe.url,
            "KEYBRAKE_TWILIO_API_BASE": NOWHERE,
            "KEYBRAKE_RESEND_API_BASE": NOWHERE,
        }
        self.proxy = serve_proxy(self.tmp, extra_env=settings)
        self.env["KEYBRAKE_API_KEY"] = exported["KEYBRAKE_API_KEY"]
        self.env["KEYBRAKE_URL"] = self.proxy.url
        return Settings(**{k.removeprefix("KEYBRAKE_").lower(): v for k, v in settings.items()})

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()

    def fanout_run(self) -> str:
        """What `keybrake-fanout` does on a cluster, through the same API: a key capped at $25
        for the run, a pod's $1 PaymentIntent, and the exit handler's revoke by label."""
        if self.fanout_done:
            return FANOUT_RUN
        assert self.proxy is not None
        label = f"argo/{FANOUT_RUN}"
        admin = {"Authorization": f"Bearer {self.env['KEYBRAKE_API_KEY']}"}
        with httpx.Client(base_url=self.proxy.url, timeout=30) as client:
            issued = client.post(
                "/vault/keys",
                headers=admin,
                json={
                    "vendor": "stripe",
                    "total_usd_cap": 25,
                    "allowed_endpoints": ["POST /v1/payment_intents"],
                    "expires_in": "2h",
                    "agent_run_label": label,
                },
            )
            assert issued.status_code == 201, issued.text
            vault_key = issued.json()["vault_key"]
            paid = client.post(
                "/stripe/v1/payment_intents",
                auth=(vault_key, ""),
                data={"amount": "100", "currency": "usd"},
            )
            assert paid.status_code == 200, paid.text
            revoked = client.post(
                "/vault/keys/revoke", headers=admin, json={"agent_run_label": label}
            )
            assert revoked.status_code == 200, revoked.text
        self.fanout_done = True
        return FANOUT_RUN

    def substitute(self, command: Command) -> str:
        code = command.code
        if "bg_…" in code:
            assert self.budget_id, f"{command.block.where}: `bg_…` before any budget id was printed"
            code = code.replace("bg_…", self.budget_id)
        if "<workflow name>" in code:
            code = code.replace("<workflow name>", self.fanout_run())
        leftover = re.search(r"…|<[a-z][a-z -]*>", code)
        assert leftover is None, (
            f"{command.block.where}: unknown placeholder {leftover.group(0)!r} in {code!r}: "
            "teach tests/test_docs_run.py what it stands for"
        )
        return code

    def run(self, command: Command) -> None:
        where = command.block.where
        refused = NEVER_RUN.search(command.code)
        assert refused is None, (
            f"{where}: `{refused.group(0).strip()}` cannot run in the docs test; mark the block "
            "(see the docstring of tests/test_docs_run.py for the markers)"
        )
        if re.match(r"keybrake serve\b", command.code):
            self.run_serve(command)
            return
        code = self.substitute(command)
        status, out, err = self.in_terminal(code, errexit=not command.block.transcript)
        shown = f"{where}: `{code}` exited {status}\n--- stdout\n{out}\n--- stderr\n{err}"
        allowed = {0}
        for pattern, statuses in MAY_EXIT:
            if pattern.search(command.code):
                allowed |= statuses
        assert status in allowed, shown
        assert "null" not in out.splitlines(), f"a `null` printed (jq of an error?)\n{shown}"
        for line in command.expected:
            if re.fullmatch(r"exit=\d+", line.strip()):
                assert line.strip() in out.splitlines(), f"expected {line.strip()}\n{shown}"
        for start, promised in PROMISES.items():
            if command.code.startswith(start):
                for pattern in promised:
                    assert pattern.search(out), (
                        f"`# {command.comment}` promises {pattern.pattern!r}\n{shown}"
                    )
        if found := BUDGET_ID.findall(out):
            self.budget_id = found[-1]
        if found := VAULT_KEY.findall(out):
            self.env["VAULT_KEY"] = found[-1]

    def run_serve(self, command: Command) -> None:
        exported = {k: v for k, v in self.env.items() if k.startswith("KEYBRAKE_")}
        configured = self.serve(exported)
        vendors = serve_comment_vendors(command)
        if vendors is not None:
            assert vendors == ", ".join(sorted(configured.vendor_credentials())), (
                f"{command.block.where}: `keybrake serve` says `vendors: {vendors}`; the block "
                f"configures {sorted(configured.vendor_credentials())}"
            )

    def in_terminal(self, code: str, *, errexit: bool) -> tuple[int, str, str]:
        """bash runs `code` with stdout on a 200-column terminal; its exports are kept."""
        env_file = self.tmp / "env"
        script = (
            f"set {'-e' if errexit else '+e'}o pipefail\n{code}\n"
            f'__status=$?; env -0 > {shlex.quote(str(env_file))}; exit "$__status"\n'
        )
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        with tempfile.TemporaryFile() as stderr:
            process = subprocess.Popen(
                ["bash", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=slave,
                stderr=stderr,
                env=self.env,
                cwd=self.checkout,
                start_new_session=True,  # (a command past its time is killed with its children)
            )
            os.close(slave)
            output = bytearray()
            deadline = time.monotonic() + COMMAND_TIMEOUT
            try:
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        os.killpg(process.pid, signal.SIGKILL)
                        process.wait()
                        raise AssertionError(f"`{code}` ran past {COMMAND_TIMEOUT}s")
                    ready, _, _ = select.select([master], [], [], left)
                    if not ready:
                        continue
                    try:
                        chunk = os.read(master, 65536)
                    except OSError:  # EIO: every writer closed the terminal
                        break
                    if not chunk:
                        break
                    output += chunk
            finally:
                os.close(master)
            status = process.wait(timeout=COMMAND_TIMEOUT)
            stderr.seek(0)
            err = stderr.read().decode(errors="replace")
        if env_file.exists():
            self.env = dict(
                item.split("=", 1) for item in env_file.read_text().split("\0") if "=" in item
            )
            for name in ("_", "SHLVL", "PWD", "OLDPWD"):
                self.env.pop(name, None)
            env_file.unlink()
        out = ANSI.sub("", output.decode(errors="replace")).replace("\r\n", "\n")
        return status, out, err


def runnable(path: Path) -> list[Command]:
    return [cmd for block in shell_blocks(path) if block.marker is None for cmd in commands(block)]


def unmarked_and_not_runnable(path: Path) -> list[str]:
    """Unmarked commands this test refuses to run (a cluster, a registry, this machine's make
    and packages): each one's block wants a marker."""
    return [
        f"{cmd.block.where}: `{found.group(0).strip()}` cannot run here: mark the block"
        for cmd in runnable(path)
        if (found := NEVER_RUN.search(cmd.code))
    ]


def marker_problems(path: Path) -> list[str]:
    problems = []
    blocks = shell_blocks(path)
    on_blocks = {block.line - 1 for block in blocks if block.marker is not None}
    for number, line in markers(path):
        where = f"{relative(path)}:{number}"
        found = MARKER.match(line)
        if found is None or found.group("reason") not in REASONS:
            problems.append(f"{where}: not a marker this test knows: {line}")
        elif number not in on_blocks:
            problems.append(f"{where}: a marker with no shell block right after it")
    for block in blocks:
        if block.marker is None or block.marker not in REASONS:
            continue
        needs = REASONS[block.marker]
        if needs is not None and not needs.search(block.body):
            problems.append(f"{block.where}: marked `{block.marker}`, yet uses none of it")
        if block.marker == "run elsewhere":
            named = [w.lstrip("(").rstrip(",.;)") for w in (block.detail or "").split() if "/" in w]
            if not named or not all((ROOT / name).exists() for name in named):
                problems.append(f"{block.where}: `run elsewhere` names no test that exists")
    return problems


def test_markers_sit_on_blocks_and_give_a_known_reason() -> None:
    problems = [problem for path in DOCS for problem in marker_problems(path)]
    assert not problems, "\n".join(problems)


def test_every_unmarked_block_can_run_here() -> None:
    refused = [problem for path in DOCS for problem in unmarked_and_not_runnable(path)]
    assert not refused, "\n".join(refused)


def test_promises_are_still_made() -> None:
    written = [cmd.code for path in DOCS for cmd in runnable(path)]
    for start in PROMISES:
        assert any(code.startswith(start) for code in written), f"no document runs `{start}`"


def test_the_convention_catches_a_new_block(tmp_path: Path) -> None:
    doc = tmp_path / "new.md"
    doc.write_text(
        "```sh\nkubectl apply -k deploy/prod\n```\n\n"  # unmarked, needs a cluster
        "<!-- docs-test: needs a cluster -->\n```sh\nkeybrake keys list\n```\n\n"  # could run
        "<!-- docs-test: too slow -->\n```sh\nkeybrake audit\n```\n\n"  # no such reason
        "<!-- docs-test: placeholder -->\n\n```sh\nkeybrake x\n```\n\n"  # not on its block
        "```\nkeybrake budgets list\n```\n\n"  # no info string, still a command
        "```\nKEY ID   LABEL\n```\n"  # output
    )
    assert [b.marker for b in shell_blocks(doc)] == [
        None,
        "needs a cluster",
        "too slow",
        None,
        None,
    ]
    assert len(unmarked_and_not_runnable(doc)) == 1
    problems = marker_problems(doc)
    assert [p.split(": ", 1)[1].split(":")[0] for p in problems] == [
        "not a marker this test knows",
        "a marker with no shell block right after it",
        "marked `needs a cluster`, yet uses none of it",
    ], problems
    assert [c.code for c in runnable(doc)][-1] == "keybrake budgets list"


@pytest.mark.parametrize("path", DOCS, ids=[relative(p) for p in DOCS])
def test_shell_blocks_run(path: Path, tmp_path: Path, localstripe: Localstripe) -> None:
    to_run = runnable(path)
    assert not unmarked_and_not_runnable(path), unmarked_and_not_runnable(path)
    if not to_run:
        return
    has_serve = any(re.match(r"keybrake serve\b", cmd.code) for cmd in to_run)
    session = Session(tmp_path, localstripe, has_serve)
    try:
        for command in to_run:
            session.run(command)
    finally:
        session.stop()
