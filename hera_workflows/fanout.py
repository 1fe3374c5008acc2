"""Fan-out wrappers: run one pod per item, each with the vault key in its SDK's environment.

Items come from a literal list (`with_items`), or a JSON list at run time (`with_param`): a
workflow parameter (`"{{workflow.parameters.items}}"`) or a previous task's JSON output (pass the
task, or `"{{tasks.plan.outputs.result}}"`). Each pod gets `<vault_key>.<item>@<pod name>`, where
`<item>` is the first 12 hex digits of the item's SHA-256 (an Argo expression, `ITEM_ID`): the
proxy's audit log names the pod behind every call, and a per-pod cap (`max_usd_per_caller` on the
key) counts by the item, so an item Argo retries in a new pod keeps counting against its own cap
instead of getting a fresh one. The item also arrives as `KEYBRAKE_ITEM` (and as the pod's last
argument unless `args` is given; use `ITEM` to place it yourself).

The loop runs inside a small DAG template of its own so `parallelism` bounds this fan-out alone.
Pods retry transient failures but never exit code 77 (cap hit, refused key): see `retry`. The
pod's code runs its vendor calls through the pod helper (`keybrake_pod`, a standard-library file
copied into the image beside it), which exits 77 on a refusal and waits out a rate limit.
See <https://argo-workflows.readthedocs.io/en/latest/walk-through/loops/>.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from hera.workflows import RetryStrategy as HeraRetryStrategy
from hera.workflows import Task
from hera.workflows.models import (
    Arguments,
    Container,
    DAGTask,
    DAGTemplate,
    EnvVar,
    EnvVarSource,
    Inputs,
    IntOrString,
    Item,
    Parameter,
    RetryStrategy,
    SecretKeySelector,
    Template,
)

from .errors import TemplateConfigError
from .issue import VaultKey
from .retry import default_retry_strategy
from .vendors import sdk_env
from .workflow_context import add_template, current_dag, current_workflow

__all__ = ["ITEM", "ITEM_ID", "ItemValue", "fan_out"]

ITEM = "{{inputs.parameters.item}}"
"""The current item inside a fan-out pod's `args` (also in its `KEYBRAKE_ITEM` variable)."""

ITEM_ID = "{{=sprig.trunc(12, sprig.sha256sum(inputs.parameters.item))}}"
"""A short, stable identity of the current item: the same in every pod that runs it."""

ItemValue = str | int | float | bool | Mapping[str, Any]

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,48}[a-z0-9])?$")
_TASK_REF = re.compile(r"\{\{\s*tasks\.([^.}\s]+)\.outputs\.")
_RESERVED_ENV = re.compile(r"^KEYBRAKE_")


RAW_KEY_ENV = "KEYBRAKE_VAULT_KEY_RAW"
"""The untagged key from the run's Secret (delivery "secret"); the SDK variables hold it tagged."""


def _key_input(key: VaultKey) -> str:
    """How the pods get the key: the run's Secret name, or (delivery "parameter") the key."""
    return "vault_key_secret" if key.delivery == "secret" else "vault_key"


def _param(name: str) -> str:
    return f"{{{{inputs.parameters.{name}}}}}"


def _pod_template(
    name: str,
    key: VaultKey,
    *,
    image: str,
    command: Sequence[str] | None,
    args: Sequence[str] | None,
    env: Mapping[str, str],
    retry: RetryStrategy,
    active_deadline_seconds: int | None,
    service_account: str | None,
) -> Template:
    key_input = _key_input(key)
    pod_env: list[EnvVar] = []
    if key.delivery == "secret":
        # The kubelet reads the key from the run's Secret; Kubernetes then expands $(...) in the
        # variables after it, so the tagged key is composed in the pod, never in the Workflow.
        pod_env.append(
            EnvVar(
                name=RAW_KEY_ENV,
                value_from=EnvVarSource(
                    secret_key_ref=SecretKeySelector(name=_param(key_input), key="vault_key")
                ),
            )
        )
        untagged = f"$({RAW_KEY_ENV})"
    else:
        untagged = _param("vault_key")
    tagged_key = f"{untagged}.{ITEM_ID}@{{{{pod.name}}}}"
    pod_env += sdk_env(key.vendor, tagged_key, _param("proxy_url"))
    pod_env.append(EnvVar(name="KEYBRAKE_ITEM", value=ITEM))
    taken = {e.name for e in pod_env}
    for variable, value in env.items():
        if variable in taken or _RESERVED_ENV.match(variable):
            raise TemplateConfigError(f"env {variable!r} is set by keybrake; choose another name")
        pod_env.append(EnvVar(name=variable, value=value))
    return Template(
        name=name,
        inputs=Inputs(
            parameters=[
                Parameter(name=key_input),
                Parameter(name="proxy_url"),
                Parameter(name="item"),
            ]
        ),
        service_account_name=service_account,
        retry_strategy=retry,
        active_deadline_seconds=(
            IntOrString(active_deadline_seconds) if active_deadline_seconds is not None else None
        ),
        container=Container(
            image=image,
            command=list(command) if command is not None else None,
            args=list(args) if args is not None else [ITEM],
            env=pod_env,
        ),
    )


