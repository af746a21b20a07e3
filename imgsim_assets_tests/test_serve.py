"""`imgsim serve` over HTTP: answers, bad input, limits, the token, micro-batching, hot reload,
the analysis and evaluation reports."""

import io
import json
import os
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image

from imgsim_assets.core.sample_data import SKIMAGE_NAMES, write_synthetic_batch
from imgsim_assets.core.search import ImageIndex
from imgsim_assets.core.storage import artifact_path, publish_dir
from imgsim_assets.ingest import ingest
from imgsim_assets.serve.app import ServeConfig, create_app
from imgsim_assets_tests.serving import COLLAGE_PHOTO, collage, get, post_image, running_server, sample_collection


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    with sample_collection(tmp_path_factory.mktemp("served")) as served:
        yield served


@pytest.fixture(scope="module")
def server(collection):
    settings, _, _ = collection
    with running_server(settings) as (base, app):
        yield base, app


def test_search_by_upload_by_id_and_within_batches(collection, server):
    settings, _, _ = collection
    base, _ = server
    status, health, _ = get(base + "/healthz")
    assert status == 200 and health["num_vectors"] == 92 and health["random_weights"] is True
    assert health["encoder"]["depth"] == 2 and health["index_version"].startswith("faiss_index.v-")
    assert health["weights_fingerprint"].startswith("random:seed=0:torch=")  # the index's weights, named
    assert health["query_encoder"]["weights_fingerprint"] == health["weights_fingerprint"]

    original = (settings.images_dir / "batch-0001" / "chelsea.png").read_bytes()
    status, answer, _ = post_image(base + "/search?k=5", original, "chelsea.png")
    assert status == 200, answer
    top = answer["hits"][0]
    assert (top["rank"], top["path"], top["batch"]) == (1, "batch-0001/chelsea.png", "batch-0001")
    assert top["inner_product"] == pytest.approx(1.0, abs=1e-4) and top["score"] == pytest.approx((1 + top["inner_product"]) / 2)
    assert answer["query"]["image_id"] == top["image_id"] and len(answer["hits"]) == 5
    assert answer["num_vectors"] == 92 and answer["took_ms"] > 0

    status, by_id, _ = get(f"{base}/search?image_id={top['image_id']}&k=92")
    assert status == 200 and by_id["hits"][0]["image_id"] == top["image_id"] and len(by_id["hits"]) == 92
    status, copies, _ = get(f"{base}/search?image_id={top['image_id']}&k=10&batch=batch-0002")
    assert status == 200 and {h["batch"] for h in copies["hits"]} == {"batch-0002"}
    assert {h["path"] for h in copies["hits"][:3]} == {"batch-0002/chelsea_crop.jpg", "batch-0002/chelsea_small.jpg",
                                                       "batch-0002/chelsea_flip.jpg"}
    status, batches, _ = get(base + "/batches")
    assert batches == {"batches": [{"name": "batch-0001", "num_images": 23}, {"name": "batch-0002", "num_images": 69}]}

    status, thumb, headers = get(f"{base}/images/{top['image_id']}?size=64")
    assert status == 200 and headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb)).size) == 64
    status, full, _ = get(f"{base}/images/{top['image_id']}")
    assert status == 200 and full == original

    status, spec, _ = get(base + "/openapi.json")
    assert status == 200 and {"get", "post"} <= set(spec["paths"]["/search"])
    assert "404" in spec["paths"]["/evaluation"]["get"]["responses"]
    assert {"408", "413", "421", "422"} <= set(spec["paths"]["/search"]["post"]["responses"])


def _paths(answer: dict) -> set[str]:
    return {h["path"] for h in answer["hits"]}


