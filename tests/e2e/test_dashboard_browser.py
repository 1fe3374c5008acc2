"""The dashboard in a real browser: headless Chromium (a process of its own, driven through
chromedriver: an end-to-end test) against the proxy app in front of localstripe (served from a
thread of the test), spent through by the official Stripe SDK. Sign in, find the run, check its
numbers and the chart's points against the admin API, see the charts fill the page's width and
each call keep to one line at 1280 px, filter the calls, revoke the run from the page, see the
API refuse the key, and sign out from an error page. Screenshots land in build/screenshots/;
with KEYBRAKE_UPDATE_DOCS=1 the run page's becomes the README's docs/dashboard-run.png."""

from __future__ import annotations

import os
import shutil
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import stripe

from tests.browser import ROOT, chromium, screenshot
from tests.proxyproc import ADMIN_KEY, Localstripe
from tests.served import serve_proxy

LABEL = "argo/billing-agent-7xk2p"
# Caller tags as Argo's fan-out steps send them: the item, then the pod's name.
PODS = [
    f"item-{n}@billing-agent-7xk2p-charge-{pod}" for n, pod in enumerate((2731468123, 90127, 55))
]


def _spend(proxy_url: str, vault_key: str, pods: list[str], calls: int) -> list[str]:
    """`calls` PaymentIntents of $1.00, round-robin over the pods' caller tags; the outcomes."""
    outcomes = []
    for i in range(calls):
        tag = pods[i % len(pods)]
        client = stripe.StripeClient(
            f"{vault_key}.{tag}",
            base_addresses={"api": proxy_url + "/stripe"},
            max_network_retries=0,
        )
        try:
            client.v1.payment_intents.create(
                params={
                    "amount": 100,
                    "currency": "usd",
                    # Distinct bodies: identical ones within the dedupe window are one call.
                    "metadata": {"run": LABEL, "n": str(i)},
                }
            )
            outcomes.append("ok")
        except stripe.RateLimitError as exc:
            assert exc.headers is not None and exc.headers.get("x-keybrake-cap-hit") == "true"
            outcomes.append("cap_hit")
    return outcomes


def _px(element: Any, prop: str) -> float:
    return float(element.value_of_css_property(prop).removesuffix("px"))


def content_width(element: Any) -> float:
    """The width an element's children get: its own less its padding."""
    return (
        float(element.rect["width"]) - _px(element, "padding-left") - _px(element, "padding-right")
    )


