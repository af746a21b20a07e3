import faiss
import numpy as np
import pyarrow as pa
import pytest
from sklearn.decomposition import PCA

from imgsim_assets.core import index as ix
from imgsim_assets.core.search import ImageIndex, similarity_score
from imgsim_assets.core.storage import publish_dir


def _clustered(n=3000, d=48, clusters=20, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, d))
    x = centers[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, d))
    return x.astype(np.float32)


def test_pca_matches_sklearn_and_faiss_pretransform_matches_numpy():
    x = _clustered()
    model = ix.fit_pca(x, dim=16)
    ref = PCA(n_components=16).fit(x)
    np.testing.assert_allclose(np.abs(model.components), np.abs(ref.components_), atol=1e-4)
    reduced = model.transform(x[:50])
    np.testing.assert_allclose(np.linalg.norm(reduced, axis=1), 1.0, atol=1e-5)
    via_faiss = faiss.NormalizationTransform(16, 2.0).apply(model.faiss_transform().apply(x[:50]))
    np.testing.assert_allclose(via_faiss, reduced, atol=1e-5)


def test_pca_dimension_is_capped_by_the_data_and_can_follow_variance():
    x = _clustered(n=30, d=48)
    assert ix.fit_pca(x, dim=256).output_dim == 29
    model = ix.fit_pca(_clustered(), variance=0.5)
    assert model.explained_variance_ratio.sum() >= 0.5
    assert model.explained_variance_ratio[:-1].sum() < 0.5


def test_pca_round_trips_through_plain_arrays(tmp_path):
    model = ix.fit_pca(_clustered(), dim=8, whiten=True, provenance={"model": "m"})
    np.savez(tmp_path / "p.npz", **model.to_arrays())
    with np.load(tmp_path / "p.npz", allow_pickle=False) as arrays:
        back = ix.PcaModel.from_arrays(arrays)
    x = _clustered(n=10, seed=3)
    np.testing.assert_allclose(back.transform(x), model.transform(x), atol=1e-6)
    assert back.whiten and back.provenance == {"model": "m"}


@pytest.mark.parametrize("n, expected", [(10, 1), (40, 1), (1000, 25), (100_000, 1265), (10**9, 65536)])
def test_choose_nlist(n, expected):
    assert ix.choose_nlist(n) == expected


def _reconstruct(index, ids):
    return np.stack([index.reconstruct(int(i)) for i in ids])


@pytest.mark.parametrize("codec, atol", [("Flat", 1e-6), ("SQ8", 0.02), ("PQ8", None)])
def test_shards_merge_into_one_index_with_each_id_once(codec, atol):
    x = _clustered()
    pca = ix.fit_pca(x, dim=16)
    r = pca.transform(x)
    centroids = ix.train_centroids(r, 16)
    assert centroids.shape == (16, 16)
    template = ix.train_template(centroids, codec, r)
    assert template.ntotal == 0
    a = ix.build_shard(template, np.arange(0, 2000), r[:2000])
    b = ix.build_shard(template, np.arange(1500, 3000), r[1500:])  # 500 ids overlap
    merged, skipped = ix.merge_shards(template, [("a", a), ("b", b)])
    assert (merged.ntotal, skipped) == (3000, 500)
    assert sorted(ix.ivf_ids(merged).tolist()) == list(range(3000))
    assert ix.list_sizes(merged).sum() == 3000
    if atol is not None:
        merged.make_direct_map()
        np.testing.assert_allclose(_reconstruct(merged, range(3000)), r, atol=atol)


def test_merge_refuses_shards_built_with_another_trained_index():
    r = ix.normalize_rows(_clustered(d=8))
    old = ix.train_template(ix.train_centroids(r, 4, seed=0))
    new = ix.train_template(ix.train_centroids(r, 4, seed=1))
    shard = ix.build_shard(old, np.arange(10), r[:10])
    with pytest.raises(ValueError, match="another trained index"):
        ix.merge_shards(new, [("batch-x", shard)])
    sq_a, sq_b = ix.train_template(ix.train_centroids(r, 4), "SQ8", r), ix.train_template(ix.train_centroids(r, 4), "SQ8", r[:100] * 2)
    with pytest.raises(ValueError, match="batch-y"):
        ix.merge_shards(sq_b, [("batch-y", ix.build_shard(sq_a, np.arange(10), r[:10]))])


@pytest.mark.parametrize(
    "n, budget_mb, kwargs, expected",
    [
        (5_000, 4096, {}, "Flat"),
        (1_000_000, 4096, {}, "IVF4000,Flat"),
        (1_000_000, 512, {}, "IVF4000,SQ8"),
        (1_000_000, 100, {}, "IVF4000,PQ64"),
        (1_000_000, 4096, {"codec": "PQ32"}, "IVF4000,PQ32"),
        (50_000, 4096, {"per_sqrt": 16}, "IVF1282,Flat"),
    ],
)
def test_index_plan_follows_size_and_memory_budget(n, budget_mb, kwargs, expected):
    plan = ix.plan_index(n, 256, memory_budget_bytes=budget_mb << 20, **kwargs)
    assert plan.factory == expected and not plan.notes
    assert plan.memory_bytes(n) <= budget_mb << 20 or "codec" in kwargs