def _items_source(
    with_items: Sequence[ItemValue] | None, with_param: str | Task | None
) -> tuple[list[Item] | None, str | None]:
    if (with_items is None) == (with_param is None):
        raise TemplateConfigError("fan_out() needs exactly one of with_items= or with_param=")
    if with_items is not None:
        if isinstance(with_items, str | bytes) or not list(with_items):
            raise TemplateConfigError(
                f"with_items must be a non-empty list such as ['eu', 'us'], got {with_items!r}"
            )
        return [Item(root=item) for item in with_items], None
    if isinstance(with_param, Task):
        return None, f"{{{{tasks.{with_param.name}.outputs.result}}}}"
    if not isinstance(with_param, str) or not with_param.strip().startswith("{{"):
        raise TemplateConfigError(
            "with_param must be a task, or an expression holding a JSON list such as "
            f"'{{{{workflow.parameters.items}}}}', got {with_param!r}"
        )
    return None, with_param


def _retry_model(retry: RetryStrategy | HeraRetryStrategy | None) -> RetryStrategy:
    if retry is None:
        return default_retry_strategy()
    if isinstance(retry, HeraRetryStrategy):
        return retry.build()
    return retry


def fan_out(
    key: VaultKey,
    name: str,
    *,
    image: str,
    command: Sequence[str] | None = None,
    args: Sequence[str] | None = None,
    with_items: Sequence[ItemValue] | None = None,
    with_param: str | Task | None = None,
    parallelism: int | None = None,
    retry: RetryStrategy | HeraRetryStrategy | None = None,
    env: Mapping[str, str] | None = None,
    active_deadline_seconds: int | None = None,
    service_account: str | None = None,
) -> Task:
    """Add a fan-out task named `name` to the current `with DAG(...)` block and return it.

    It depends on the issue task (and on the task producing `with_param`, if any) by itself.
    `retry` defaults to `default_retry_strategy()` (a hera `RetryStrategy` or the model class
    both work); `parallelism` bounds the pods running at once. `service_account` runs the pods
    as another service account than the workflow's (e.g. `keybrake-workload`, which may not
    create Secrets nor get a keybrake token).
    """
    what = "fan_out()"
    dag = current_dag(what)
    workflow = current_workflow(what)
    if not _NAME.match(name):
        raise TemplateConfigError(
            f"fan-out name must be lowercase letters, digits and dashes (max 50), got {name!r}"
        )
    if not image.strip():
        raise TemplateConfigError("image must name a container image, e.g. ghcr.io/acme/agent:1.4")
    if parallelism is not None and (
        not isinstance(parallelism, int) or isinstance(parallelism, bool) or parallelism < 1
    ):
        raise TemplateConfigError(f"parallelism must be a positive integer, got {parallelism!r}")
    items, items_param = _items_source(with_items, with_param)
    pod = _pod_template(
        f"{name}-pod",
        key,
        image=image,
        command=command,
        args=args,
        env=env or {},
        retry=_retry_model(retry),
        active_deadline_seconds=active_deadline_seconds,
        service_account=service_account,
    )
    key_input = _key_input(key)
    passed = [
        Parameter(name=key_input, value=_param(key_input)),
        Parameter(name="proxy_url", value=_param("proxy_url")),
        Parameter(name="item", value="{{item}}"),
    ]
    inputs = [Parameter(name=key_input), Parameter(name="proxy_url")]
    if items_param is not None:
        inputs.append(Parameter(name="items"))
    loop = Template(
        name=name,
        inputs=Inputs(parameters=inputs),
        parallelism=parallelism,
        dag=DAGTemplate(
            tasks=[
                DAGTask(
                    name=name,
                    template=pod.name,
                    arguments=Arguments(parameters=passed),
                    with_items=items,
                    with_param=_param("items") if items_param is not None else None,
                )
            ]
        ),
    )
    add_template(workflow, pod)
    add_template(workflow, loop)
    depends = [key.task.name]
    for producer in _TASK_REF.findall(items_param or ""):
        if producer not in depends:
            depends.append(producer)
    handle = key.vault_key_secret if key.delivery == "secret" else key.vault_key
    arguments = {key_input: handle, "proxy_url": key.proxy.url}
    if items_param is not None:
        arguments["items"] = items_param
    if any(getattr(task, "name", None) == name for task in dag.tasks):
        raise TemplateConfigError(f"the DAG already has a task named {name!r}; pick another name")
    return Task(name=name, template=name, arguments=arguments, depends=" && ".join(depends))
