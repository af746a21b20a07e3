"""The Dagster UI in a real browser: `dagster dev` on loopback, Debian's Chromium driven by
Playwright, one partition materialized from the asset page. CI installs Chromium (.ci/run)
and sets IMGSIM_REQUIRE_BROWSER=1, so there a missing browser fails instead of skipping."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance

from imgsim_assets.core.sample_data import write_synthetic_batch
from imgsim_assets.instance import ensure_instance_yaml
from imgsim_assets_tests.servers import free_port, unavailable

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("IMGSIM_TEST_ARTIFACTS", REPO / "test-artifacts"))


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not CHROMIUM.exists():
        unavailable("needs the playwright package and Debian's chromium (apt-get install chromium)",
                    "IMGSIM_REQUIRE_BROWSER")
    return sync_playwright


def _wait_for(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {seconds:.0f} s")


def _is_launch_mutation(response) -> bool:
    request = response.request
    return request.method == "POST" and "graphql" in response.url and "mutation Launch" in (request.post_data or "")


@pytest.fixture
def dagster_dev(tmp_path):
    data, home = tmp_path / "data", tmp_path / "data" / "dagster_home"
    write_synthetic_batch(data / "images" / "batch-a", 4, seed=1)
    ensure_instance_yaml(home)
    # The first-visit newsletter prompt opens a second after any page loads and covers the
    # buttons; Dagster skips it once the instance records it as seen.
    (home / ".nux").mkdir()
    (home / ".nux" / "nux.yaml").write_text("seen: 1\n")
    with DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("image_batches", ["batch-a"])
    port = free_port()
    env = {**os.environ, "IMGSIM_DATA_DIR": str(data), "DAGSTER_HOME": str(home), "IMGSIM_WEIGHTS": "random",
           "IMGSIM_DEVICE": "cpu"}
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster"), "dev", "-h", "127.0.0.1", "-p", str(port), "-w", "workspace.yaml"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        _wait_for(f"http://127.0.0.1:{port}/server_info", 180)
        yield f"http://127.0.0.1:{port}", home
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def test_materialize_a_partition_from_the_ui(dagster_dev):
    sync_playwright = _browser_or_skip()
    base, home = dagster_dev
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        try:
            page.goto(f"{base}/locations/imgsim/asset-groups/ingest", wait_until="networkidle")
            for name in ("raw_images", "cropped_tensors", "image_embeddings"):  # the asset graph
                page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "ui-asset-graph.png"))

            page.goto(f"{base}/assets/raw_images", wait_until="networkidle")
            page.get_by_role("button", name="Materialize…").click()
            confirm = page.get_by_role("button", name="Confirm")  # raw_images comes with cropped_tensors
            confirm.wait_for(timeout=30_000)
            confirm.click()
            dialog = page.locator(".bp5-dialog").last
            dialog.get_by_role("button", name="All", exact=True).click()
            # Wait for the launch mutation to be answered: navigating away earlier cancels it.
            with page.expect_response(_is_launch_mutation, timeout=120_000) as launched:
                dialog.get_by_role("button", name="Launch 1 run").click()
            answer = launched.value.text()
            assert launched.value.ok and "Success" in answer, f"launching the run failed: {answer[:500]}"
            page.screenshot(path=str(ARTIFACTS / "ui-launched.png"))

            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                page.goto(f"{base}/runs", wait_until="networkidle")
                if page.get_by_text("Success", exact=True).count() or page.get_by_text("Failure", exact=True).count():
                    break
                page.wait_for_timeout(3000)
            page.screenshot(path=str(ARTIFACTS / "ui-run.png"))
            assert page.get_by_text("Success", exact=True).count(), "the run launched from the UI did not succeed"
        finally:
            browser.close()
    with DagsterInstance.from_config(str(home)) as instance:
        record = instance.get_latest_materialization_event(AssetKey("raw_images"))
        assert record is not None and record.dagster_event.partition == "batch-a"
