"""The typed admin client: the one way the CLI and the Hera steps' tests talk to a proxy.

    client = KeybrakeClient("http://127.0.0.1:8080", api_key)
    issued = client.issue_key(KeyCreate(vendor="stripe", daily_usd_cap=300, ...))

Errors: `ProxyUnreachable` when nothing answers at the URL, `ApiError` when the proxy refuses.
"""

from __future__ import annotations

import ssl
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from keybrake.proxy.errors import ApiError, ProxyUnreachable
from keybrake.proxy.models import (
    AlertInfo,
    AlertList,
    AuditPage,
    BudgetCreate,
    BudgetInfo,
    BudgetList,
    CapsPatch,
    EventPage,
    IssuedIssuer,
    IssuedKey,
    IssuerCreate,
    IssuerInfo,
    IssuerList,
    KeyCreate,
    KeyInfo,
    KeyList,
    PruneResult,
    RevokeResult,
)

__all__ = ["DEFAULT_URL", "KeybrakeClient"]

DEFAULT_URL = "http://127.0.0.1:8080"

M = TypeVar("M", bound=BaseModel)


class KeybrakeClient:
    def __init__(
        self,
        url: str = DEFAULT_URL,
        api_key: str = "",
        *,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        ca_bundle: str | None = None,
    ) -> None:
        """`ca_bundle`: a PEM file of the CA(s) an https proxy's certificate is checked against
        (default: the system's)."""
        self.url = url.rstrip("/")
        verify: ssl.SSLContext | bool = True
        if ca_bundle:
            verify = ssl.create_default_context(cafile=ca_bundle)
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
            transport=transport,
            verify=verify,
        )

    def __enter__(self) -> KeybrakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ProxyUnreachable(self.url, str(exc) or type(exc).__name__) from exc
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                raise ApiError(response.status_code, str(error["type"]), str(error["message"]))
            except (ValueError, KeyError, TypeError):
                raise ApiError(
                    response.status_code,
                    "http_error",
                    response.text[:200] or response.reason_phrase,
                ) from None
        return response

    def _answer(self, model: type[M], method: str, path: str, **kwargs: Any) -> M:
        """The proxy's answer to one request, as `model`."""
        response = self._request(method, path, **kwargs)
        try:
            return model.model_validate(response.json())
        except ValueError as exc:  # not JSON, or not this model (pydantic's error is one too)
            raise ApiError(
                response.status_code,
                "unexpected_answer",
                f"{self.url} did not answer as a keybrake proxy ({type(exc).__name__})",
            ) from None

    def _page(self, model: type[M], path: str, cursor: str | None, **filters: object) -> M:
        """One page of the listing at `path`, filtered by `filters` (those None are not sent),
        from `cursor`: the token the page before ended with, sent as `continue` (a Python keyword,
        so it cannot be passed as a filter)."""
        params = _params(**filters)
        if cursor is not None:
            params["continue"] = cursor
        return self._answer(model, "GET", path, params=params)

    def health(self) -> dict[str, Any]:
        return dict(self._request("GET", "/readyz").json())

    def issue_key(self, spec: KeyCreate) -> IssuedKey:
        return self._answer(IssuedKey, "POST", "/vault/keys", json=_body(spec))

    def keys_page(
        self,
        *,
        label: str | None = None,
        vendor: str | None = None,
        status: str | None = None,
        budget_id: str | None = None,
        namespace: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> KeyList:
        """A page of keys, newest first; its `continue_` is the next page's `cursor`."""
        return self._page(
            KeyList,
            "/vault/keys",
            cursor,
            label=label,
            vendor=vendor,
            status=status,
            budget_id=budget_id,
            namespace=namespace,
            limit=limit,
        )

    def get_key(self, key_id: str) -> KeyInfo:
        return self._answer(KeyInfo, "GET", f"/vault/keys/{key_id}")

    def revoke_key(self, key_id: str) -> KeyInfo:
        return self._answer(KeyInfo, "DELETE", f"/vault/keys/{key_id}")

    def patch_key(self, key_id: str, patch: CapsPatch) -> KeyInfo:
        return self._answer(KeyInfo, "PATCH", f"/vault/keys/{key_id}", json=_body(patch))

    def create_budget(self, spec: BudgetCreate) -> BudgetInfo:
        return self._answer(BudgetInfo, "POST", "/vault/budgets", json=_body(spec))

    def budgets_page(
        self,
        *,
        label: str | None = None,
        status: str | None = None,
        namespace: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> BudgetList:
        return self._page(
            BudgetList,
            "/vault/budgets",
            cursor,
            label=label,
            status=status,
            namespace=namespace,
            limit=limit,
        )

    def get_budget(self, budget_id: str) -> BudgetInfo:
        return self._answer(BudgetInfo, "GET", f"/vault/budgets/{budget_id}")

    def revoke_budget(self, budget_id: str) -> BudgetInfo:
        return self._answer(BudgetInfo, "DELETE", f"/vault/budgets/{budget_id}")

    def patch_budget(self, budget_id: str, patch: CapsPatch) -> BudgetInfo:
        return self._answer(BudgetInfo, "PATCH", f"/vault/budgets/{budget_id}", json=_body(patch))

    def revoke_label(
        self,
        label: str,
        *,
        namespace: str | None = None,
        workflow_uid: str | None = None,
        cluster: str | None = None,
        reason: str | None = None,
    ) -> RevokeResult:
        """`revoked` in the answer counts what this call changed (0: already revoked)."""
        body = {
            "agent_run_label": label,
            "namespace": namespace,
            "workflow_uid": workflow_uid,
            "cluster": cluster,
            "reason": reason,
        }
        return self._answer(
            RevokeResult,
            "POST",
            "/vault/keys/revoke",
            json={k: v for k, v in body.items() if v is not None},
        )

    def create_issuer(self, spec: IssuerCreate) -> IssuedIssuer:
        return self._answer(IssuedIssuer, "POST", "/vault/issuers", json=_body(spec))

    def list_issuers(self, *, include_deleted: bool = False) -> list[IssuerInfo]:
        params = {"all": "true"} if include_deleted else {}
        return self._answer(IssuerList, "GET", "/vault/issuers", params=params).data

    def get_issuer(self, issuer_id: str) -> IssuerInfo:
        return self._answer(IssuerInfo, "GET", f"/vault/issuers/{issuer_id}")

    def delete_issuer(self, issuer_id: str, *, revoke: bool = False) -> dict[str, Any]:
        params = {"revoke": "true" if revoke else "false"}
        return dict(self._request("DELETE", f"/vault/issuers/{issuer_id}", params=params).json())

    def alerts(self, *, pending: bool = False, limit: int = 100) -> list[AlertInfo]:
        """The threshold alerts' outbox, newest first (admin token)."""
        params = {"limit": str(limit), "pending": "true" if pending else "false"}
        return self._answer(AlertList, "GET", "/vault/alerts", params=params).data

    def events_page(
        self,
        *,
        action: str | None = None,
        issuer_id: str | None = None,
        target: str | None = None,
        refused: bool | None = None,
        since: str | None = None,
        after_id: int | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> EventPage:
        return self._page(
            EventPage,
            "/vault/events",
            cursor,
            action=action,
            issuer_id=issuer_id,
            target=target,
            refused=None if refused is None else str(refused).lower(),
            since=since,
            after_id=after_id,
            limit=limit,
        )

    def audit_page(
        self,
        *,
        key_id: str | None = None,
        label: str | None = None,
        vendor: str | None = None,
        since: str | None = None,
        after_id: int | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> AuditPage:
        """Audit rows, newest first (`after_id`: only newer ones, for following)."""
        return self._page(
            AuditPage,
            "/vault/audit",
            cursor,
            key_id=key_id,
            label=label,
            vendor=vendor,
            since=since,
            after_id=after_id,
            limit=limit,
        )

    def audit_csv(
        self,
        *,
        key_id: str | None = None,
        label: str | None = None,
        vendor: str | None = None,
        since: str | None = None,
        limit: int = 100,
    ) -> str:
        params = _params(key_id=key_id, label=label, vendor=vendor, since=since)
        params.update(limit=str(limit), format="csv")
        return self._request("GET", "/vault/audit", params=params).text

    def prune_audit(self, before: str, *, dry_run: bool = False) -> PruneResult:
        """Delete (or with `dry_run` count) audit rows older than `before` (90d, or ISO time)."""
        return self._answer(
            PruneResult, "POST", "/vault/audit/prune", json={"before": before, "dry_run": dry_run}
        )

    def pricing(self) -> dict[str, Any]:
        return dict(self._request("GET", "/vault/pricing").json())


def _params(**values: object) -> dict[str, str]:
    return {k: str(v) for k, v in values.items() if v is not None}


def _body(spec: BaseModel) -> dict[str, Any]:
    """A request model as the JSON the proxy takes: fields left unset are left out."""
    return spec.model_dump(mode="json", exclude_none=True)
