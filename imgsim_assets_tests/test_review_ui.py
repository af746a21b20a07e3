"""Cleaning up duplicates from the web page, in a real browser (Debian's Chromium via Playwright),
over the sample corpus ingested with a tiny encoder: review a group, keep and set aside, "not
duplicates", reload (the decisions persist), apply (the files move and, after an ingest, no
longer come back from a search), undo (they are back, and after an ingest come back again).
Screenshots go to test-artifacts/review-*.png; the API's own refusals are checked alongside."""

import json
import re
import time
import urllib.request

import pytest

from imgsim_assets.ingest import ingest
from imgsim_assets_tests.serving import get, running_server, sample_collection
from imgsim_assets_tests.test_ui import ARTIFACTS, CHROMIUM, _browser_or_skip


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    _browser_or_skip()
    with sample_collection(tmp_path_factory.mktemp("review_ui")) as (settings, defs, instance):
        with running_server(settings) as (base, app):
            yield base, settings, defs, instance


def post(url: str, body, content_type="application/json", origin: str | None = None):
    headers = {"Content-Type": content_type}
    if origin:
        headers["Origin"] = origin
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _reingest(base, settings, defs, instance):
    """Ingest what changed, then wait until the service serves the new index."""
    before = get(f"{base}/healthz")[1]["index_version"]
    report = ingest(defs, instance, settings.images_dir, log=lambda m: None)
    assert report.ok, report.failed
    deadline = time.monotonic() + 60
    while get(f"{base}/healthz")[1]["index_version"] == before:
        assert time.monotonic() < deadline, "the service did not load the new index"
        time.sleep(0.2)


def _neighbours(base, image_id, k=200):
    status, answer, _ = get(f"{base}/search?image_id={image_id}&k={k}")
    assert status == 200, answer
    return {h["image_id"] for h in answer["hits"]}


def test_writes_are_json_from_this_origin_only(served):
    base = served[0]
    assert post(f"{base}/duplicates/decisions", {"decisions": {"1": "keep"}}, "text/plain")[0] == 415
    status, answer = post(f"{base}/duplicates/decisions", {"decisions": {"1": "keep"}}, origin="http://evil.example")
    assert status == 403 and "own page" in answer["detail"]
    assert post(f"{base}/duplicates/decisions", {"decisions": {"1": "delete"}})[0] == 400
    assert post(f"{base}/duplicates/separate", {"image_ids": [1]})[0] == 400
    assert post(f"{base}/duplicates/undo", {"apply_id": "nope"})[0] == 404
    status, export, headers = get(f"{base}/duplicates/export?format=xml")
    assert status == 422


