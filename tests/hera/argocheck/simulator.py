"""Run a rendered Workflow or WorkflowTemplate the way the Argo controller would, with each pod
as a local process: no cluster, but the real step code and the real environment.

What it reproduces of Argo v4.1.2, and nothing more:

- parameter resolution and substitution (`common.ProcessArgs` / `SubstituteParams`): input
  values are the argument, else the default; then globals (and `pod.name`) are replaced over the
  template's JSON, unresolved tags left as they are, then `inputs.*`; values JSON-escaped;
  expression tags (`{{=...}}`) of the few sprig functions keybrake uses (`sha256sum`, `trunc`)
  over variables, evaluated once every variable they name is known;
- DAG tasks: `depends`, `withItems` / `withParam` expansion (`{{item}}`, `{{item.key}}`),
  `tasks.*` references resolved strictly, the DAG template's `parallelism`, fail-fast;
- `templateRef` into the catalog, `outputs.parameters` (`valueFrom.path`, `default`,
  `globalName`), `outputs.result` for scripts;
- `retryStrategy`: limit, policy AND expression (`asInt(lastRetry.exitCode) ...`), no waiting;
- `onExit` after the entrypoint with `{{workflow.status}}`; a failed exit handler fails the run;
- `argo retry` of a finished run (`retry`): its succeeded nodes are kept, outputs and globals
  included, and not run again; failed and errored ones run again, and so does the exit handler.

A pod's process gets exactly the template's `env`, plus `PATH` and `HOSTNAME` (= pod name) as
Kubernetes sets, and, with a `cluster` (a stand-in API server), what the kubelet adds:
`KUBERNETES_SERVICE_HOST`/`PORT`, the service account's token, CA and namespace mounted at
/var/run/secrets/kubernetes.io/serviceaccount (unless `automountServiceAccountToken: false`),
and projected volumes (`serviceAccountToken` for an audience, ConfigMap items). `secretKeyRef`
values are read from the cluster's Secrets as they are when the pod starts (without a cluster,
from `secrets`), and `$(VAR)` references to earlier variables are expanded as Kubernetes does
(`$$(VAR)` stays literal). The service account is the template's `serviceAccountName`, else the
workflow's, else `default`. Its `/tmp` and every mount are folders of its own under `workdir`
(paths in its env are rewritten to them). Images and commands map to local programs through
`entrypoints` and `commands`.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .semantics import parse_depends

_TAG = re.compile(r"\{\{(.*?)\}\}", re.S)
_POD_TIMEOUT = 300  # a safety net against a hung process, never an assertion


class Unresolved(Exception):
    pass


_SPRIG = {
    "sprig.sha256sum": lambda text: hashlib.sha256(str(text).encode()).hexdigest(),
    "sprig.trunc": lambda length, text: str(text)[: int(length)],
}
_CALL = re.compile(r"^(sprig\.\w+)\((.*)\)$", re.S)


def _expression(source: str, values: Mapping[str, str]) -> str:
    """The value of an expression tag made of sprig calls, variables and integers; KeyError when
    a variable is not known (yet)."""
    source = source.strip()
    call = _CALL.match(source)
    if call:
        depth, start, args = 0, 0, []
        body = call.group(2)
        for index, char in enumerate(body):
            depth += char == "("
            depth -= char == ")"
            if char == "," and depth == 0:
                args.append(body[start:index])
                start = index + 1
        args.append(body[start:])
        return str(_SPRIG[call.group(1)](*(_expression(a, values) for a in args)))
    if source.isdigit():
        return source
    return values[source]


def substitute(value: Any, values: Mapping[str, str], strict_prefixes: tuple[str, ...] = ()) -> Any:
    """Argo's substitution over the JSON form of `value`."""
    text = json.dumps(value, ensure_ascii=False)

    def replace(match: re.Match[str]) -> str:
        tag = match.group(1).strip()
        if tag.startswith("="):
            try:
                return json.dumps(_expression(tag[1:], values), ensure_ascii=False)[1:-1]
            except KeyError:
                return match.group(0)
        if tag in values:
            return json.dumps(values[tag], ensure_ascii=False)[1:-1]
        if tag.startswith(strict_prefixes):
            raise Unresolved(f"failed to resolve {{{{{tag}}}}}")
        return match.group(0)

    return json.loads(_TAG.sub(replace, text))


