"""A lint report as text (for people), JSON (for scripts) or SARIF 2.1.0 (for code-scanning
UIs such as GitHub's)."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from typing import Any

from keybrake.adopt.lint import DEFAULT_SEVERITY, RULES, Report

__all__ = ["as_json", "as_sarif", "as_text"]

INFORMATION_URI = "https://github.com/keybrake/keybrake/blob/main/docs/lint.md"
_LEVEL = {"high": "error", "medium": "warning", "low": "note", "info": "note"}


def _relative(path: Path) -> str:
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _uri(path: Path) -> str:
    """A SARIF artifact location: relative to the current folder when under it, percent-encoded
    (RFC 3986), else a file: URI."""
    try:
        relative = path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.resolve().as_uri()
    return urllib.parse.quote(relative, safe="/")


def as_text(report: Report) -> str:
    lines = []
    for f in report.findings:
        where = f"{_relative(f.path)}:{f.line}"
        template = f" template {f.template}" if f.template else ""
        lines.append(
            f"{where}: {f.severity} {f.rule} {f.name}: {f.workflow}{template}: {f.message}"
        )
        lines.append(f"  fix: {f.fix}")
    for s in report.skipped:
        lines.append(f"{_relative(s.path)}: skipped: {s.reason}")
    for u in report.unreadable:
        lines.append(f"{_relative(u.path)}: error: {u.reason}")
    counts = {
        s: sum(1 for f in report.findings if f.severity == s)
        for s in ("high", "medium", "low", "info")
    }
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no findings"
    lines.append(
        f"{report.workflows} workflow(s) in {report.files} file(s): {summary}"
        + (f"; {len(report.skipped)} skipped" if report.skipped else "")
        + (f"; {len(report.unreadable)} unreadable" if report.unreadable else "")
    )
    return "\n".join(lines) + "\n"


def as_json(report: Report) -> str:
    data = {
        "findings": [
            {
                "rule": f.rule,
                "name": f.name,
                "severity": f.severity,
                "file": _relative(f.path),
                "line": f.line,
                "workflow": f.workflow,
                "template": f.template,
                "message": f.message,
                "fix": f.fix,
            }
            for f in report.findings
        ],
        "skipped": [{"file": _relative(s.path), "reason": s.reason} for s in report.skipped],
        "unreadable": [{"file": _relative(u.path), "reason": u.reason} for u in report.unreadable],
        "workflows": report.workflows,
        "files": report.files,
    }
    return json.dumps(data, indent=2) + "\n"


def as_sarif(report: Report, version: str) -> str:
    rules = list(RULES.values())
    index = {rule.id: i for i, rule in enumerate(rules)}
    results: list[dict[str, Any]] = []
    for f in report.findings:
        results.append(
            {
                "ruleId": f.rule,
                "ruleIndex": index[f.rule],
                "level": _LEVEL[f.severity],
                "message": {
                    "text": f"{f.workflow}"
                    + (f" template {f.template}" if f.template else "")
                    + f": {f.message}"
                },
                "locations": [
                    {
                        "physicalLocation": {
                            "artifactLocation": {"uri": _uri(f.path)},
                            "region": {"startLine": max(f.line, 1)},
                        }
                    }
                ],
                "properties": {
                    "severity": f.severity,
                    "workflow": f.workflow,
                    "template": f.template,
                },
            }
        )
    notifications = [
        {"level": "error", "message": {"text": f"{_relative(u.path)}: {u.reason}"}}
        for u in report.unreadable
    ] + [
        {"level": "note", "message": {"text": f"{_relative(s.path)}: skipped: {s.reason}"}}
        for s in report.skipped
    ]
    run: dict[str, Any] = {
        "tool": {
            "driver": {
                "name": "keybrake lint",
                "version": version,
                "informationUri": INFORMATION_URI,
                "rules": [
                    {
                        "id": rule.id,
                        "name": rule.name,
                        "shortDescription": {"text": rule.summary.split(": ")[0].rstrip(".")},
                        "fullDescription": {"text": rule.summary},
                        "help": {"text": rule.fix},
                        "helpUri": f"{INFORMATION_URI}#{rule.id.lower()}-{rule.name}",
                        "defaultConfiguration": {"level": _LEVEL[DEFAULT_SEVERITY[rule.id]]},
                    }
                    for rule in rules
                ],
            }
        },
        "results": results,
        "invocations": [
            {
                "executionSuccessful": not report.unreadable,
                "toolExecutionNotifications": notifications,
            }
        ],
    }
    sarif = {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [run],
    }
    return json.dumps(sarif, indent=2) + "\n"
