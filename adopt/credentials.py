"""Which Secrets a template's pods read a third-party API credential from.

A heuristic, documented in docs/lint.md: a Secret reference is a credential when the Secret's
name, the key read from it or the environment variable it lands in names a known vendor
(`stripe`, `twilio`, …), or the key or variable ends like a credential (`*_API_KEY`, `*_TOKEN`,
`*_SECRET`, …); a whole Secret (envFrom, a volume) when its name says so. `Heuristic.uncappable`
(lint) adds names that only ever mean another vendor's credential (`*PASSWORD` run into a word,
`docker-config`, `*-sa`) and a whole Secret the template also reads a credential from by key.
Each credential is of a vendor keybrake proxies (`proxied`: the names say Stripe, Twilio or
Resend, `keybrake.proxy.vendor_facts.VENDOR_NAMES`) or not: another vendor, or one the names do
not tell. keybrake's own references (`KEYBRAKE_*`
variables, the `vault_key` of a per-run Secret) are never credentials. A Secret can be marked
internal, so it is never reported: listed under `internal_secrets` in `.keybrake-lint.yaml`, or
annotated `keybrake.dev/internal: "true"` on the Secret object when it is among the files linted.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

import yaml
from ruamel.yaml.comments import CommentedMap

from keybrake.adopt.workflows import Workflow, line_of
from keybrake.adopt.yaml_bound import TooManyAliasNodes, safe_load
from keybrake.proxy.vendor_facts import VENDOR_NAMES

__all__ = ["VENDORS", "CredentialUse", "Heuristic", "credential_uses"]

# Substrings naming a vendor, and the vendor. The first ones are those keybrake proxies.
VENDORS = {
    **{name: name for name in VENDOR_NAMES},
    "sendgrid": "sendgrid",
    "mailgun": "mailgun",
    "postmark": "postmark",
    "openai": "openai",
    "anthropic": "anthropic",
    "plaid": "plaid",
    "paypal": "paypal",
    "braintree": "braintree",
    "adyen": "adyen",
    "shopify": "shopify",
    "vonage": "vonage",
    "nexmo": "vonage",
    # Cloud, code-host and model-hub credentials: never a Stripe, Twilio or Resend key, whatever
    # `wrap --vendor` says.
    "huggingface": "hugging face",
    "hf_": "hugging face",
    "aws_": "aws",
    "github": "github",
    "gitlab": "gitlab",
    "wandb": "weights & biases",
}
_CREDENTIAL_NAME = re.compile(
    r"(^|_)(API_?KEY|APIKEY|SECRET_?KEY|SECRET|TOKEN|AUTH_?TOKEN|ACCESS_?TOKEN|ACCESS_?KEY|"
    r"PRIVATE_?KEY|PASSWORD)$"
)
_CREDENTIAL_SECRET = re.compile(r"(credential|api-?key|token|secret-?key)", re.I)
# What else says "credential" when a vendor keybrake proxies is not named (lint's KB107): a
# password run into a word (`MYSECRETPASSWORD`), a whole Secret holding a password, a registry's
# auth (`docker-config`) or a service account's key (`user-gcp-sa`).
_UNCAPPABLE_NAME = re.compile(r"(PASSWORD|PASSWD)$")
_UNCAPPABLE_SECRET = re.compile(
    r"(password|passwd|docker-?config|service-?account|(^|[-_.])sa(-?key)?$)", re.I
)
# With a vendor's name, what a credential ends with (STRIPE_KEY, TWILIO_AUTH_TOKEN, ...), and
# what never is one: a webhook's signing secret, a publishable key, a sender number or a SID.
_VENDOR_CREDENTIAL = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|CREDENTIALS?)$")
_NOT_A_CREDENTIAL = re.compile(r"(WEBHOOK|SIGNING|PUBLISHABLE|PUBLIC)")
INTERNAL_ANNOTATION = "keybrake.dev/internal"


def _normal(name: str) -> str:
    return re.sub(r"[^A-Z0-9]+", "_", name.upper()).strip("_")


@dataclass(frozen=True, slots=True)
class CredentialUse:
    how: str  # env, envFrom, volume, templateDefaults env, podSpecPatch
    container: str  # main, init:<name>, sidecar:<name>, or the containerSet member's name
    secret: str
    key: str | None  # the Secret's key, when one is named
    env: str | None  # the environment variable, when it is one
    vendor: str | None  # a known vendor, when the names tell
    line: int

    @property
    def proxied(self) -> bool:
        """A credential of a vendor keybrake proxies, so a capped vault key can replace it."""
        return self.vendor in VENDOR_NAMES

    @property
    def subject(self) -> str:
        """What a finding about it names: the variable (or header), else the Secret and key."""
        return self.env or (f"{self.secret}/{self.key}" if self.key else self.secret)

    def describe(self) -> str:
        what = f"Secret {self.secret!r}" + (f" key {self.key!r}" if self.key else "")
        into = f" as ${self.env}" if self.env else ""
        return f"{what}{into} ({self.how}, {self.container} container)"


@dataclass(slots=True)
class Heuristic:
    internal: set[str]
    # Also the names that only ever say "a credential of another vendor" (the `_UNCAPPABLE_*`
    # ones, and a whole Secret the template reads a credential from by key): lint reports those
    # (KB107); `keybrake wrap`, which converts credentials of the vendors keybrake proxies,
    # does not look for them.
    uncappable: bool = False

    def vendor_of(self, *names: str | None) -> str | None:
        for name in names:
            lowered = (name or "").lower()
            for marker, vendor in VENDORS.items():
                if marker in lowered:
                    return vendor
        return None

    def is_credential(
        self, secret: str, key: str | None, env: str | None, keyed: Collection[str] = ()
    ) -> bool:
        """Whether a Secret reference is a credential; `keyed`: Secrets the template reads a
        credential from by key, so that reading one of them whole is a credential too."""
        if secret in self.internal:
            return False
        if env and env.upper().startswith("KEYBRAKE_"):
            return False
        if key == "vault_key" or secret.startswith("keybrake-"):
            return False
        names = [_normal(n) for n in (key, env) if n]
        if any(_NOT_A_CREDENTIAL.search(n) for n in names):
            return False
        if key is None and env is None:
            # A whole Secret (envFrom, a volume) is known by its name, or by what else is read
            # from it.
            if self.vendor_of(secret) is not None or _CREDENTIAL_SECRET.search(secret):
                return True
            return self.uncappable and (secret in keyed or bool(_UNCAPPABLE_SECRET.search(secret)))
        if self.vendor_of(secret, key, env) is not None and any(
            _VENDOR_CREDENTIAL.search(n) for n in names
        ):
            return True
        if any(_CREDENTIAL_NAME.search(n) for n in names):
            return True
        return self.uncappable and any(_UNCAPPABLE_NAME.search(n) for n in names)


def _list(value: Any) -> list[Any]:
    """A field that should be a list; anything else (a typo, a number) holds nothing."""
    return value if isinstance(value, list) else []


def containers(template: CommentedMap) -> Iterator[tuple[str, CommentedMap]]:
    """(role, container) of every container a template's pod runs: `main`, `init:<name>`,
    `sidecar:<name>`, `set:<name>` (a containerSet member)."""
    for key in ("container", "script"):
        if isinstance(template.get(key), CommentedMap):
            yield "main", template[key]
    for key, role in (("initContainers", "init"), ("sidecars", "sidecar")):
        for item in _list(template.get(key)):
            if isinstance(item, CommentedMap):
                yield f"{role}:{item.get('name', '?')}", item
    container_set = template.get("containerSet")
    if isinstance(container_set, CommentedMap):
        for item in _list(container_set.get("containers")):
            if isinstance(item, CommentedMap):
                yield f"set:{item.get('name', '?')}", item


def _env_refs(container: Any) -> Iterator[tuple[str, str, str | None, str | None, Any]]:
    """(how, secret, key, env, node) of a container's Secret references in env and envFrom."""
    if not isinstance(container, dict):
        return
    for entry in _list(container.get("env")):
        source = entry.get("valueFrom") if isinstance(entry, dict) else None
        ref = source.get("secretKeyRef") if isinstance(source, dict) else None
        if isinstance(ref, dict) and ref.get("name"):
            yield "env", str(ref["name"]), _str(ref.get("key")), _str(entry.get("name")), entry
    for entry in _list(container.get("envFrom")):
        ref = entry.get("secretRef") if isinstance(entry, dict) else None
        if isinstance(ref, dict) and ref.get("name"):
            yield "envFrom", str(ref["name"]), None, None, entry


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _volume_secrets(volume: Any) -> Iterator[tuple[str, str | None]]:
    if not isinstance(volume, dict):
        return
    secret = volume.get("secret")
    if isinstance(secret, dict) and secret.get("secretName"):
        keys = [i.get("key") for i in _list(secret.get("items")) if isinstance(i, dict)]
        for key in keys or [None]:
            yield str(secret["secretName"]), _str(key)
    projected = volume.get("projected")
    if isinstance(projected, dict):
        for source in _list(projected.get("sources")):
            ref = source.get("secret") if isinstance(source, dict) else None
            if isinstance(ref, dict) and ref.get("name"):
                keys = [i.get("key") for i in _list(ref.get("items")) if isinstance(i, dict)]
                for key in keys or [None]:
                    yield str(ref["name"]), _str(key)


