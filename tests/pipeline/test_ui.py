"""The real Dagster UI in headless Chromium: the asset graph renders, and a materialisation launched from the
asset page runs to success and shows its metadata. Screenshots land in data/screenshots/.

Needs Debian's Chromium at /usr/bin/chromium (`scripts/install-browser.sh`) and the `playwright` package. It is
skipped when either is missing, except under CI (`CI=true`), where a missing browser fails the test.
"""

from __future__ import annotations

import re
import time

import pytest
from support.ui import CHROMIUM, CHROMIUM_ARGS, REPO, DagsterUI, dagster_webserver, in_ci

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]

SCREENSHOTS = REPO / "data" / "screenshots"
CATALOG = ("base_models", "training_datasets", "eval_questions")
# Fast (seconds: reads the mirror) and free of checks.
TARGET = "training_datasets"
ERROR_BANNER = re.compile(r"failed to load|error loading", re.IGNORECASE)
UI_TIMEOUT_MS = 60_000


def _require(condition: bool, why: str) -> None:
    if condition:
        return
    if in_ci():
        pytest.fail(f"{why} (CI=true: run scripts/install-browser.sh and install the dev extras)")
    pytest.skip(why)


@pytest.fixture(scope="module")
def playwright_api():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _require(False, "the `playwright` package is not installed")
    _require(CHROMIUM.exists(), f"{CHROMIUM} is missing")
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def ui(tmp_path_factory, mirror, playwright_api) -> DagsterUI:
    with dagster_webserver(tmp_path_factory.mktemp("dagster_ui"), mirror) as server:
        yield server


@pytest.fixture
def page(playwright_api, ui):
    browser = playwright_api.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
    try:
        context = browser.new_context(viewport={"width": 1600, "height": 1000})
        pg = context.new_page()
        pg.set_default_timeout(UI_TIMEOUT_MS)
        yield pg
    finally:
        browser.close()


def _body_text(page) -> str:
    return page.locator("body").inner_text()


def _no_error_banner(page, where: str) -> None:
    found = ERROR_BANNER.search(_body_text(page))
    assert found is None, f"{where}: the UI shows a load error ({found.group(0)!r})"


def test_ui_graph_and_materialize_from_page(ui: DagsterUI, page) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        _drive(ui, page)
    except BaseException:
        page.screenshot(path=str(SCREENSHOTS / "failure.png"), full_page=True, animations="disabled")
        print(f"--- dagster-webserver log tail ---\n{ui.log_tail(80)}")
        raise


def _drive(ui: DagsterUI, page) -> None:
    # The code location loads without an error, with every catalog asset.
    location = ui.wait_for_location(timeout=120)
    loaded = location["locationOrLoadError"]
    assert loaded["__typename"] == "RepositoryLocation", f"code location error: {loaded}"
    keys = {"/".join(n["assetKey"]["path"]) for r in loaded["repositories"] for n in r["assetNodes"]}
    assert set(CATALOG) <= keys, keys
    # The "join the community" dialog would cover the page on a fresh instance: mark it seen.
    assert ui.graphql("mutation { setNuxSeen }")["setNuxSeen"] is True

    # 1. The asset graph of the catalog group renders its nodes.
    page.goto(f"{ui.url}/locations/{location['name']}/asset-groups/catalog")
    # The graph opens around its middle at a readable zoom and draws only the nodes in view: zoomed out, every
    # catalog node is in view by name; zoomed back in, nodes show their status.
    zoom = {way: page.locator(f"button:has([aria-label='zoom_{way}'])") for way in ("out", "in")}
    for _ in range(12):
        zoom["out"].click()
    for name in CATALOG:
        page.get_by_text(name, exact=True).first.wait_for(state="visible")
    for _ in range(12):
        zoom["in"].click()
    page.get_by_text("Never materialized").first.wait_for(state="visible")  # node status loaded
    _no_error_banner(page, "asset graph")
    page.screenshot(path=str(SCREENSHOTS / "asset_graph.png"), animations="disabled")

    # 2. Launch a materialisation from the asset page.
    before = {r["runId"] for r in ui.runs()}
    page.goto(f"{ui.url}/assets/{TARGET}")
    page.get_by_text("Never materialized").first.wait_for(state="visible")
    _no_error_banner(page, "asset page")
    page.locator("button", has_text=re.compile(r"^\s*Materialize\s*$")).first.click()
    run_id = _wait_new_run(ui, before, timeout=60)

    # 3. The run succeeds (API), and its page says so.
    status = ui.wait_for_run(run_id, timeout=300)
    assert status == "SUCCESS", f"run {run_id} ended {status}: {ui.run_errors(run_id)}"
    page.goto(f"{ui.url}/runs/{run_id}")
    page.get_by_text("Success", exact=True).first.wait_for(state="visible")
    page.get_by_text("RUN_SUCCESS", exact=True).first.wait_for(state="visible")
    page.screenshot(path=str(SCREENSHOTS / "run_success.png"), animations="disabled")

    # 4. The asset page shows the materialisation and its metadata, matching the results database.
    from em_assets.results.store import Store

    expected = Store(ui.env["EM_DB"]).query(
        "SELECT dataset, n_examples FROM training_datasets ORDER BY dataset"
    )
    assert expected.height > 0
    page.goto(f"{ui.url}/assets/{TARGET}")
    page.get_by_text("Row count").first.wait_for(state="visible")
    page.get_by_text(f"{int(expected['n_examples'].sum()):,}", exact=True).first.wait_for(state="visible")
    assert page.get_by_text("Never materialized").count() == 0
    page.get_by_text("datasets", exact=True).first.wait_for(state="visible")
    page.screenshot(path=str(SCREENSHOTS / "materialized.png"), animations="disabled")
    # The datasets' metadata table renders as a table on the page, a row per dataset.
    for dataset in expected["dataset"].to_list():
        page.get_by_role("cell", name=dataset, exact=True).first.wait_for(state="visible")
    page.screenshot(path=str(SCREENSHOTS / "materialized_metadata.png"), animations="disabled")


def _wait_new_run(ui: DagsterUI, before: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = [r for r in ui.runs() if r["runId"] not in before]
        if new:
            assert len(new) == 1, new
            assert new[0]["assetSelection"] == [{"path": [TARGET]}], new[0]
            return new[0]["runId"]
        time.sleep(0.5)
    raise TimeoutError(f"no run launched within {timeout}s of clicking Materialize")
