"""`imgsim serve`'s web page in a real browser: the sample corpus ingested with a tiny encoder,
the app on loopback, Debian's Chromium driven by Playwright. Searching by a chosen file, by a
clicked hit, within a batch, with photo filters, an upload the API refuses, and the duplicates,
clusters and quality views, each checked on what the page displays; screenshots go to test-artifacts/serve-*.png."""

import json
import re

import pytest

from imgsim_assets_tests.serving import get, running_server, sample_collection
from imgsim_assets_tests.test_ui import ARTIFACTS, CHROMIUM, _browser_or_skip

# Of the sample's re-encoded queries, this one finds its original photograph first with the
# 2-block random-weight encoder by the widest margin (inner product 0.9999 against 0.9980 for
# checkerboard_small.jpg; the weights are seeded, so the order is the same on every run). For
# most of the others the "_small" copy in batch-0002 and the original tie to four decimals.
QUERY = "checkerboard_reencoded.jpg"
ORIGINAL = "batch-0001/checkerboard.png"

ALL_LOADED = """sel => {
  const imgs = [...document.querySelectorAll(sel)];
  return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
}"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The sample collection served over HTTP: ``(base_url, settings)``."""
    _browser_or_skip()  # before the 30-s ingest, not after it
    with sample_collection(tmp_path_factory.mktemp("serve_ui")) as (settings, _defs, _instance):
        with running_server(settings) as (base, _app):
            yield base, settings


@pytest.fixture
def page(served):
    sync_playwright = _browser_or_skip()
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(30_000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            yield page
        finally:
            browser.close()
        assert not errors, f"the page raised: {errors}"


def _wait_until_loaded(page, selector: str) -> None:
    """Scroll every image of ``selector`` into view (they load lazily, some inside horizontally
    scrolled strips) and wait until all have decoded with a non-zero natural width."""
    images = page.locator(selector)
    for i in range(images.count()):
        images.nth(i).scroll_into_view_if_needed()
    page.wait_for_function(ALL_LOADED, arg=selector)
    page.evaluate("document.querySelectorAll('.strip').forEach(s => { s.scrollLeft = 0; }); window.scrollTo(0, 0)")


def _assert_fits_width(page) -> None:
    """No sideways scrolling: long rows scroll inside their cards, the page keeps its width."""
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"the page is {overflow} px wider than the window"


def test_search_page(served, page):
    from playwright.sync_api import expect

    base, settings = served
    status, health, _ = get(f"{base}/healthz")
    assert status == 200 and health["random_weights"] is True
    queries = settings.data_dir / "queries"
    hits = page.locator("#results li.hit")

    # 1. The header shows the index size /healthz reports, and the random-weights warning.
    page.goto(f"{base}/")
    expect(page.locator("#index-size")).to_have_text(str(health["num_vectors"]))
    expect(page.locator("#random-weights")).to_be_visible()
    expect(page.locator("#encoder")).to_contain_text("weights " + health["weights_fingerprint"])
    expect(page.locator("#random-weights")).to_contain_text("Random weights")
    expect(page.locator("#batch-filter input[name=batch]")).to_have_count(2)

    # 2. Choosing a re-encoded photograph: a grid of hits, its original first.
    page.set_input_files("#file-input", str(queries / QUERY))
    expect(hits).to_have_count(10)
    expect(hits.first.locator(".path")).to_have_text(ORIGINAL)
    expect(hits.first.locator(".batch")).to_have_text("batch-0001")
    expect(page.locator("#took")).to_contain_text("10 results")
    expect(page.locator("#query-figure")).to_be_visible()
    expect(page.locator("#query-caption")).to_contain_text(QUERY)
    expect(page.locator("#error")).to_be_hidden()
    _wait_until_loaded(page, "#results li.hit img")
    _assert_fits_width(page)
    page.screenshot(path=str(ARTIFACTS / "serve-search.png"), full_page=True)

    # 3. Clicking a hit searches by that image: it comes back first.
    second = hits.nth(1)
    clicked_id, clicked_path = second.get_attribute("data-image-id"), second.locator(".path").inner_text()
    assert clicked_path != ORIGINAL
    second.locator("button").click()
    expect(page.locator("#query-caption")).to_contain_text(clicked_path)
    expect(hits.first).to_have_attribute("data-image-id", clicked_id)
    expect(hits.first.locator(".path")).to_have_text(clicked_path)
    expect(hits).to_have_count(10)

    # 4. Ticking batch-0002 leaves only batch-0002 hits (the first search mixed both batches).
    page.locator("#batch-filter input[name=batch][value=batch-0002]").check()
    expect(hits.locator(".batch").filter(has_not_text="batch-0002")).to_have_count(0)
    expect(hits).to_have_count(10)
    assert set(hits.locator(".batch").all_inner_texts()) == {"batch-0002"}
    page.screenshot(path=str(ARTIFACTS / "serve-search-batch.png"), full_page=True)
    page.locator("#batch-filter input[name=batch][value=batch-0002]").uncheck()
    expect(hits.locator(".batch").filter(has_text="batch-0001")).not_to_have_count(0)

    # 5. A text file named .jpg: the API's refusal shows in #error, and the page still searches.
    page.set_input_files("#file-input", files=[{"name": "notes.jpg", "mimeType": "image/jpeg",
                                                 "buffer": b"these are notes, not a photograph\n"}])
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("not_an_image")
    expect(error).to_contain_text("422")
    expect(hits).to_have_count(0)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / "serve-error.png"))
    page.set_input_files("#file-input", str(queries / QUERY))
    expect(hits).to_have_count(10)
    expect(hits.first.locator(".path")).to_have_text(ORIGINAL)
    expect(error).to_be_hidden()


