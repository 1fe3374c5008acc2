"""`keybrake wrap`'s output runs: the "before" billing workflow (every pod holding the Stripe
key, retried Always, with its own exit handler), wrapped, run in the Argo simulator, its pods as
processes, against the proxy app (served from a thread of the test) in front of localstripe. Its
pod is a stock Stripe-SDK script plus exactly the one line wrap reported. The run's spend stays
within --budget-usd and each item within --max-usd-per-pod, the workflow's own exit handler runs
before the revoke, and the key ends revoked. The output also passes Argo's schema and CRD in
strict mode and the semantic checks. The pods being processes is the point: an end-to-end test.
The checks of wrap's output alone are tests/hera/test_wrap_runs.py."""

from __future__ import annotations

import hashlib
import io
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from argocheck.schema import all_errors
from argocheck.semantics import Catalog, problems
from argocheck.simulator import Simulator
from ruamel.yaml import YAML

from keybrake.adopt.wrap import CODE_CHANGES, WrapOptions, wrap_text
from tests.fakes.kubernetes import FakeCluster
from tests.helpers import localstripe_intents
from tests.proxyproc import Localstripe
from tests.served import ServedProxy, serve_proxy

pytestmark = pytest.mark.slow

PODS = Path(__file__).resolve().parents[2] / "adopt" / "pods"
IMAGE = "registry.example.com/billing-agent:1.4.2"
NOTIFY = "curlimages/curl:8.8.0"

BEFORE = """\
# The billing agent as it ran before keybrake.
apiVersion: argoproj.io/v1alpha1
kind: Workflow
metadata:
  generateName: billing-agent-
spec:
  entrypoint: main
  onExit: notify
  templates:
  - name: main
    dag:
      tasks:
      - name: charge
        template: charge-batch
        arguments:
          parameters:
          - name: customer_ids
            value: "{{item}}"
        withItems:
        - "cus_001,cus_002,cus_003"
        - "cus_004,cus_005"
        - "cus_006,cus_007"
        - "cus_008"
  - name: charge-batch
    inputs:
      parameters:
      - name: customer_ids
    retryStrategy:
      limit: "3"
      retryPolicy: Always
    container:
      image: registry.example.com/billing-agent:1.4.2
      args: ["{{inputs.parameters.customer_ids}}"]
      env:
      - name: STRIPE_SECRET_KEY
        valueFrom:
          secretKeyRef:
            name: stripe-credentials
            key: secret_key
  - name: notify   # tells the team the run ended
    container:
      image: curlimages/curl:8.8.0
      args: ["{{workflow.status}}"]
"""


@pytest.fixture
def proxy(tmp_path: Path, localstripe: Localstripe, cluster: FakeCluster) -> Iterator[ServedProxy]:
    server = serve_proxy(
        tmp_path / "proxy",
        stripe_base=localstripe.url,
        extra_env=cluster.proxy_login_settings(tmp_path / "proxy"),
    )
    response = httpx.post(
        server.url + "/vault/issuers",
        headers={"Authorization": f"Bearer {server.admin_key}"},
        json={
            "name": "argo-workflows",
            "label_prefix": "argo/",
            "max_total_usd_cap": 1000,
            "kubernetes": {"namespaces": ["argo"], "service_accounts": ["keybrake-issuer"]},
        },
    )
    assert response.status_code == 201, response.text
    yield server
    server.stop()


def load(text: str) -> dict[str, Any]:
    document: dict[str, Any] = YAML(typ="safe").load(io.StringIO(text))
    return document


def test_the_wrapped_before_workflow_runs_capped_and_revoked(
    proxy: ServedProxy,
    cluster: FakeCluster,
    catalog: list[dict[str, Any]],
    localstripe: Localstripe,
    tmp_path: Path,
) -> None:
    options = WrapOptions(
        budget_usd=Decimal("5"), max_usd_per_pod=Decimal("2"), proxy_url=proxy.url
    )
    wrapped = wrap_text(BEFORE, options)
    assert wrapped.vendors == ["stripe"]
    # Exactly the change the pod script carries, and no other.
    assert f"stripe pods: code change {CODE_CHANGES['stripe']}" in wrapped.notes
    assert 'stripe.api_base = os.environ["STRIPE_BASE_URL"]' in (PODS / "charge.py").read_text()

    document = load(wrapped.text)
    document["metadata"]["name"] = "billing-agent-x7k2p"
    assert all_errors(document) == []
    assert problems(document, Catalog(catalog)) == []

    sim = Simulator(
        catalog,
        workdir=tmp_path / "run",
        cluster=cluster,
        entrypoints={
            IMAGE: [sys.executable, str(PODS / "charge.py")],
            NOTIFY: [sys.executable, str(PODS / "notify.py")],
        },
        name="billing-agent-x7k2p",
    )
    run = sim.run(document)

    # 8 customers at $1.00 against $5: the run fails where the cap stops it.
    assert run.phase == "Failed"
    key_id = run.outputs["keybrake_stripe_key_id"]
    key = httpx.get(
        f"{proxy.url}/vault/keys/{key_id}",
        headers={"Authorization": f"Bearer {proxy.admin_key}"},
    ).json()
    assert key["status"] == "revoked"
    assert Decimal(key["total_spent_usd"]) <= Decimal("5.00")
    assert key["cap_hits"] >= 1
    charged = localstripe_intents(localstripe.url, run="wrapped")
    assert 0 < len(charged) <= 5  # what the vendor saw: never past the budget

    # Each pod's calls are tagged with its item (and pod): an item never spent past $2.
    rows = httpx.get(
        f"{proxy.url}/vault/audit",
        headers={"Authorization": f"Bearer {proxy.admin_key}"},
        params={"key_id": key_id, "limit": 1000},
    ).json()["data"]
    spent_by_item: dict[str, Decimal] = {}
    for row in rows:
        item = row["caller_tag"].split("@")[0]
        spent_by_item[item] = spent_by_item.get(item, Decimal(0)) + Decimal(row["settled_usd"])
    items = ["cus_001,cus_002,cus_003", "cus_004,cus_005", "cus_006,cus_007", "cus_008"]
    hashes = {hashlib.sha256(i.encode()).hexdigest()[:12] for i in items}
    assert set(spent_by_item) <= hashes
    assert max(spent_by_item.values()) <= Decimal("2.00")

    # Refused pods were not retried (OnError: system errors only); the pods never saw the
    # Stripe secret, only the vault key.
    assert all(len(node.attempts) == 1 for node in _pods(run.entry))
    pods = run.pods_of("charge-batch")
    assert all(pod.env["STRIPE_SECRET_KEY"].startswith("kbv_") for pod in pods)

    # The workflow's own exit handler ran, then the revoke, whatever its outcome.
    order = [pod.template for pod in run.pods]
    assert order.index("notify") < order.index("revoke")
    assert "notified: run ended Failed" in run.pods_of("notify")[0].stdout


def _pods(node: Any) -> list[Any]:
    found = [node] if node.attempts else []
    for child in node.children:
        found += _pods(child)
    return found