def test_photo_filters_by_capture_time_camera_and_size(collection, server):
    settings, _, _ = collection
    base, _ = server
    chelsea = post_image(base + "/search?k=1", (settings.images_dir / "batch-0001" / "chelsea.png").read_bytes())[1]
    chelsea_id = chelsea["hits"][0]["image_id"]
    search = f"{base}/search?image_id={chelsea_id}&k=92"

    # The sample's edited copies carry made-up EXIF: crops a Canon in 2019, half sizes a Nikon in
    # 2020, mirrors an iPhone in 2021; copy i on day i + 1 of month i mod 12 + 1, at noon.
    crops = {f"batch-0002/{name}_crop.jpg" for name in SKIMAGE_NAMES}
    status, canon, _ = get(search + "&camera=CANON")
    assert status == 200 and _paths(canon) == crops
    assert _paths(get(search + "&camera=canon%20eos%205d")[1]) == crops
    assert _paths(get(search + "&camera=apple%20iphone")[1]) == {f"batch-0002/{n}_flip.jpg" for n in SKIMAGE_NAMES}
    march = get(search + "&taken_after=2019-03-01&taken_before=2019-04-01")[1]
    assert _paths(march) == {"batch-0002/camera_crop.jpg", "batch-0002/immunohistochemistry_crop.jpg"}
    noon = get(search + "&taken_after=2020-01-01T12:00&taken_before=2020-01-01T12:00:01")[1]
    assert _paths(noon) == {"batch-0002/astronaut_small.jpg"}  # the bounds: from included, to excluded

    sizes = {}
    for path in settings.images_dir.glob("batch-*/*.*"):
        with Image.open(path) as im:
            sizes[f"{path.parent.name}/{path.name}"] = im.width * im.height
    big = get(search + "&min_pixels=250000")[1]
    assert _paths(big) == {p for p, n in sizes.items() if n >= 250_000} and 0 < len(big["hits"]) < 92
    originals = get(search + "&min_pixels=250000&batch=batch-0001")[1]
    assert _paths(originals) == {p for p, n in sizes.items() if n >= 250_000 and p.startswith("batch-0001/")}
    assert get(search + "&camera=canon&batch=batch-0001")[1]["hits"] == []  # the originals say nothing

    status, flips, _ = post_image(base + "/search?k=5&camera=iphone", (settings.data_dir / "queries" /
                                                                       "chelsea_reencoded.jpg").read_bytes())
    assert status == 200 and len(flips["hits"]) == 5 and all(p.endswith("_flip.jpg") for p in _paths(flips))
    for query, detail in (("&taken_after=June", "ISO 8601"), ("&min_pixels=-5", "between"),
                          ("&taken_after=2021-01-01&taken_before=2020-01-01", "earlier"),
                          ("&taken_before=2021-01-01T00:00%2B02:00", "offset")):
        status, body, _ = get(search + query)
        assert (status, body["error"]) == (422, "bad_parameter") and detail in body["detail"], query
    spec = get(base + "/openapi.json")[1]["paths"]["/search"]
    for method in ("get", "post"):
        assert {"taken_after", "taken_before", "camera", "min_pixels"} <= {p["name"] for p in spec[method]["parameters"]}

    cli = subprocess.run([sys.executable, "-m", "imgsim_assets.cli", "search", "--server", base, "--id", str(chelsea_id),
                          "-k", "92", "--camera", "canon", "--taken-before", "2019-04-01", "--json"],
                         env=os.environ, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert _paths(json.loads(cli.stdout)) == {f"batch-0002/{SKIMAGE_NAMES[i]}_crop.jpg" for i in (0, 1, 2, 12, 13, 14)}


def test_an_index_without_photo_metadata_refuses_photo_filters(collection, tmp_path):
    settings, _, _ = collection
    index = ImageIndex.load(artifact_path(settings.assets_dir, "faiss_index"))
    old = ImageIndex(index.index, index.catalog.select(["image_id", "batch", "path"]), index.info)
    assets = tmp_path / "assets"
    publish_dir(artifact_path(assets, "faiss_index"), old.save)  # as an index built before them was
    some_id = int(old.catalog["image_id"][0].as_py())
    with running_server(settings, assets_dir=assets) as (base, _):
        status, body, _ = get(f"{base}/search?image_id={some_id}&camera=canon")
        assert (status, body["error"]) == (400, "filter_unavailable") and "photo metadata" in body["detail"]
        assert get(f"{base}/search?image_id={some_id}&k=3&batch=batch-0002")[0] == 200


def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(collection, server, tmp_path):
    settings, _, _ = collection
    base, _ = server
    photo = (settings.images_dir / "batch-0001" / "astronaut.png").read_bytes()
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(photo)).convert("RGB").save(jpeg, format="JPEG")
    bomb = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(bomb, format="PNG")  # 400 Mpx in a few kB: told from the header
    assert len(bomb.getvalue()) < 200_000

    cases = [
        (post_image(base + "/search", b"<html>not a picture</html>", "page.jpg"), 422, "not_an_image"),
        (post_image(base + "/search", jpeg.getvalue()[: len(jpeg.getvalue()) // 2]), 422, "truncated"),
        (post_image(base + "/search", bomb.getvalue(), "bomb.png"), 422, "decompression_bomb"),
        (post_image(base + "/search", b""), 422, "empty_file"),
        (get(base + "/search?image_id=5"), 404, "unknown_image"),
        (get(base + "/search"), 400, "missing_parameter"),
        (get(base + "/search?image_id=abc"), 422, "bad_parameter"),
        (get(base + "/search?image_id=1&k=0"), 422, "bad_parameter"),
        (get(base + "/search?image_id=1&nprobe=-3"), 422, "bad_parameter"),
        (get(base + "/search?image_id=1&batch=nope"), 400, "unknown_batch"),
        (get(base + "/images/abc"), 400, "bad_parameter"),
        (get(base + "/images/5"), 404, "unknown_image"),
        (get(base + "/images/1?size=100000"), 422, "bad_parameter"),
    ]
    for (status, body, _), expected_status, error in cases:
        assert (status, body["error"]) == (expected_status, error), body
        assert body["detail"]
    assert get(base + "/images/..%2F..%2F..%2Fetc%2Fpasswd")[0] == 404  # no route takes a path
    assert get(base + "/../../etc/passwd")[0] == 404

    # A file of the index replaced by a link out of the images root is not served.
    status, answer, _ = post_image(base + "/search?k=1", photo)
    astronaut = answer["hits"][0]["image_id"]
    target = settings.images_dir / "batch-0001" / "astronaut.png"
    target.rename(tmp_path / "astronaut.png")
    target.symlink_to("/etc/passwd")
    try:
        status, body, _ = get(f"{base}/images/{astronaut}")
        assert status == 403 and body["error"] == "not_a_file"
    finally:
        target.unlink()
        (tmp_path / "astronaut.png").rename(target)
    assert get(base + "/healthz")[0] == 200 and post_image(base + "/search", photo)[0] == 200


def test_limits_answer_413_and_503(collection):
    settings, _, _ = collection
    photo = (settings.images_dir / "batch-0001" / "coffee.png").read_bytes()
    with running_server(settings, max_upload_bytes=10_000, max_queue=0) as (base, _):
        status, body, _ = post_image(base + "/search", photo)
        assert (status, body["error"]) == (413, "too_large") and "10000 bytes" in body["detail"]
        small = io.BytesIO()
        Image.open(io.BytesIO(photo)).convert("RGB").resize((64, 64)).save(small, format="JPEG")
        status, body, headers = post_image(base + "/search", small.getvalue())
        assert (status, body["error"]) == (503, "busy") and headers["retry-after"] == "1"
        assert get(base + "/healthz")[0] == 200


def test_a_token_guards_every_request_and_is_required_beyond_loopback(collection):
    settings, _, _ = collection
    with pytest.raises(ValueError, match="needs a token"):
        create_app(ServeConfig(settings.assets_dir, settings.images_dir, host="0.0.0.0"))
    with running_server(settings, token="s3cret") as (base, _):
        status, body, _ = get(base + "/healthz")
        assert (status, body["error"]) == (401, "unauthorized")
        assert get(base + "/healthz", token="wrong")[0] == 401
        assert get(base + "/healthz", token="s3cret")[0] == 200
        assert get(base + "/healthz?token=s3cret")[0] == 200
        assert get(base + "/evaluation")[0] == 401 and get(base + "/evaluation", token="s3cret")[0] == 200
        assert get(base + "/compare?a=1&b=2")[0] == 401 and get(base + "/compare?a=1&b=2", token="s3cret")[0] == 404
        assert get(base + "/")[0] == 200  # the page itself holds no data; it sends the token on
        env = {**os.environ, "IMGSIM_SERVE_TOKEN": "s3cret"}
        query = str(settings.images_dir / "batch-0001" / "chelsea.png")
        cli = subprocess.run([sys.executable, "-m", "imgsim_assets.cli", "search", "--server", base, query, "-k", "3",
                              "--json"], env=env, capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stderr
        answer = json.loads(cli.stdout)
        assert answer["backend"] == "server" and answer["hits"][0]["path"] == "batch-0001/chelsea.png"
        refused = subprocess.run([sys.executable, "-m", "imgsim_assets.cli", "search", "--server", base, query],
                                 env={k: v for k, v in env.items() if k != "IMGSIM_SERVE_TOKEN"},
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and "401 unauthorized" in refused.stderr


def _box(box) -> str:
    return ",".join(str(v) for v in box)


def test_region_search_finds_a_photograph_pasted_into_a_collage(collection, server):
    settings, _, _ = collection
    base, _ = server
    data, (x0, y0, x1, y1) = collage(settings.images_dir)

    status, whole, _ = post_image(base + "/search?k=92", data, "collage.png")
    assert status == 200 and whole["hits"][0]["path"] != COLLAGE_PHOTO and "box" not in whole["query"]
    unboxed = next(h for h in whole["hits"] if h["path"] == COLLAGE_PHOTO)
    assert unboxed["rank"] > 10

    status, boxed, _ = post_image(f"{base}/search?k=5&box={_box((x0, y0, x1, y1))}", data, "collage.png")
    assert status == 200, boxed
    top = boxed["hits"][0]
    assert top["path"] == COLLAGE_PHOTO and top["inner_product"] == pytest.approx(1.0, abs=1e-4)
    assert top["inner_product"] > unboxed["inner_product"] + 0.05
    assert boxed["query"]["box"] == [x0, y0, x1, y1] and (boxed["query"]["width"], boxed["query"]["height"]) == (1024, 1024)

    # A box past the picture's edges is cut there; the answer says what was used.
    status, past, _ = post_image(f"{base}/search?k=1&box={_box((x0, -50, x1 + 500, y1))}", data, "collage.png")
    assert status == 200 and past["query"]["box"] == [x0, 0, 1024, y1]

    # A region of an indexed image (its file decoded again) answers as that region uploaded.
    photo_id = top["image_id"]
    crop = io.BytesIO()
    Image.open(settings.images_dir / COLLAGE_PHOTO).convert("RGB").crop((100, 50, 356, 306)).save(crop, format="PNG")
    status, by_id, _ = get(f"{base}/search?image_id={photo_id}&k=10&box=100,50,356,306")
    assert status == 200, by_id
    uploaded = post_image(base + "/search?k=10", crop.getvalue(), "crop.png")[1]
    assert [h["image_id"] for h in by_id["hits"]] == [h["image_id"] for h in uploaded["hits"]]
    assert by_id["hits"][0]["inner_product"] == pytest.approx(uploaded["hits"][0]["inner_product"], abs=1e-5)
    assert by_id["query"]["box"] == [100, 50, 356, 306] and by_id["query"]["image_id"] == photo_id

    # Bad boxes: 400 with the reason.
    for box, said in [("1,2,3", "four numbers"), ("a,b,c,d", "four numbers"), ("10,10,5,50", "x0 < x1"),
                      ("0,0,4,100", "at least 8"), ("2000,2000,3000,3000", "lies outside the 1024x1024 image"),
                      ("1020,0,1100,100", "leaves 4x100 pixels"), ("0,0,nan,10", "finite")]:
        status, body, _ = post_image(f"{base}/search?box={box}", data, "collage.png")
        assert (status, body["error"]) == (400, "bad_box") and said in body["detail"], (box, body)
    status, body, _ = get(f"{base}/search?image_id={photo_id}&box=0,0,10,5")
    assert (status, body["error"]) == (400, "bad_box")
    status, body, _ = get(f"{base}/search?image_id=5&box=0,0,100,100")
    assert (status, body["error"]) == (404, "unknown_image")
    status, body, _ = post_image(base + "/search?box=0,0,100,100", b"<html>not a picture</html>", "page.jpg")
    assert (status, body["error"]) == (422, "not_an_image")  # a fine box on a bad file: the file's refusal

    spec = get(base + "/openapi.json")[1]
    for method in ("get", "post"):
        assert "box" in {p["name"] for p in spec["paths"]["/search"][method]["parameters"]}
    assert {p["name"] for p in spec["paths"]["/compare"]["get"]["parameters"]} == {"a", "b"}


def test_region_search_from_the_command_line(collection, server, tmp_path):
    settings, _, _ = collection
    base, _ = server
    data, box = collage(settings.images_dir)
    query = tmp_path / "collage.png"
    query.write_bytes(data)
    env = {**os.environ, "IMGSIM_DATA_DIR": str(settings.data_dir), "IMGSIM_DEVICE": "cpu"}

    def search(*args):
        return subprocess.run([sys.executable, "-m", "imgsim_assets.cli", "search", *args, "-k", "3", "--json"],
                              env=env, capture_output=True, text=True, timeout=300)

    local = search(str(query), "--box", _box(box))
    assert local.returncode == 0, local.stderr[-2000:]
    answer = json.loads(local.stdout)
    assert answer["hits"][0]["path"] == COLLAGE_PHOTO and answer["box"] == list(box)
    assert answer["hits"][0]["inner_product"] == pytest.approx(1.0, abs=1e-4)
    whole = json.loads(search(str(query)).stdout)
    assert COLLAGE_PHOTO not in [h["path"] for h in whole["hits"]]
    served = search("--server", base, str(query), "--box", _box(box))
    assert served.returncode == 0, served.stderr[-2000:]
    assert json.loads(served.stdout)["hits"][0]["path"] == COLLAGE_PHOTO
    # The top-left quarter of an indexed photograph, by id: locally and through the server, alike.
    photo_id = answer["hits"][0]["image_id"]
    by_id = [json.loads(search("--id", str(photo_id), "--box", "0,0,256,256", *server_args).stdout)["hits"]
             for server_args in ((), ("--server", base))]
    assert [h["image_id"] for h in by_id[0]] == [h["image_id"] for h in by_id[1]]
    refused = search(str(query), "--box", "0,0,4,4")
    assert refused.returncode == 2 and "each side must be at least 8" in refused.stderr
    refused = search("--server", base, str(query), "--box", "5000,0,6000,100")
    assert refused.returncode == 2 and "400 bad_box" in refused.stderr and "lies outside" in refused.stderr


def test_compare_pairs_the_patches_of_two_indexed_images(collection, server):
    base, _ = server
    chelsea = post_image(base + "/search?k=1", (collection[0].images_dir / "batch-0001/chelsea.png").read_bytes())[1]
    chelsea_id = chelsea["hits"][0]["image_id"]
    status, same, _ = get(f"{base}/compare?a={chelsea_id}&b={chelsea_id}")
    assert status == 200, same
    for side in (same["a"], same["b"]):
        assert (side["rows"], side["cols"], side["patch_size"]) == (8, 8, 14) and side["path"] == "batch-0001/chelsea.png"
        assert all(s == pytest.approx(1.0, abs=1e-3) for row in side["similarity"] for s in row)
        assert [m for row in side["match"] for m in row] == list(range(64))
    assert same["inner_product"] == pytest.approx(1.0, abs=1e-4) and same["score"] == pytest.approx(1.0, abs=1e-4)

    # Its half-size copy: the score is the one search ranks it by; each grid covers the center
    # crop of its own picture (451x300 and 225x150: the middle 300 and 150 px square).
    neighbours = get(f"{base}/search?image_id={chelsea_id}&k=10&batch=batch-0002")[1]["hits"]
    small = next(h for h in neighbours if h["path"] == "batch-0002/chelsea_small.jpg")
    status, pair, _ = get(f"{base}/compare?a={chelsea_id}&b={small['image_id']}")
    assert status == 200, pair
    assert pair["inner_product"] == pytest.approx(small["inner_product"], abs=1e-4)
    a, b = pair["a"], pair["b"]
    assert (a["width"], a["height"], b["width"], b["height"]) == (451, 300, 225, 150)
    assert a["crop"]["y1"] - a["crop"]["y0"] == pytest.approx(300 * 112 / 128, abs=0.5)
    assert b["crop"]["y1"] - b["crop"]["y0"] == pytest.approx(150 * 112 / 128, abs=0.5)
    assert (a["crop"]["x0"] + a["crop"]["x1"]) / 2 == pytest.approx(451 / 2, abs=2)
    mean = sum(map(sum, a["similarity"])) / 64
    assert 0.5 < mean < 1.0 and all(0 <= m < 64 for row in a["match"] for m in row)

    cases = [(get(f"{base}/compare?a={chelsea_id}&b=5"), 404, "unknown_image"),
             (get(f"{base}/compare?a={chelsea_id}"), 400, "missing_parameter"),
             (get(f"{base}/compare?a=abc&b=1"), 422, "bad_parameter")]
    for (status, body, _), expected_status, error in cases:
        assert (status, body["error"]) == (expected_status, error), body


def test_concurrent_image_queries_share_model_calls(collection, server):
    settings, _, _ = collection
    base, _ = server
    queries = sorted((settings.data_dir / "queries").glob("*.jpg"))[:8]
    results = [None] * len(queries)
    start = threading.Barrier(len(queries))

    def ask(i):
        start.wait()
        results[i] = post_image(base + "/search?k=3", queries[i].read_bytes(), queries[i].name)

    before = _batch_counts(get(base + "/metrics")[1])
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(queries))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r[0] for r in results] == [200] * len(queries)
    after = _batch_counts(get(base + "/metrics")[1])
    calls, answered = after[0] - before[0], after[1] - before[1]
    assert answered == len(queries) and calls < len(queries)  # some queries shared a model call
    metrics = get(base + "/metrics")[1].decode()
    assert 'imgsim_requests_total{endpoint="/search",status="200"}' in metrics
    assert "imgsim_index_vectors 92.0" in metrics and "imgsim_queue_depth" in metrics


def _batch_counts(metrics: bytes) -> tuple[float, float]:
    """(model calls, queries embedded) from the batch-size histogram."""
    lines = dict(line.rsplit(" ", 1) for line in metrics.decode().splitlines() if line and not line.startswith("#"))
    return float(lines["imgsim_model_batch_size_count"]), float(lines["imgsim_model_batch_size_sum"])


def test_duplicates_and_clusters_pages(server):
    base, _ = server
    status, page, _ = get(base + "/duplicates?per_page=3")
    assert status == 200 and page["page"] == 1 and len(page["groups"]) <= 3 and page["total_groups"] >= 1
    sizes = [g["size"] for g in page["groups"]]
    assert sizes == sorted(sizes, reverse=True) and all(len(g["members"]) == g["size"] for g in page["groups"])
    assert all(m["path"] and m["batch"] for g in page["groups"] for m in g["members"])
    status, clusters, _ = get(base + "/clusters?per_page=2&samples=3")
    assert status == 200 and clusters["total_clusters"] >= 1
    assert sum(c["size"] for c in get(base + "/clusters?per_page=200")[1]["clusters"]) == 92
    assert all(len(c["samples"]) <= 3 for c in clusters["clusters"])


def test_evaluation_report_and_not_evaluated(collection, server):
    settings, _, _ = collection
    base, _ = server
    status, report, _ = get(base + "/evaluation")
    assert status == 200, report
    table = report["table"]
    assert len(table) == 12 and [r["family"] == "all" for r in table] == [False] * 11 + [True]  # 11 edit families
    assert table[-1]["copies"] == sum(r["copies"] for r in table[:-1]) > 0
    assert isinstance(report["threshold"]["value"], float) and isinstance(report["threshold"]["reached"], bool)
    assert report["random_weights"] is True and "histograms" not in report
    assert report["grouping"] in {g["rule"] for g in report["groupings"]} and report["sources"] > 0

    # Never evaluated (or removed): a 404 that says what to run. A new version of the file (a
    # new mtime) is read again, not answered from the cache.
    stored = artifact_path(settings.assets_dir, "retrieval_eval", suffix=".json")
    aside = stored.with_name("retrieval_eval.aside")
    stored.rename(aside)
    try:
        status, body, _ = get(base + "/evaluation")
        assert (status, body["error"]) == (404, "not_evaluated") and "imgsim evaluate" in body["detail"]
        changed = {**json.loads(aside.read_text()), "target_precision": 0.5}
        stored.write_text(json.dumps(changed))
        assert get(base + "/evaluation")[1]["target_precision"] == 0.5
    finally:
        aside.replace(stored)
    assert get(base + "/evaluation")[1] == report
    metrics = get(base + "/metrics")[1].decode()
    assert 'imgsim_requests_total{endpoint="/evaluation",status="404"}' in metrics


def test_a_new_index_version_is_swapped_in_without_failing_a_request(collection, server):
    settings, defs, instance = collection
    base, app = server
    health = get(base + "/healthz")[1]
    some_id = get(f"{base}/clusters?per_page=1&samples=1")[1]["clusters"][0]["samples"][0]["image_id"]
    failures, answered, stop = [], [], threading.Event()

    def load():
        while not stop.is_set():
            status, body, _ = get(f"{base}/search?image_id={some_id}&k=5")
            (answered if status == 200 else failures).append((status, body))

    clients = [threading.Thread(target=load) for _ in range(4)]
    for c in clients:
        c.start()
    try:
        write_synthetic_batch(settings.images_dir / "batch-0003", 12, seed=3)
        assert ingest(defs, instance, settings.images_dir, log=lambda m: None).ok
        deadline = time.monotonic() + 60
        while get(base + "/healthz")[1]["num_vectors"] != 104:
            assert time.monotonic() < deadline, "the new version was not swapped in"
            time.sleep(0.1)
    finally:
        stop.set()
        for c in clients:
            c.join()
    after = get(base + "/healthz")[1]
    assert after["index_version"] != health["index_version"] and after["reloads"] >= 1
    assert failures == [] and len(answered) > 10
    assert {a[1]["num_vectors"] for a in answered} == {92, 104}  # answered by both versions