def test_photo_filters_narrow_the_results(served, page):
    from PIL import Image
    from playwright.sync_api import expect

    base, settings = served
    hits = page.locator("#results li.hit")
    page.goto(f"{base}/")
    page.set_input_files("#file-input", str(settings.data_dir / "queries" / QUERY))
    expect(hits).to_have_count(10)
    expect(hits.first.locator(".path")).to_have_text(ORIGINAL)
    unfiltered = hits.locator(".path").all_inner_texts()
    assert any(not p.endswith("_crop.jpg") for p in unfiltered)

    # A camera (the sample's crops say a Canon took them), entered: only crops, still ten.
    page.fill("#camera", "canon")
    page.press("#camera", "Enter")
    expect(hits.locator(".path").filter(has_not_text="_crop.jpg")).to_have_count(0)
    expect(hits).to_have_count(10)
    assert hits.locator(".path").all_inner_texts() != unfiltered
    _wait_until_loaded(page, "#results li.hit img")
    page.screenshot(path=str(ARTIFACTS / "serve-search-camera.png"), full_page=True)

    # And dates: crop i was taken at noon on day i + 1 of month i mod 12 + 1 of 2019, so 3 to 15
    # March (through the 15th: the whole day) holds camera (i = 2) and immunohistochemistry (14).
    page.fill("#taken-from", "2019-03-03")
    page.fill("#taken-to", "2019-03-15")
    march = ["batch-0002/camera_crop.jpg", "batch-0002/immunohistochemistry_crop.jpg"]
    expect(hits).to_have_count(2)
    assert sorted(hits.locator(".path").all_inner_texts()) == march
    page.screenshot(path=str(ARTIFACTS / "serve-search-dates.png"), full_page=True)

    # And a size neither reaches: nothing passes, and the page says why.
    sizes = {p: Image.open(settings.images_dir / p).size for p in march}
    assert all(w * h < 250_000 for w, h in sizes.values()), sizes
    page.select_option("#min-pixels", "250000")
    expect(hits).to_have_count(0)
    expect(page.locator("#results-empty")).to_have_text("No results pass the photo filter.")
    expect(page.locator("#error")).to_be_hidden()

    # Clear: the unfiltered answer again.
    page.locator("#clear-photo-filter").click()
    expect(hits).to_have_count(10)
    expect(hits.first.locator(".path")).to_have_text(ORIGINAL)
    assert hits.locator(".path").all_inner_texts() == unfiltered
    _assert_fits_width(page)