@dataclass
class Pod:
    name: str
    template: str
    argv: list[str]
    env: dict[str, str]
    tmp: Path
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    phase: str = "Pending"
    message: str = ""
    image: str = ""  # as resolved, what the kubelet would pull
    service_account: str = ""


@dataclass
class Node:
    name: str
    phase: str
    parameters: dict[str, str] = field(default_factory=dict)
    result: str | None = None
    exit_code: str | None = None
    message: str = ""
    attempts: list[Pod] = field(default_factory=list)
    children: list[Node] = field(default_factory=list)


@dataclass
class Run:
    phase: str
    entry: Node
    exit_handler: Node | None
    pods: list[Pod]
    globals: dict[str, str]

    def pods_of(self, template: str) -> list[Pod]:
        return [pod for pod in self.pods if pod.template == template]

    @property
    def outputs(self) -> dict[str, str]:
        prefix = "workflow.outputs.parameters."
        return {k[len(prefix) :]: v for k, v in self.globals.items() if k.startswith(prefix)}


class Simulator:
    def __init__(
        self,
        catalog: list[dict[str, Any]],
        *,
        workdir: Path,
        secrets: Mapping[str, Mapping[str, str]] | None = None,
        entrypoints: Mapping[str, list[str]] | None = None,
        commands: Mapping[str, list[str]] | None = None,
        broken_tmp: frozenset[str] = frozenset(),
        flaky_tmp: Mapping[str, int] | None = None,
        name: str = "wf-sim",
        namespace: str = "argo",
        uid: str = "0b6a1f57-2d8e-4e5e-9c55-6c3b0e6b1d01",
        cluster: Any = None,
    ) -> None:
        self.catalog = catalog
        self.workdir = workdir
        self.secrets = secrets or {}
        self.cluster = cluster
        # template name -> how many of its first attempts get an unusable /tmp
        self.flaky_tmp = dict(flaky_tmp or {})
        self.entrypoints = dict(entrypoints or {})
        self.commands = {"python": [sys.executable], **dict(commands or {})}
        self.broken_tmp = broken_tmp
        self.name, self.namespace, self.uid = name, namespace, uid
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        self.pods: list[Pod] = []
        self.globals: dict[str, str] = {}
        self._kept: dict[str, Node] = {}  # `retry`: the previous run's succeeded nodes by path

    # -- entry point -------------------------------------------------------------------------------
    def run(self, document: dict[str, Any], parameters: Mapping[str, str] | None = None) -> Run:
        self.document = document
        spec = document["spec"]
        self.globals = {
            "workflow.name": self.name,
            "workflow.namespace": self.namespace,
            "workflow.uid": self.uid,
            "workflow.status": "Running",
        }
        given = dict(parameters or {})
        for parameter in (spec.get("arguments") or {}).get("parameters", []):
            value = given.pop(parameter["name"], parameter.get("value"))
            if value is None:
                raise ValueError(f"spec.arguments.{parameter['name']}.value is required")
            self.globals[f"workflow.parameters.{parameter['name']}"] = value
        if given:
            raise ValueError(f"unknown workflow parameters {sorted(given)}")
        return self._execute(document)

    def retry(self, document: dict[str, Any], previous: Run) -> Run:
        """`argo retry` of the finished run `previous` (same workflow, same uid)."""
        self.document = document

        def walk(node: Node) -> list[Node]:
            return [node, *(n for child in node.children for n in walk(child))]

        self._kept = {n.name: n for n in walk(previous.entry) if n.phase == "Succeeded"}
        self.globals = {**previous.globals, "workflow.status": "Running"}
        try:
            return self._execute(document)
        finally:
            self._kept = {}

    def _execute(self, document: dict[str, Any]) -> Run:
        spec = document["spec"]
        entry = self.execute(document, spec["entrypoint"], {}, spec["entrypoint"])
        status = entry.phase if entry.phase in ("Succeeded", "Failed") else "Error"
        self.globals["workflow.status"] = status
        exit_node = None
        phase = status
        if spec.get("onExit"):
            exit_node = self.execute(document, spec["onExit"], {}, "onExit")
            if exit_node.phase != "Succeeded":
                phase = "Failed"
        return Run(phase, entry, exit_node, list(self.pods), dict(self.globals))

    # -- templates -----------------------------------------------------------------------------
    def lookup(self, document: dict[str, Any], node: Mapping[str, Any]) -> tuple[dict, dict]:
        if "templateRef" in node:
            ref = node["templateRef"]
            kind = "ClusterWorkflowTemplate" if ref.get("clusterScope") else "WorkflowTemplate"
            for candidate in self.catalog:
                if candidate["kind"] == kind and candidate["metadata"]["name"] == ref["name"]:
                    document, name = candidate, ref["template"]
                    break
            else:
                raise LookupError(f"no {kind} {ref['name']}")
        else:
            name = node["template"]
        for template in document["spec"]["templates"]:
            if template["name"] == name:
                return document, template
        raise LookupError(f"no template {name}")

    def process_args(
        self, template: dict[str, Any], arguments: Mapping[str, str], local: Mapping[str, str]
    ) -> dict[str, Any]:
        resolved = copy.deepcopy(template)
        for parameter in (resolved.get("inputs") or {}).get("parameters", []):
            if "default" in parameter:
                parameter["value"] = parameter["default"]
            if parameter["name"] in arguments:
                parameter["value"] = arguments[parameter["name"]]
            if parameter.get("value") is None:
                raise Unresolved(f"inputs.parameters.{parameter['name']} was not supplied")
        with self._lock:
            scope = {**self.globals, **local}
        resolved = substitute(resolved, scope)
        inputs = {
            f"inputs.parameters.{p['name']}": p["value"]
            for p in (resolved.get("inputs") or {}).get("parameters", [])
        }
        return substitute(resolved, inputs)

    def execute(
        self, document: dict[str, Any], name: str, arguments: Mapping[str, str], path: str
    ) -> Node:
        return self.call(document, {"template": name}, arguments, path)

    def call(
        self,
        document: dict[str, Any],
        invocation: Mapping[str, Any],
        arguments: Mapping[str, str],
        path: str,
    ) -> Node:
        document, template = self.lookup(document, invocation)
        kept = self._kept.get(path)
        if kept is not None:  # `argo retry`: a node that succeeded is not run again
            self.export_globals(template, kept)
            return kept
        if "dag" in template:
            try:
                resolved = self.process_args(template, arguments, {})
            except Unresolved as exc:
                return Node(path, "Error", message=str(exc))
            node = self.run_dag(document, resolved, path)
        else:
            node = self.run_pod_with_retries(template, arguments, path)
        if node.phase == "Succeeded":
            self.export_globals(template, node)
        return node

    def export_globals(self, template: dict[str, Any], node: Node) -> None:
        with self._lock:
            for parameter in (template.get("outputs") or {}).get("parameters", []):
                if parameter.get("globalName") and parameter["name"] in node.parameters:
                    key = f"workflow.outputs.parameters.{parameter['globalName']}"
                    self.globals[key] = node.parameters[parameter["name"]]

    # -- DAGs ------------------------------------------------------------------------------------
    def run_dag(self, document: dict[str, Any], template: dict[str, Any], path: str) -> Node:
        tasks = {task["name"]: task for task in template["dag"]["tasks"]}
        done: dict[str, Node] = {}
        fail_fast = template["dag"].get("failFast", True)
        parallelism = template.get("parallelism")
        failed = False
        while len(done) < len(tasks):
            before = len(done)
            ready = []
            for name, task in tasks.items():
                if name in done:
                    continue
                parents = parse_depends(task.get("depends", ""))
                if any(p not in done for p in parents):
                    continue
                if failed and fail_fast:
                    done[name] = Node(f"{path}.{name}", "Omitted", message="fail fast")
                elif not _depends_true(task.get("depends", ""), done):
                    done[name] = Node(f"{path}.{name}", "Omitted")
                else:
                    ready.append(name)
            if not ready:
                if len(done) == before:
                    waiting = sorted(set(tasks) - set(done))
                    raise RuntimeError(f"{path}: tasks {waiting} can never run")
                continue
            with ThreadPoolExecutor(max_workers=len(ready)) as pool:
                futures = {
                    name: pool.submit(
                        self.run_task, document, tasks[name], done, f"{path}.{name}", parallelism
                    )
                    for name in ready
                }
                for name, future in futures.items():
                    done[name] = future.result()
                    if done[name].phase in ("Failed", "Error"):
                        failed = True
        phase = "Failed" if failed else "Succeeded"
        node = Node(path, phase, children=list(done.values()))
        if phase == "Succeeded":
            # A DAG's own outputs: `valueFrom.parameter` naming a task's output (exported with
            # its globalName by `call`, as for a pod's).
            scope = _task_scope(done)
            for parameter in (template.get("outputs") or {}).get("parameters", []):
                source = (parameter.get("valueFrom") or {}).get("parameter")
                if source is not None:
                    try:
                        node.parameters[parameter["name"]] = substitute(source, scope, ("tasks.",))
                    except Unresolved as exc:
                        return Node(path, "Error", message=str(exc), children=node.children)
        return node

    def run_task(
        self,
        document: dict[str, Any],
        task: dict[str, Any],
        done: Mapping[str, Node],
        path: str,
        parallelism: int | None,
    ) -> Node:
        scope = _task_scope(done)
        try:
            if "withItems" in task or "withParam" in task:
                if "withParam" in task:
                    raw = substitute(task["withParam"], scope, ("tasks.", "steps."))
                    items = json.loads(raw)
                    if not isinstance(items, list):
                        raise Unresolved(f"withParam is not a JSON list: {raw!r}")
                else:
                    items = task["withItems"]
                expanded = [_with_item(task, item) for item in items]
            else:
                expanded = [task]
            calls = [substitute(t, scope, ("tasks.", "steps.")) for t in expanded]
        except (Unresolved, ValueError) as exc:
            return Node(path, "Error", message=str(exc))
        if len(calls) == 1 and "withItems" not in task and "withParam" not in task:
            return self.call(document, calls[0], _arguments(calls[0]), path)
        return self.run_loop(document, calls, path, parallelism)

    def run_loop(
        self, document: dict[str, Any], calls: list[dict[str, Any]], path: str, limit: int | None
    ) -> Node:
        children: list[Node | None] = [None] * len(calls)
        stop = threading.Event()

        def child(index: int) -> None:
            child_path = f"{path}({index})"
            if stop.is_set():
                children[index] = Node(child_path, "Omitted", message="fail fast")
                return
            node = self.call(document, calls[index], _arguments(calls[index]), child_path)
            children[index] = node
            if node.phase in ("Failed", "Error"):
                stop.set()

        with ThreadPoolExecutor(max_workers=limit or max(len(calls), 1)) as pool:
            list(pool.map(child, range(len(calls))))
        nodes = [node for node in children if node is not None]
        failed = any(node.phase in ("Failed", "Error") for node in nodes)
        group = Node(path, "Failed" if failed else "Succeeded", children=nodes)
        names = {name for node in nodes for name in node.parameters}
        for name in names:
            group.parameters[name] = json.dumps([node.parameters.get(name) for node in nodes])
        group.result = json.dumps([node.result for node in nodes])
        return group

    # -- pods ------------------------------------------------------------------------------------
    def run_pod_with_retries(
        self, template: dict[str, Any], arguments: Mapping[str, str], path: str
    ) -> Node:
        retry = template.get("retryStrategy")
        limit = int((retry or {}).get("limit", 0)) if retry else 0
        node = Node(path, "Pending")
        for attempt in range(limit + 1):
            pod = self.run_pod(template, arguments)
            node.attempts.append(pod)
            node.phase, node.message = pod.phase, pod.message
            node.exit_code = str(pod.exit_code) if pod.exit_code is not None else None
            if pod.phase == "Succeeded":
                outcome = self.collect_outputs(template, pod)
                if isinstance(outcome, str):
                    node.phase, node.message = "Error", outcome
                else:
                    node.parameters, node.result = outcome
                    return node
            if not retry or attempt == limit or not _should_retry(retry, node):
                return node
        return node

    def run_pod(self, template: dict[str, Any], arguments: Mapping[str, str]) -> Pod:
        number = next(self._counter)
        pod_name = f"{self.name}-{template['name']}-{number}"
        tmp = self.workdir / pod_name / "tmp"
        tmp.parent.mkdir(parents=True)
        with self._lock:
            flaky = self.flaky_tmp.get(template["name"], 0) > 0
            if flaky:
                self.flaky_tmp[template["name"]] -= 1
        if template["name"] in self.broken_tmp or flaky:
            tmp.write_text("not a folder: this pod's /tmp is unusable")
        else:
            tmp.mkdir()
        pod = Pod(pod_name, template["name"], [], {}, tmp)
        with self._lock:
            self.pods.append(pod)
        try:
            resolved = self.process_args(template, arguments, {"pod.name": pod_name})
        except Unresolved as exc:
            pod.phase, pod.message = "Error", str(exc)
            return pod
        container = resolved.get("script") or resolved["container"]
        pod.image, pod.service_account = container["image"], self.service_account(resolved)
        mounts = self.mount_volumes(resolved, container, pod_name, tmp.parent / "fs")
        try:
            pod.env = self.environment(container.get("env") or [], {"/tmp": tmp, **mounts})
        except KeyError as exc:
            pod.phase, pod.message = "Error", f"CreateContainerConfigError: {exc}"
            return pod
        pod.argv = self.argv(resolved, container, pod)
        kubelet: dict[str, str] = {}
        if self.cluster is not None:
            host, port = self.cluster.url.removeprefix("https://").rsplit(":", 1)
            kubelet = {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port}
        process = subprocess.run(
            pod.argv,
            env={"PATH": os.environ["PATH"], "HOSTNAME": pod_name, **kubelet, **pod.env},
            cwd=tmp.parent,
            capture_output=True,
            text=True,
            timeout=_POD_TIMEOUT,
            check=False,
        )
        pod.exit_code, pod.stdout, pod.stderr = process.returncode, process.stdout, process.stderr
        pod.phase = "Succeeded" if process.returncode == 0 else "Failed"
        if process.returncode:
            pod.message = f"Error (exit code {process.returncode})"
        return pod

    def service_account(self, template: dict[str, Any]) -> str:
        spec = self.document.get("spec", {})
        return str(
            template.get("serviceAccountName") or spec.get("serviceAccountName") or "default"
        )

    def mount_volumes(
        self, template: dict[str, Any], container: dict[str, Any], pod_name: str, root: Path
    ) -> dict[str, Path]:
        """The kubelet's part: the service account's mount and the template's projected
        volumes, as files under `root`; returns mount path -> local folder."""
        if self.cluster is None:
            return {}
        account = self.service_account(template)
        mounts: dict[str, Path] = {}
        if template.get("automountServiceAccountToken", True):
            folder = root / "kube-api-access"
            folder.mkdir(parents=True)
            token = self.cluster.token(
                self.namespace, account, audience=self.cluster.issuer, pod=pod_name, lifetime=3607
            )
            (folder / "token").write_text(token)
            (folder / "ca.crt").write_bytes(self.cluster.ca_file.read_bytes())
            (folder / "namespace").write_text(self.namespace)
            mounts["/var/run/secrets/kubernetes.io/serviceaccount"] = folder
        volumes = {v["name"]: v for v in template.get("volumes") or []}
        for mount in container.get("volumeMounts") or []:
            volume = volumes[mount["name"]]
            folder = root / mount["name"]
            folder.mkdir(parents=True)
            for source in (volume.get("projected") or {}).get("sources", []):
                if "serviceAccountToken" in source:
                    projection = source["serviceAccountToken"]
                    token = self.cluster.token(
                        self.namespace,
                        account,
                        audience=projection.get("audience", self.cluster.issuer),
                        lifetime=int(projection.get("expirationSeconds", 3600)),
                        pod=pod_name,
                    )
                    (folder / projection["path"]).write_text(token)
                if "configMap" in source:
                    data = self.cluster.configmaps[(self.namespace, source["configMap"]["name"])]
                    for item in source["configMap"].get("items") or []:
                        (folder / item["path"]).write_text(data[item["key"]])
            mounts[mount["mountPath"]] = folder
        return mounts

    def secret(self, name: str, key: str) -> str:
        if self.cluster is not None:
            return str(self.cluster.secret_value(self.namespace, name, key))
        return self.secrets[name][key]

    def environment(self, env: list[dict[str, Any]], paths: Mapping[str, Path]) -> dict[str, str]:
        values: dict[str, str] = {}
        for variable in env:
            if "valueFrom" in variable:
                ref = variable["valueFrom"]["secretKeyRef"]
                value = self.secret(ref["name"], ref["key"])
            else:
                value = _expand(_local_path(variable.get("value", ""), paths), values)
            values[variable["name"]] = value
        return values

    def argv(self, template: dict[str, Any], container: dict[str, Any], pod: Pod) -> list[str]:
        command = list(container.get("command") or [])
        args = list(container.get("args") or [])
        if "script" in template:
            source = pod.tmp.parent / "script"
            source.write_text(container["source"], encoding="utf-8")
            return [*self.commands[command[0]], *command[1:], str(source), *args]
        if command:
            return [*self.commands[command[0]], *command[1:], *args]
        return [*self.entrypoints[container["image"]], *args]

    def collect_outputs(
        self, template: dict[str, Any], pod: Pod
    ) -> tuple[dict[str, str], str | None] | str:
        parameters: dict[str, str] = {}
        for parameter in (template.get("outputs") or {}).get("parameters", []):
            source = parameter.get("valueFrom") or {}
            local = Path(_local_path(source["path"], {"/tmp": pod.tmp}))
            try:
                parameters[parameter["name"]] = local.read_text(encoding="utf-8")
            except OSError:
                if "default" not in source:
                    return f"failed to read output {parameter['name']} at {source['path']}"
                parameters[parameter["name"]] = source["default"]
        result = pod.stdout.strip() if "script" in template else None
        return parameters, result