def _pod_spec_patch(text: Any) -> Iterator[tuple[str, str | None, str | None]]:
    """Secret references inside a podSpecPatch (a YAML or JSON string)."""
    if not isinstance(text, str):
        return
    try:
        patch = safe_load(text)
    except (yaml.YAMLError, TooManyAliasNodes):
        # An alias bomb is no patch Argo applies (its YAML reader refuses excessive aliasing):
        # like one that is no YAML, it adds nothing.
        return
    if not isinstance(patch, dict):
        return
    for key in ("containers", "initContainers"):
        for container in _list(patch.get(key)):
            for _how, secret, secret_key, env, _node in _env_refs(container):
                yield secret, secret_key, env
    for volume in _list(patch.get("volumes")):
        for secret, secret_key in _volume_secrets(volume):
            yield secret, secret_key, None


def _volumes(workflow: Workflow, template: CommentedMap) -> dict[str, Any]:
    return {
        str(v.get("name")): v
        for v in [*_list(template.get("volumes")), *_list(workflow.spec.get("volumes"))]
        if isinstance(v, dict)
    }


def _keyed_credential_secrets(
    workflow: Workflow, template: CommentedMap, heuristic: Heuristic
) -> dict[str, str | None]:
    """Secrets the template's containers read a credential from by key (env, volume items),
    each with the credential's vendor when the names tell."""
    found: dict[str, str | None] = {}
    volumes = _volumes(workflow, template)
    for _role, container in containers(template):
        refs = [(secret, key, env) for _how, secret, key, env, _node in _env_refs(container)]
        for mount in _list(container.get("volumeMounts")):
            volume = volumes.get(str(mount.get("name"))) if isinstance(mount, dict) else None
            refs += [(secret, key, None) for secret, key in _volume_secrets(volume)]
        for secret, key, env in refs:
            if (key or env) and heuristic.is_credential(secret, key, env):
                found[secret] = found.get(secret) or heuristic.vendor_of(secret, key, env)
    return found


