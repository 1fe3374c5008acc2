"""The pod every keybrake step runs in: a `script` template on a stock Python image.

The step code is a standard-library Python file shipped in this package (`_step_issue.py`,
`_step_revoke.py`), embedded as the template's `source` with the part the steps share
(`_step_common.py`) in place of their import of it, so that the pod runs one self-contained
script. Inputs reach it as environment variables the template fills from its parameters, so no
parameter value is ever spliced into code.
See <https://argo-workflows.readthedocs.io/en/latest/walk-through/scripts-and-results/>.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from pathlib import Path

from hera.workflows.models import (
    Capabilities,
    EnvVar,
    Inputs,
    IntOrString,
    Outputs,
    Parameter,
    Quantity,
    ResourceRequirements,
    RetryStrategy,
    ScriptTemplate,
    SeccompProfile,
    SecurityContext,
    Template,
)

from .connection import STEP_IMAGE, ProxyConnection

__all__ = ["OUTPUT_DIR", "STEP_IMAGE", "script_step", "step_source"]

OUTPUT_DIR = "/tmp/keybrake"  # noqa: S108 - inside the step pod, where Argo collects outputs
_HERE = Path(__file__).resolve().parent
_COMMON = "_step_common"


def _top_level(source: str, module: str) -> ast.ImportFrom:
    """The one top-level `from <module> import ...` of `source` (`.<module>` when relative)."""
    found = [
        node
        for node in ast.parse(source).body
        if isinstance(node, ast.ImportFrom) and node.module == module
    ]
    if len(found) != 1:
        raise ValueError(f"expected one `from {module} import ...`, found {len(found)}")
    return found[0]


def _common_block() -> str:
    """`_step_common.py` below its `from __future__ import annotations`, between markers."""
    source = (_HERE / f"{_COMMON}.py").read_text(encoding="utf-8")
    future = _top_level(source, "__future__")
    body = "".join(source.splitlines(keepends=True)[future.end_lineno :]).strip("\n")
    return (
        f"# --- {_COMMON}.py, copied in: the keybrake steps share it, and a pod cannot import "
        f"keybrake ---\n{body}\n\n\n# --- end of {_COMMON}.py ---\n"
    )


def step_source(step: str) -> str:
    """The source of `_step_<step>.py`, as embedded in the script template: its
    `from ._step_common import ...` replaced by that module's code."""
    source = (_HERE / f"_step_{step}.py").read_text(encoding="utf-8")
    shared = _top_level(source, _COMMON)
    lines = source.splitlines(keepends=True)
    return "".join([*lines[: shared.lineno - 1], _common_block(), *lines[shared.end_lineno :]])


def script_step(
    name: str,
    *,
    step: str,
    proxy: ProxyConnection,
    inputs: Sequence[Parameter],
    outputs: Sequence[Parameter],
    env: Sequence[EnvVar],
    retry: RetryStrategy,
    deadline_seconds: int = 300,
) -> Template:
    """A script template running `_step_<step>.py` with `env` and the proxy's credential, as
    `proxy`'s service account and an unprivileged user that meets the Pod Security "restricted"
    profile. Its image and service account are inputs too (defaults from `proxy`), so that a
    cluster can set them when submitting, never by editing the generated YAML."""
    pod_inputs = [
        Parameter(
            name="step_image",
            default=proxy.step_image,
            description="image of this step (Python 3.11+; e.g. a mirror of "
            f"{STEP_IMAGE} in a private registry)",
        )
    ]
    if proxy.pod_service_account:
        pod_inputs.append(
            Parameter(
                name="service_account",
                default=proxy.pod_service_account,
                description="service account of this step: the one bound to a keybrake issuer "
                "(templates/rbac/)",
            )
        )
    return Template(
        name=name,
        inputs=Inputs(parameters=[*inputs, *pod_inputs]),
        outputs=Outputs(parameters=list(outputs)),
        retry_strategy=retry,
        active_deadline_seconds=IntOrString(deadline_seconds),
        service_account_name=(
            "{{inputs.parameters.service_account}}" if proxy.pod_service_account else None
        ),
        volumes=proxy.volumes() or None,
        script=ScriptTemplate(
            image="{{inputs.parameters.step_image}}",
            command=["python"],
            source=step_source(step),
            env=[
                *env,
                *proxy.credential_env(),
                EnvVar(name="KEYBRAKE_OUTPUT_DIR", value=OUTPUT_DIR),
            ],
            volume_mounts=proxy.volume_mounts() or None,
            resources=ResourceRequirements(
                requests={"cpu": Quantity("50m"), "memory": Quantity("64Mi")},
                limits={"memory": Quantity("128Mi")},
            ),
            security_context=SecurityContext(
                run_as_non_root=True,
                run_as_user=65534,
                allow_privilege_escalation=False,
                capabilities=Capabilities(drop=["ALL"]),
                seccomp_profile=SeccompProfile(type="RuntimeDefault"),
            ),
        ),
    )