def _local_path(value: str, paths: Mapping[str, Path]) -> str:
    """A path in the pod (its /tmp, a mount) as the local folder standing in for it."""
    for prefix, folder in paths.items():
        if value == prefix or value.startswith(prefix + "/"):
            return str(folder) + value[len(prefix) :]
    return value


_DEPENDENT = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def _expand(value: str, defined: Mapping[str, str]) -> str:
    """Kubernetes' dependent environment variables: `$(NAME)` of a variable defined earlier in
    the list is replaced, an unknown one left as written, `$$` is a literal `$`."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return defined[name] if name in defined else match.group(0)

    return _DEPENDENT.sub(replace, value)


def _arguments(call: Mapping[str, Any]) -> dict[str, str]:
    return {p["name"]: p["value"] for p in (call.get("arguments") or {}).get("parameters", [])}


def _with_item(task: dict[str, Any], item: Any) -> dict[str, Any]:
    values = {"item": item if isinstance(item, str) else json.dumps(item)}
    if isinstance(item, dict):
        for key, value in item.items():
            values[f"item.{key}"] = value if isinstance(value, str) else json.dumps(value)
    expanded = {k: v for k, v in task.items() if k not in ("withItems", "withParam")}
    return substitute(expanded, values)


def _task_scope(done: Mapping[str, Node]) -> dict[str, str]:
    scope: dict[str, str] = {}
    for name, node in done.items():
        scope[f"tasks.{name}.status"] = node.phase
        if node.exit_code is not None:
            scope[f"tasks.{name}.exitCode"] = node.exit_code
        for parameter, value in node.parameters.items():
            scope[f"tasks.{name}.outputs.parameters.{parameter}"] = value
        if node.result is not None:
            scope[f"tasks.{name}.outputs.result"] = node.result
    return scope


def _depends_true(expression: str, done: Mapping[str, Node]) -> bool:
    if not expression.strip():
        return True

    def result(match: re.Match[str]) -> str:
        name, _, wanted = match.group(0).partition(".")
        phase = done[name].phase
        if not wanted:
            return str(phase in ("Succeeded", "Skipped", "Daemoned"))
        mapping = {"Errored": "Error"}
        return str(phase == mapping.get(wanted, wanted))

    python = re.sub(r"[A-Za-z0-9][-A-Za-z0-9_]*(?:\.[A-Za-z]+)?", result, expression)
    python = python.replace("&&", " and ").replace("||", " or ").replace("!", " not ")
    return bool(eval(python, {"__builtins__": {}}, {"True": True, "False": False}))


def _should_retry(retry: Mapping[str, Any], node: Node) -> bool:
    """processNodeRetries: the policy AND the expression."""
    policy = retry.get("retryPolicy") or ("Always" if retry.get("expression") else "OnFailure")
    allowed = {
        "Always": {"Failed", "Error"},
        "OnFailure": {"Failed"},
        "OnError": {"Error"},
        "OnTransientError": set(),
    }[policy]
    if node.phase not in allowed:
        return False
    expression = retry.get("expression")
    if not expression:
        return True
    variables = {
        "exitCode": node.exit_code if node.exit_code is not None else "-1",
        "status": node.phase,
        "duration": "0",
        "message": node.message,
    }
    python = re.sub(r"lastRetry\.(\w+)", lambda m: repr(variables[m.group(1)]), expression)
    python = python.replace("asInt(", "int(").replace("&&", " and ").replace("||", " or ")
    return bool(eval(python, {"__builtins__": {}}, {"int": int}))