def credential_uses(
    workflow: Workflow, template: CommentedMap, heuristic: Heuristic
) -> list[CredentialUse]:
    """Every third-party credential the template's pods read from a Secret (`proxied` tells the
    ones of a vendor keybrake proxies)."""
    found: list[CredentialUse] = []
    # A whole Secret the template also reads a credential from by key holds that credential.
    keyed = _keyed_credential_secrets(workflow, template, heuristic) if heuristic.uncappable else {}

    def add(
        how: str, container: str, secret: str, key: str | None, env: str | None, node: Any
    ) -> None:
        if heuristic.is_credential(secret, key, env, keyed):
            vendor = heuristic.vendor_of(secret, key, env) or keyed.get(secret)
            found.append(
                CredentialUse(
                    how, container, secret, key, env, vendor, line_of(node) or line_of(template)
                )
            )

    volumes = _volumes(workflow, template)
    running = list(containers(template))
    for role, container in running:
        for how, secret, key, env, node in _env_refs(container):
            add(how, role, secret, key, env, node)
        for mount in _list(container.get("volumeMounts")):
            volume = volumes.get(str(mount.get("name"))) if isinstance(mount, dict) else None
            for secret, key in _volume_secrets(volume):
                add("volume", role, secret, key, None, mount)
    defaults = workflow.spec.get("templateDefaults")
    if isinstance(defaults, CommentedMap):
        # Argo merges the defaults' container into container templates, its script into scripts.
        for key in ("container", "script"):
            if not isinstance(template.get(key), CommentedMap):
                continue
            for how, secret, secret_key, env, node in _env_refs(defaults.get(key)):
                add(f"templateDefaults {how}", "main", secret, secret_key, env, node)
    # An HTTP template (Argo's agent makes the call): a header taken from a Secret. An
    # Authorization header is a credential whatever the Secret's key is called.
    http = template.get("http")
    for header in _list(http.get("headers")) if isinstance(http, dict) else []:
        source = header.get("valueFrom") if isinstance(header, dict) else None
        ref = source.get("secretKeyRef") if isinstance(source, dict) else None
        if not isinstance(ref, dict) or not ref.get("name"):
            continue
        name, secret, key = str(header.get("name", "")), str(ref["name"]), _str(ref.get("key"))
        if secret in heuristic.internal:
            continue
        if _normal(name) in ("AUTHORIZATION", "PROXY_AUTHORIZATION") or heuristic.is_credential(
            secret, key, name
        ):
            vendor = heuristic.vendor_of(secret, key, name, str(http.get("url", "")))
            line = line_of(header) or line_of(template)
            found.append(CredentialUse("http header", "http", secret, key, name, vendor, line))
    # A pod spec patch changes the pods of templates that run one (not steps, DAGs, suspends).
    for source in (template.get("podSpecPatch"), workflow.spec.get("podSpecPatch")):
        for secret, key, env in _pod_spec_patch(source) if running else ():
            add("podSpecPatch", "main", secret, key, env, template)
    return found