def test_duplicates_clusters_and_quality_pages(served, page):
    from playwright.sync_api import expect

    base, _settings = served

    # 6a. Near-duplicate groups, largest first, every thumbnail decoded.
    page.goto(f"{base}/#duplicates")
    expect(page.locator("#view-duplicates")).to_be_visible()
    expect(page.locator("#view-search")).to_be_hidden()
    expect(page.locator("#tab-duplicates")).to_have_attribute("aria-current", "page")
    groups = page.locator("#duplicates article.group")
    expect(groups.first).to_be_visible()
    sizes = [int(s) for s in groups.evaluate_all("gs => gs.map(g => g.dataset.size)")]
    assert len(sizes) >= 2 and sizes == sorted(sizes, reverse=True) and sizes[-1] >= 2, sizes
    for i in range(groups.count()):  # each group shows its members (up to what the page lists)
        assert groups.nth(i).locator("li.member").count() >= 2
    expect(page.locator("#duplicates-page")).to_contain_text(f"{len(sizes)} groups")
    _wait_until_loaded(page, "#duplicates article.group img")
    assert page.locator("#duplicates img").evaluate_all("is => is.every(i => i.naturalWidth > 0)")
    expect(page.locator("#error")).to_be_hidden()
    _assert_fits_width(page)
    page.screenshot(path=str(ARTIFACTS / "serve-duplicates.png"), full_page=True)

    # 6b. Clusters, with their sample thumbnails.
    page.goto(f"{base}/#clusters")
    expect(page.locator("#view-clusters")).to_be_visible()
    clusters = page.locator("#clusters article.cluster")
    expect(clusters.first).to_be_visible()
    sizes = [int(s) for s in clusters.evaluate_all("cs => cs.map(c => c.dataset.size)")]
    assert sizes == sorted(sizes, reverse=True) and sum(sizes) <= 92, sizes
    _wait_until_loaded(page, "#clusters article.cluster img")
    expect(page.locator("#error")).to_be_hidden()
    _assert_fits_width(page)
    page.screenshot(path=str(ARTIFACTS / "serve-clusters.png"), full_page=True)

    # 6c. The quality report (/evaluation): the table by edit family with `all` last and set
    # apart, the duplicate threshold, the grouping rules with the chosen one, RANDOM WEIGHTS.
    status, report, _ = get(f"{base}/evaluation")
    assert status == 200 and report["random_weights"] is True
    page.locator("#tab-quality").click()
    expect(page.locator("#view-quality")).to_be_visible()
    expect(page.locator("#tab-quality")).to_have_attribute("aria-current", "page")
    rows = page.locator("#quality table.families tbody tr")
    expect(rows).to_have_count(len(report["table"]))
    assert rows.evaluate_all("rs => rs.map(r => r.dataset.family)") == [r["family"] for r in report["table"]]
    expect(rows.first.locator("th")).to_have_text(report["table"][0]["family"])
    expect(rows.first.locator("td").first).to_have_text(str(report["table"][0]["copies"]))
    expect(rows.last).to_have_class(re.compile(r"\btotal\b"))
    assert rows.last.locator("th").evaluate("th => Number(getComputedStyle(th).fontWeight)") >= 700
    total = report["table"][-1]
    expect(page.locator("#quality-summary")).to_contain_text(
        f"{total['copies']} edited copies of {report['sources']} images")
    expect(page.locator("#quality-random")).to_be_visible()
    expect(page.locator("#quality-random")).to_contain_text("RANDOM WEIGHTS")
    expect(page.locator("#quality .threshold")).to_contain_text(f"{report['threshold']['value']:.3f}")
    reached = "reached" if report["threshold"]["reached"] else "not reached"
    expect(page.locator("#quality .threshold .facts")).to_contain_text(f"{report['target_precision']:.3f} {reached}")
    expect(page.locator("#quality tr.chosen")).to_have_attribute("data-rule", report["grouping"])
    expect(page.locator("#quality table.groupings tbody tr")).to_have_count(len(report["groupings"]))
    expect(page.locator("#error")).to_be_hidden()
    _assert_fits_width(page)
    page.screenshot(path=str(ARTIFACTS / "serve-quality.png"), full_page=True)

    # A narrow window: the table scrolls inside its box, the page keeps the window's width.
    page.set_viewport_size({"width": 400, "height": 900})
    _assert_fits_width(page)
    assert page.locator("#quality .table-scroll").first.evaluate("b => b.scrollWidth > b.clientWidth")
    page.screenshot(path=str(ARTIFACTS / "serve-quality-narrow.png"), full_page=True)

    # Not evaluated yet (the API's 404, stood in for): a note saying what to run, not an error.
    refusal = json.dumps({"error": "not_evaluated", "detail": "not evaluated yet: run `imgsim evaluate`"})
    page.route("**/evaluation", lambda route: route.fulfill(status=404, content_type="application/json", body=refusal))
    page.reload()
    expect(page.locator("#quality .not-evaluated")).to_contain_text("Not evaluated yet: run imgsim evaluate")
    expect(page.locator("#quality-random")).to_be_hidden()
    expect(page.locator("#quality table")).to_have_count(0)
    expect(page.locator("#error")).to_be_hidden()