def test_review_keep_set_aside_not_duplicates_apply_and_undo(served):
    sync_playwright = _browser_or_skip()
    from playwright.sync_api import expect

    base, settings, defs, instance = served
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30_000)
        expect.set_options(timeout=30_000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        # 1. Groups side by side, each member with its metadata and one suggested keeper.
        page.goto(f"{base}/#duplicates")
        groups = page.locator("#duplicates article.group")
        expect(groups.first).to_be_visible()
        total = int(get(f"{base}/duplicates")[1]["total_groups"])
        assert total >= 2
        first = groups.first
        expect(first.locator("li.member.suggested-keep")).to_have_count(1)
        expect(first.locator("li.member .member-meta").first).to_contain_text("×")  # width × height
        keeper = first.locator("li.member.suggested-keep").get_attribute("data-image-id")
        other = first.locator("li.member[data-suggested=set_aside]").first
        aside_id = other.get_attribute("data-image-id")
        page.screenshot(path=str(ARTIFACTS / "review-groups.png"), full_page=True)

        # Why is a copy in the group? Each member but the keeper compares itself with it.
        expect(first.locator(f"li.member[data-image-id='{keeper}'] button.why-button")).to_have_count(0)
        other.locator("button.why-button").click()
        dialog = page.locator("#compare-dialog")
        expect(dialog).to_be_visible()
        for i in range(2):
            expect(dialog.locator("canvas.heatmap").nth(i)).to_have_attribute("data-cells", re.compile(r"^[1-9]\d*$"))
        paths = {str(m["image_id"]): m["path"] for g in get(f"{base}/duplicates?per_page=200")[1]["groups"]
                 for m in g["members"]}
        expect(dialog.locator("#compare-a figcaption")).to_contain_text(paths[keeper].rsplit("/", 1)[-1])
        expect(dialog.locator("#compare-b figcaption")).to_contain_text(paths[aside_id].rsplit("/", 1)[-1])
        expect(page.locator("#compare-summary")).to_contain_text("patches")
        page.screenshot(path=str(ARTIFACTS / "review-why.png"))
        page.keyboard.press("Escape")
        expect(dialog).to_be_hidden()

        # 2. Keep the keeper, set the other aside, say the last group on the page is not duplicates.
        first.locator(f"li.member[data-image-id='{keeper}'] button.decide-keep").click()
        expect(page.locator(f"#duplicates li.member[data-image-id='{keeper}']")).to_have_attribute("data-decision", "keep")
        page.locator(f"#duplicates li.member[data-image-id='{aside_id}'] button.decide-set_aside").click()
        expect(page.locator(f"#duplicates li.member[data-image-id='{aside_id}']")).to_have_attribute(
            "data-decision", "set_aside")
        last = groups.last
        separated = sorted(last.locator("li.member").evaluate_all("ms => ms.map(m => m.dataset.imageId)"))
        last.locator("button.not-duplicates").click()
        expect(page.locator("#duplicates-page")).to_contain_text(f"{total - 1} groups")

        # 3. Reload: the decisions are still there, the separated group stays gone.
        page.reload()
        expect(page.locator(f"#duplicates li.member[data-image-id='{aside_id}']")).to_have_attribute(
            "data-decision", "set_aside")
        expect(page.locator(f"#duplicates li.member[data-image-id='{keeper}'] .decided-by")).to_have_text("kept by local")
        expect(page.locator("#duplicates-page")).to_contain_text(f"{total - 1} groups")
        shown = page.locator("#duplicates li.member").evaluate_all("ms => ms.map(m => m.dataset.imageId)")
        assert not set(separated) <= set(shown)
        expect(page.locator("#review-plan")).to_have_attribute("data-files", "1")
        page.screenshot(path=str(ARTIFACTS / "review-decided.png"), full_page=True)

        # 4. Apply: the set-aside file moves under set-aside/<date>/; after an ingest, searches
        # no longer return it.
        path = next(m["path"] for g in get(f"{base}/duplicates?per_page=200")[1]["groups"]
                    for m in g["members"] if str(m["image_id"]) == aside_id)
        assert aside_id in {str(i) for i in _neighbours(base, keeper)}
        page.locator("#review-apply").click()
        expect(page.locator("#review-status")).to_contain_text("Moved 1 files")
        moved = list((settings.data_dir / "set-aside").glob(f"*/{path}"))
        assert len(moved) == 1 and not (settings.images_dir / path).exists()
        _reingest(base, settings, defs, instance)
        assert int(aside_id) not in _neighbours(base, keeper)
        status, _, _ = get(f"{base}/images/{aside_id}")
        assert status == 404

        # 5. Undo: the file is back, and after an ingest searches find it again.
        page.reload()
        page.locator("#review-undo").click()
        expect(page.locator("#review-status")).to_contain_text("Put back 1 files")
        assert (settings.images_dir / path).exists() and not list((settings.data_dir / "set-aside").rglob("*.*"))
        _reingest(base, settings, defs, instance)
        assert int(aside_id) in _neighbours(base, keeper)
        page.screenshot(path=str(ARTIFACTS / "review-undone.png"), full_page=True)

        # The export lists every group with its members and decisions.
        status, export, _ = get(f"{base}/duplicates/export?format=json")
        kept = [m for g in export["groups"] for m in g["members"] if str(m["image_id"]) == keeper]
        assert all(m["decision"] == "keep" for m in kept)
        browser.close()
        assert not errors, f"the page raised: {errors}"