def test_index_plan_falls_back_when_the_data_cannot_train_it():
    plan = ix.plan_index(30_000, 256, codec="PQ32", nlist=5000, train_samples=2000)
    assert plan.factory == "IVF693,SQ8"
    assert any("nlist 5000" in n for n in plan.notes) and any("PQ32 needs" in n for n in plan.notes)
    with pytest.raises(ValueError, match="PQ7"):
        ix.plan_index(30_000, 256, codec="PQ7")


def test_exact_neighbours_stream_leave_the_query_out_and_count_duplicates_once():
    r = ix.normalize_rows(_clustered(n=600, d=16))
    ids = np.arange(600)
    chunks = [(ids[:250], r[:250]), (ids[200:], r[200:])]  # ids 200..249 appear twice
    truth = ix.exact_neighbours(r[:50], ids[:50], chunks, k=10)
    sims = r[:50] @ r.T
    sims[np.arange(50), np.arange(50)] = -np.inf
    expected = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(np.sort(truth, axis=1), np.sort(expected, axis=1))
    assert not (truth == ids[:50, None]).any()


def test_recall_curve_reaches_exact_search():
    r = ix.normalize_rows(_clustered())
    ids = np.arange(len(r))
    template = ix.train_template(ix.train_centroids(r, 32))
    merged, _ = ix.merge_shards(template, [("a", ix.build_shard(template, ids, r))])
    queries = ix.sample_indices(len(r), 200)
    truth = ix.exact_neighbours(r[queries], ids[queries], [(ids, r)])
    curve = ix.recall_curve(merged, r[queries], ids[queries], truth)
    assert [p.nprobe for p in curve] == [1, 2, 4, 8, 16, 32]
    assert curve[-1].recall_at_10 == pytest.approx(1.0)
    recalls = [p.recall_at_10 for p in curve]
    assert recalls == sorted(recalls) and recalls[0] < 1.0
    assert all(p.ms_per_query > 0 for p in curve)
    chosen = ix.choose_nprobe(curve, 0.95)
    assert chosen.recall_at_10 >= 0.95 and all(p.recall_at_10 < 0.95 for p in curve if p.nprobe < chosen.nprobe)


def test_drift_is_the_pca_residual_relative_to_training():
    x = _clustered(n=2000, d=48)
    pca = ix.fit_pca(x, dim=8)
    assert pca.train_residual == pytest.approx(float(pca.residual_fraction(x).mean()))
    same = pca.residual_fraction(_clustered(n=500, d=48, seed=0)).mean() / pca.train_residual
    other = pca.residual_fraction(np.random.default_rng(5).normal(size=(500, 48)).astype(np.float32)).mean() / pca.train_residual
    assert same == pytest.approx(1.0, abs=0.1) and other > 1.5


def test_connected_groups_number_the_largest_first():
    groups = ix.connected_groups(np.array([1, 2, 10, 20, 30, 40]), np.array([2, 3, 11, 30, 40, 50]))
    assert groups == {20: 0, 30: 0, 40: 0, 50: 0, 1: 1, 2: 1, 3: 1, 10: 2, 11: 2}
    assert ix.connected_groups(np.zeros(0, np.int64), np.zeros(0, np.int64)) == {}


def test_image_index_search_and_publication(tmp_path):
    x = _clustered(n=500)
    pca = ix.fit_pca(x, dim=16)
    template = ix.train_template(ix.train_centroids(pca.transform(x), 4))
    ids = np.arange(100, 600)
    merged, _ = ix.merge_shards(template, [("a", ix.build_shard(template, ids, pca.transform(x)))])
    merged.nprobe = 4
    catalog = pa.table({"image_id": np.r_[ids, ids[:1]], "batch": ["a"] * 501, "path": [f"a/{i}.png" for i in ids] + ["b/copy.png"]})
    index = ImageIndex(ix.with_pretransform(pca, merged), catalog, {"nprobe": 4})
    link = tmp_path / "faiss_index"
    publish_dir(link, index.save)
    publish_dir(link, index.save)  # republishing replaces the version, leaves no garbage
    assert len([p for p in tmp_path.iterdir() if ".v-" in p.name]) == 1
    loaded = ImageIndex.load(link)
    hits = loaded.search(x[:1], k=3)[0]
    assert hits[0].image_id == 100 and hits[0].path == "a/100.png" and hits[0].copies == 2
    assert hits[0].score == pytest.approx(similarity_score(hits[0].inner_product))
    assert hits[0].inner_product == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="dimension 5"):
        loaded.search(np.zeros((1, 5), np.float32))


def test_shard_with_the_wrong_dimension_names_both():
    r = ix.normalize_rows(_clustered(d=8))
    template = ix.train_template(ix.train_centroids(r, 4))
    with pytest.raises(ValueError, match="dimension 16 but the trained index has 8"):
        ix.build_shard(template, np.arange(5), np.zeros((5, 16), np.float32))