def navigate(driver: Any, element: Any, arrives: str) -> None:
    """Click, then wait until the next page is there: the old page gone and the element with id
    `arrives` present (a click returns before the browser has loaded what it leads to)."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    def gone(_driver: Any) -> bool:
        try:
            element.is_enabled()
        except StaleElementReferenceException:
            return True
        except WebDriverException as exc:
            # Asked while the old document is being replaced, chromedriver may say this
            # instead of "stale element": the element is just as gone.
            if "does not belong to the document" in str(exc):
                return True
            raise
        return False

    element.click()
    wait = WebDriverWait(driver, 30, poll_frequency=0.05)
    wait.until(gone)
    wait.until(expected_conditions.presence_of_element_located((By.ID, arrives)))


@pytest.mark.slow
def test_sign_in_find_check_and_revoke_a_run_in_chromium(
    tmp_path: Path, localstripe: Localstripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    # A live run's page reloads itself every 10 s (tests/test_dashboard.py checks it): here that
    # would replace the page under the test's feet, and the element it holds with it.
    monkeypatch.setattr("keybrake.proxy.ui.dashboard.REFRESH_SECONDS", 3600)
    proxy = serve_proxy(tmp_path, stripe_base=localstripe.url)
    try:
        with proxy.admin() as admin:
            budget = admin.post(
                "/vault/budgets",
                json={"agent_run_label": LABEL, "total_usd_cap": "5.00", "expires_in": "2h"},
            ).json()
            key = proxy.issue(
                agent_run_label=LABEL,
                budget_id=budget["budget_id"],
                daily_usd_cap=None,
                max_usd_per_caller="2.00",
                expires_in="1h",
            )
            other = proxy.issue(agent_run_label="argo/nightly-report-q9", daily_usd_cap=10)
        outcomes = _spend(proxy.url, key["vault_key"], PODS, 8)
        # $1 calls: the first two pods reach their $2 each, the $5 budget stops the run.
        assert outcomes.count("ok") == 5 and outcomes.count("cap_hit") == 3
        _spend(proxy.url, other["vault_key"], ["pod-z"], 1)

        with chromium() as driver:
            driver.get(proxy.url + "/ui/")
            assert "/ui/login" in driver.current_url  # nothing shows before signing in
            driver.find_element(By.ID, "token").send_keys(ADMIN_KEY)
            navigate(driver, driver.find_element(By.ID, "sign-in"), "runs")
            assert driver.current_url.rstrip("/").endswith("/ui")
            assert driver.find_element(By.ID, "who").text == "admin"
            labels = [
                r.get_attribute("data-label")
                for r in driver.find_elements(By.CSS_SELECTOR, "tr.run")
            ]
            assert set(labels) == {LABEL, "argo/nightly-report-q9"}
            screenshot(driver, "runs")

            # Find the run by a part of its name.
            driver.find_element(By.ID, "filter-q").send_keys("billing")
            navigate(driver, driver.find_element(By.ID, "filter"), "runs")
            rows = driver.find_elements(By.CSS_SELECTOR, "tr.run")
            assert [r.get_attribute("data-label") for r in rows] == [LABEL]
            assert rows[0].get_attribute("data-status") == "live"
            navigate(driver, rows[0].find_element(By.TAG_NAME, "a"), "run-label")

            # Its numbers are the API's numbers.
            with proxy.admin() as admin:
                api_key = admin.get(f"/vault/keys/{key['key_id']}").json()
                api_budget = admin.get(f"/vault/budgets/{budget['budget_id']}").json()
                audit = admin.get("/vault/audit", params={"label": LABEL, "limit": 1000}).json()
            assert driver.find_element(By.ID, "run-label").text.startswith(LABEL)
            spent = (
                Decimal(driver.find_element(By.ID, "spent").get_attribute("data-micros")) / 10**6
            )
            assert spent == Decimal(api_key["total_spent_usd"]) == Decimal("5.00")
            cap = Decimal(driver.find_element(By.ID, "cap").get_attribute("data-micros")) / 10**6
            assert cap == Decimal(api_budget["total_usd_cap"])
            assert int(driver.find_element(By.ID, "calls").text) == api_key["calls"]
            assert int(driver.find_element(By.ID, "cap-hits").text) == api_key["cap_hits"] == 3

            # The chart's points: the audit rows' spend, summed per second, cumulative.
            per_second: dict[str, Decimal] = defaultdict(Decimal)
            for row in audit["data"]:
                per_second[row["ts"][:19] + "Z"] += Decimal(row["settled_usd"])
            expected, total = [], Decimal(0)
            for second in sorted(per_second):
                total += per_second[second]
                expected.append((second, total))
            points = driver.find_elements(By.CSS_SELECTOR, "#spend-chart circle.point")
            shown = [
                (p.get_attribute("data-at"), Decimal(p.get_attribute("data-usd"))) for p in points
            ]
            assert shown == expected and shown[-1][1] == Decimal("5.00")
            assert driver.find_element(By.ID, "cap-line").get_attribute("data-usd") == "$5.00"
            hit_points = driver.find_elements(By.CSS_SELECTOR, "#hits-chart circle.point")
            assert sum(int(p.get_attribute("data-count")) for p in hit_points) == 3

            # Spend per pod, from the caller tags.
            callers = {
                r.get_attribute("data-caller"): r.find_elements(By.TAG_NAME, "td")[2].text
                for r in driver.find_elements(By.CSS_SELECTOR, "tr.caller")
            }
            assert callers == {PODS[0]: "$2.00", PODS[1]: "$2.00", PODS[2]: "$1.00"}
            calls = driver.find_elements(By.CSS_SELECTOR, "#audit tr.call")
            assert len(calls) == len(audit["data"]) == 8
            page = driver.page_source
            assert key["vault_key"] not in page and ADMIN_KEY not in page
            run_url = driver.current_url

            # At 1280 x 800 the charts fill the page's width with their labels inside, and
            # each call keeps to one line.
            driver.set_window_size(1280, 800)
            width = content_width(driver.find_element(By.TAG_NAME, "main"))
            for chart in driver.find_elements(By.CSS_SELECTOR, "svg.chart"):
                box = chart.rect
                assert abs(box["width"] - width) < 1, (chart.get_attribute("id"), box, width)
                for text in chart.find_elements(By.TAG_NAME, "text"):
                    inside = text.rect
                    assert box["x"] <= inside["x"], (text.text, inside, box)
                    assert inside["x"] + inside["width"] <= box["x"] + box["width"], text.text
            table = driver.find_element(By.ID, "audit")
            assert table.rect["width"] <= width + 0.5  # no sideways scrolling either
            cell = table.find_element(By.CSS_SELECTOR, "tr.call td")
            one_line = sum(
                _px(cell, prop)
                for prop in ("line-height", "padding-top", "padding-bottom", "border-bottom-width")
            )
            for row in table.find_elements(By.CSS_SELECTOR, "tr.call"):
                assert row.rect["height"] <= one_line + 0.5, (row.text, row.rect, one_line)
            driver.set_window_size(1280, 1700)

            # The calls filtered by decision, then by caller from the spend-per-pod table.
            Select(driver.find_element(By.ID, "filter-decision")).select_by_value("caller_cap_hit")
            navigate(driver, driver.find_element(By.ID, "filter-calls"), "all-calls")
            rows = driver.find_elements(By.CSS_SELECTOR, "#audit tr.call")
            assert {r.get_attribute("data-decision") for r in rows} == {"caller_cap_hit"}
            assert {r.get_attribute("data-caller-tag") for r in rows} == set(PODS[:2])
            link = driver.find_element(By.CSS_SELECTOR, f'tr.caller[data-caller="{PODS[2]}"] a')
            navigate(driver, link, "all-calls")
            rows = driver.find_elements(By.CSS_SELECTOR, "#audit tr.call")
            assert [r.get_attribute("data-decision") for r in rows] == [
                "budget_cap_hit",
                "forwarded",
            ]
            assert {r.get_attribute("data-caller-tag") for r in rows} == {PODS[2]}
            navigate(driver, driver.find_element(By.ID, "all-calls"), "revoke")
            assert len(driver.find_elements(By.CSS_SELECTOR, "#audit tr.call")) == 8

            # The run's page as it is served (reloading every 10 s), for the README.
            monkeypatch.undo()
            driver.get(run_url)
            run_png = screenshot(driver, "run")
            if os.environ.get("KEYBRAKE_UPDATE_DOCS"):
                shutil.copyfile(run_png, ROOT / "docs" / "dashboard-run.png")

            # The kill switch: a confirmation, then the run's keys are revoked everywhere.
            navigate(driver, driver.find_element(By.ID, "revoke"), "confirm-revoke")
            assert driver.find_element(By.ID, "live-keys").text == "1"
            assert driver.find_element(By.ID, "live-budgets").text == "1"
            screenshot(driver, "revoke")
            navigate(driver, driver.find_element(By.ID, "confirm-revoke"), "revoked-notice")
            notice = driver.find_element(By.ID, "revoked-notice").text
            assert "Revoked: 2 of this run's keys and budgets are revoked now." in notice
            assert driver.find_element(By.ID, "run-status").text == "revoked"
            assert driver.find_elements(By.ID, "revoke") == []

            client = stripe.StripeClient(
                key["vault_key"],
                base_addresses={"api": proxy.url + "/stripe"},
                max_network_retries=0,
            )
            with pytest.raises(stripe.AuthenticationError):
                client.v1.payment_intents.create(params={"amount": 100, "currency": "usd"})
            with proxy.admin() as admin:
                assert admin.get(f"/vault/keys/{key['key_id']}").json()["status"] == "revoked"
                assert admin.get(f"/vault/keys/{other['key_id']}").json()["status"] == "active"
                events = admin.get("/vault/events", params={"action": "label.revoke"}).json()
            assert events["data"][0]["detail"]["via"] == "dashboard"
            assert events["data"][0]["detail"]["revoked_keys"] == [key["key_id"]]

            # Signing out, from an error page too, ends the session: the same browser is asked
            # to sign in again.
            driver.get(proxy.url + "/ui/run?label=argo/none")
            assert driver.find_element(By.ID, "error").text.startswith("No run with that label")
            navigate(driver, driver.find_element(By.ID, "sign-out"), "token")
            driver.get(proxy.url + "/ui/")
            assert "/ui/login" in driver.current_url
    finally:
        proxy.stop()
