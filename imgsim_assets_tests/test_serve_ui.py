"""`imgsim serve`'s web page in a real browser: the sample corpus ingested with a tiny encoder,
the app on loopback, Debian's Chromium driven by Playwright. Searching by a chosen file, by a
clicked hit, within a batch, with photo filters, an upload the API refuses, a region dragged on
the query, why two images match, and the duplicates, clusters and quality views, each checked on
what the page displays; screenshots go to test-artifacts/serve-*.png."""

import json
import re
from urllib.parse import parse_qs, urlparse

import pytest

from imgsim_assets_tests.serving import COLLAGE_FILL, COLLAGE_PHOTO, collage, get, running_server, sample_collection
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


PICTURE_RECT = """img => {
  const r = img.getBoundingClientRect(), s = Math.min(r.width / img.naturalWidth, r.height / img.naturalHeight);
  return {left: r.left + (r.width - img.naturalWidth * s) / 2, top: r.top + (r.height - img.naturalHeight * s) / 2,
          scale: s};
}"""
# The pasted photograph, or one of its edited copies (a box dragged to the nearest screen pixel
# may land a pixel or two off the pasted edges; then the half-size copy can tie with it).
PHOTO_FAMILY = re.compile(r"^batch-000[12]/astronaut(_[a-z]+)?\.(png|jpg)$")


# Per heatmap: where its picture lies on the canvas (object-fit: contain), the bounding box
# of the painted pixels, and the share of that box that is painted; in CSS pixels.
PAINTED = """cs => cs.map(c => {
  const img = c.previousElementSibling, r = img.getBoundingClientRect();
  const s = Math.min(r.width / img.naturalWidth, r.height / img.naturalHeight);
  const picture = {left: (r.width - img.naturalWidth * s) / 2, top: (r.height - img.naturalHeight * s) / 2,
                   width: img.naturalWidth * s};
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data, k = c.width / r.width;
  let x0 = Infinity, y0 = Infinity, x1 = -1, y1 = -1, n = 0;
  for (let y = 0; y < c.height; y++) for (let x = 0; x < c.width; x++) {
    if (d[(y * c.width + x) * 4 + 3] === 0) continue;
    n++; x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + 1); y1 = Math.max(y1, y + 1);
  }
  return {picture, painted: [x0 / k, y0 / k, x1 / k, y1 / k], share: n / ((x1 - x0) * (y1 - y0))};
})"""


def _boxes_sent(requests) -> list:
    return [parse_qs(urlparse(url).query).get("box", [None])[0] for url in requests]


