"""The promise to whoever promotes, through the UI a person clicks: in MLflow's own web UI, in a
real browser (the distribution's Chromium driven by Playwright), move `champion` to a new version
of an adapter and see live traffic follow within 5 s; then see on that version's page its serving
status, where it is loaded and its shadow summary (tags the gateway writes), and its shadow
metrics on its run. Works on `clinical`; puts its champion back after.

Set LORAPLEX_UI_SCREENSHOTS=docs/images to refresh the screenshots docs/mlflow-ui.md shows."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import httpx
import pytest

from e2e_tests.fault_stack import MLFLOW_API
from tests.support.waiting import wait_until

CHROMIUM = "/usr/bin/chromium"
# No sandbox: CI runs as root, where Chromium's sandbox cannot start. The rest keeps a headless
# Chromium from reaching out to the network or updating itself.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
ADAPTER = "clinical"
PROMOTION_DEADLINE_S = 5.0
UI_TIMEOUT_MS = 60_000  # MLflow's pages load slowly on a busy 2-core machine
SHADOW_METRICS = ("shadow_pairs", "shadow_token_agreement", "shadow_exact_match_rate")
STATUS_DEADLINE_S = 10.0  # the stack writes serving status every 0.5 s
STATUS_TAG_VALUES = {
    "loraplex.status": "serving",
    "loraplex.status.resident": re.compile(r"shard-\d+:(device|host|disk)"),
    "loraplex.status.shadow": re.compile(r"\d+ pairs vs champion: \d+% same text, token agreement [01]\.\d\d"),
}

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install '.[dev]')")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (Debian package `chromium`; .ci/run installs it)", allow_module_level=True)


def served_version(fs, client: httpx.Client) -> str:
    reply = fs.complete(client, ADAPTER)
    assert reply.status_code == 200, reply.text
    return reply.headers["x-loraplex-version"]


def run_metrics(fs, run_id: str) -> dict[str, float]:
    reply = httpx.get(f"{fs.mlflow_url}{MLFLOW_API}/runs/get", params={"run_id": run_id}, timeout=10)
    reply.raise_for_status()
    return {m["key"]: m["value"] for m in reply.json()["run"]["data"].get("metrics", [])}


def version_tags(fs, version: str) -> dict[str, str]:
    reply = httpx.get(f"{fs.mlflow_url}{MLFLOW_API}/model-versions/get", params={"name": ADAPTER, "version": version}, timeout=10)
    reply.raise_for_status()
    return {t["key"]: t.get("value", "") for t in reply.json()["model_version"].get("tags") or []}


def test_moving_champion_in_the_mlflow_ui_moves_traffic_and_the_version_shows_its_serving_status_and_shadow_metrics(fault_stack, tmp_path):
    fs = fault_stack
    champion = fs.alias_version(ADAPTER, "champion")
    candidate = fs.publish_variant(ADAPTER, "ui-candidate", lora_alpha_factor=3.0)
    candidate_run = fs.registry().resolve(ADAPTER, candidate).run_id
    screenshots = Path(os.environ.get("LORAPLEX_UI_SCREENSHOTS") or tmp_path)
    screenshots.mkdir(parents=True, exist_ok=True)
    try:
        # The candidate first runs as shadow, so its comparison with the champion reaches MLflow.
        fs.set_alias(ADAPTER, "shadow", candidate)
        assert wait_until(lambda: fs.reload_routing()["adapters"][ADAPTER]["shadow"] == candidate, 10)
        with fs.http() as client:
            # Shadow copies beyond the shadow pool are shed, so send until ten pairs are logged.
            for i in range(40):
                reply = fs.complete(client, ADAPTER, max_tokens=6, prompt=f"{fs.running.demo_prompt} ({i})")
                assert reply.status_code == 200 and reply.headers["x-loraplex-version"] == champion, reply.text
                if run_metrics(fs, candidate_run).get("shadow_pairs", 0) >= 10:
                    break
            metrics = wait_until(lambda: (m := run_metrics(fs, candidate_run)).get("shadow_pairs", 0) >= 10 and m, 30, 0.5)
        assert metrics, "no shadow aggregate reached the candidate's run"
        fs.delete_alias(ADAPTER, "shadow")

        with playwright_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(UI_TIMEOUT_MS)
                page.goto(f"{fs.mlflow_url}/#/models/{ADAPTER}")
                row = page.get_by_role("row").filter(has=page.get_by_role("link", name=f"Version {candidate}", exact=True))
                row.get_by_role("button", name="Add").click()  # the row's Aliases cell
                dialog = page.get_by_role("dialog")
                aliases = dialog.get_by_role("combobox")
                aliases.fill("champion")
                aliases.press("Enter")
                with fs.http() as client:
                    dialog.get_by_role("button", name="Save aliases").click()
                    clicked = time.monotonic()
                    followed = wait_until(lambda: served_version(fs, client) == candidate, PROMOTION_DEADLINE_S, 0.1)
                    elapsed = time.monotonic() - clicked
                assert followed, f"traffic not on version {candidate} {elapsed:.1f} s after the click"
                assert elapsed <= PROMOTION_DEADLINE_S
                playwright_api.expect(dialog).to_be_hidden(timeout=UI_TIMEOUT_MS)
                assert fs.alias_version(ADAPTER, "champion") == candidate

                # The version now serves: the gateway says so on it (its status, where it is
                # loaded, its shadow summary), seen first through the REST API, then on its page.
                tags = wait_until(
                    lambda: (t := version_tags(fs, candidate)).get("loraplex.status") == "serving" and "loraplex.status.shadow" in t and t,
                    STATUS_DEADLINE_S, 0.2,
                )
                assert tags, f"no serving status on version {candidate}: {version_tags(fs, candidate)}"
                page.get_by_role("link", name=f"Version {candidate}", exact=True).click()
                playwright_api.expect(page.get_by_text("@ champion").first).to_be_visible(timeout=UI_TIMEOUT_MS)
                # Residency may change while the page loads (another shard loads it): its shape is checked.
                for key, value in STATUS_TAG_VALUES.items():
                    row = page.get_by_role("row").filter(has=page.get_by_role("cell", name=key, exact=True))
                    playwright_api.expect(row).to_contain_text(value, timeout=UI_TIMEOUT_MS)
                assistant = page.get_by_role("button", name="Close")  # MLflow's chat side panel
                if assistant.count() == 1:
                    assistant.click()
                # The tags table scrolls inside a few rows' height: scroll it, as a person would,
                # until the status rows (one prefix, so side by side) are in view.
                status_cell = page.get_by_role("cell", name="loraplex.status", exact=True)
                first_cell = page.get_by_role("row").nth(1).get_by_role("cell").first
                first_cell.hover()
                page.mouse.wheel(0, status_cell.bounding_box()["y"] - first_cell.bounding_box()["y"])
                playwright_api.expect(status_cell).to_be_in_viewport(timeout=UI_TIMEOUT_MS)
                page.wait_for_timeout(300)  # the scroll settles before the picture
                page.screenshot(path=str(screenshots / "mlflow-version-page.png"))
                page.get_by_role("link", name=f"publish-{ADAPTER}").first.click()  # Source Run
                page.get_by_role("tab", name="Overview").click()  # the link opens the run's artifacts
                metrics_heading = page.get_by_role("heading", name=re.compile(r"^Metrics \(\d+\)"))
                playwright_api.expect(metrics_heading).to_be_visible(timeout=UI_TIMEOUT_MS)
                for name in SHADOW_METRICS:
                    playwright_api.expect(page.get_by_role("cell", name=name, exact=True)).to_be_visible(timeout=UI_TIMEOUT_MS)
                page.get_by_role("cell", name="shadow_token_agreement", exact=True).scroll_into_view_if_needed()
                page.screenshot(path=str(screenshots / "mlflow-version-run-shadow-metrics.png"))
            finally:
                browser.close()
    finally:
        fs.set_alias(ADAPTER, "champion", champion)
        if fs.alias_version(ADAPTER, "shadow") is not None:
            fs.delete_alias(ADAPTER, "shadow")
    assert (screenshots / "mlflow-version-page.png").stat().st_size > 10_000
    assert (screenshots / "mlflow-version-run-shadow-metrics.png").stat().st_size > 10_000