def test_region_search_by_dragging_a_box_and_why_two_images_match(served, page, tmp_path):
    from playwright.sync_api import expect

    base, settings = served
    data, box = collage(settings.images_dir)
    query = tmp_path / "collage.png"
    query.write_bytes(data)
    hits = page.locator("#results li.hit")
    searches = []
    page.on("request", lambda r: searches.append(r.url) if r.method == "POST" and "/search" in r.url else None)

    # 1. The whole collage: the picture it is tiled with comes first, not the pasted photograph.
    page.goto(f"{base}/")
    page.set_input_files("#file-input", str(query))
    expect(hits).to_have_count(10)
    expect(hits.first.locator(".path")).to_have_text(COLLAGE_FILL)
    expect(page.locator("#clear-box")).to_be_hidden()
    page.wait_for_function("() => document.getElementById('query-preview').naturalWidth === 1024")

    # 2. A box dragged with the mouse around the pasted photograph: released, it searches with the box.
    rect = page.locator("#query-preview").evaluate(PICTURE_RECT)
    x0, y0, x1, y1 = (rect["left"] + box[0] * rect["scale"], rect["top"] + box[1] * rect["scale"],
                      rect["left"] + box[2] * rect["scale"], rect["top"] + box[3] * rect["scale"])
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move((x0 + x1) / 2, (y0 + y1) / 2, steps=4)
    page.mouse.move(x1, y1, steps=4)
    page.mouse.up()
    expect(hits.first.locator(".path")).to_have_text(PHOTO_FAMILY)
    expect(hits).to_have_count(10)
    sent = [float(v) for v in _boxes_sent(searches)[-1].split(",")]
    assert sent == pytest.approx(list(box), abs=2 / rect["scale"]), sent  # within a screen pixel or two
    expect(page.locator("#query-box")).to_be_visible()
    expect(page.locator("#clear-box")).to_be_visible()
    expect(page.locator("#region-hint")).to_contain_text("boxed region")
    expect(page.locator("#error")).to_be_hidden()
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / "serve-region.png"))

    # 3. "Clear box": the whole collage again, and no box sent.
    page.locator("#clear-box").click()
    expect(hits.first.locator(".path")).to_have_text(COLLAGE_FILL)
    expect(page.locator("#query-box")).to_be_hidden()
    assert _boxes_sent(searches)[-1] is None

    # 4. The same box drawn with a finger (pointer events of type touch).
    page.locator("#query-stage").evaluate("""(stage, p) => {
      const at = (type, x, y) => stage.dispatchEvent(new PointerEvent(type, {pointerId: 7, pointerType: 'touch',
        isPrimary: true, clientX: x, clientY: y, bubbles: true, cancelable: true, button: 0, buttons: 1}));
      at('pointerdown', p.x0, p.y0); at('pointermove', (p.x0 + p.x1) / 2, p.y1); at('pointermove', p.x1, p.y1);
      at('pointerup', p.x1, p.y1);
    }""", {"x0": x0, "y0": y0, "x1": x1, "y1": y1})
    expect(hits.first.locator(".path")).to_have_text(PHOTO_FAMILY)
    assert _boxes_sent(searches)[-1] is not None

    # 5. Why do these match: search by the photograph itself, then "Why?" on its half-size copy.
    hits.filter(has=page.locator(".path", has_text=COLLAGE_PHOTO)).first.locator("button.hit-button").click()
    expect(hits.first.locator(".path")).to_have_text(COLLAGE_PHOTO)
    copy = hits.filter(has=page.locator(".path", has_text="batch-0002/astronaut_small.jpg"))
    expect(copy).to_have_count(1)
    expect(hits.first.locator("button.why-button")).to_have_count(0)  # not the query with itself
    expect(hits.locator("button.why-button")).to_have_count(9)
    copy_of = {"a": hits.first.get_attribute("data-image-id"), "b": copy.get_attribute("data-image-id")}
    _wait_until_loaded(page, "#results li.hit img")
    page.screenshot(path=str(ARTIFACTS / "serve-why.png"))
    copy.locator("button.why-button").click()
    dialog = page.locator("#compare-dialog")
    expect(dialog).to_be_visible()
    canvases = dialog.locator("canvas.heatmap")
    for i in range(2):
        expect(canvases.nth(i)).to_have_attribute("data-cells", "64")  # 8×8 patches of 14 px at 112 px
    _wait_until_loaded(page, "#compare-dialog img.compare-image")
    # Each heatmap is painted exactly over the part of its picture the model saw (the crop the
    # API reports), wherever the picture lies in its letterboxed frame.
    painted = canvases.evaluate_all(PAINTED)
    status, pair, _ = get(f"{base}/compare?a={copy_of['a']}&b={copy_of['b']}")
    assert status == 200
    for side, found in zip((pair["a"], pair["b"]), painted):
        scale = found["picture"]["width"] / side["width"]
        expected = (found["picture"]["left"] + side["crop"]["x0"] * scale, found["picture"]["top"] + side["crop"]["y0"] * scale,
                    found["picture"]["left"] + side["crop"]["x1"] * scale, found["picture"]["top"] + side["crop"]["y1"] * scale)
        assert found["painted"] == pytest.approx(expected, abs=2), (found, expected)
        assert found["share"] > 0.95  # every cell of the crop painted
    expect(dialog.locator("#compare-a figcaption")).to_contain_text(COLLAGE_PHOTO)
    expect(dialog.locator("#compare-b figcaption")).to_contain_text("astronaut_small.jpg")
    expect(page.locator("#compare-summary")).to_contain_text("8×8 patches")
    low, high = (float(page.locator(f"#legend-{end}").inner_text()) for end in ("low", "high"))
    assert low < high <= 1.0
    canvases.first.hover()  # a cell pointed at, and its match outlined in the other image
    page.screenshot(path=str(ARTIFACTS / "serve-compare.png"))
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()

    # 6. A box on an indexed image's preview (a thumbnail) is sent in its original's pixels.
    by_id = []
    page.on("request", lambda r: by_id.append(r.url) if r.method == "GET" and "/search?" in r.url else None)
    rect = page.locator("#query-preview").evaluate(PICTURE_RECT)
    quarter = 256 * rect["scale"] * 256 / 512  # the thumbnail is 256 px of the 512-px original
    page.mouse.move(rect["left"] + 1, rect["top"] + 1)
    page.mouse.down()
    page.mouse.move(rect["left"] + quarter, rect["top"] + quarter, steps=4)
    page.mouse.up()
    expect(page.locator("#clear-box")).to_be_visible()
    expect(hits).to_have_count(10)
    page.wait_for_function("() => document.getElementById('results').getAttribute('aria-busy') === 'false'")
    sent = [float(v) for v in _boxes_sent(by_id)[-1].split(",")]
    assert sent == pytest.approx([0, 0, 256, 256], abs=4), sent
    expect(page.locator("#error")).to_be_hidden()

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
