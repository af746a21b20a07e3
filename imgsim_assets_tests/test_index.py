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


def test_shards_merge_into_one_index_with_each_id_once():
    x = _clustered()
    pca = ix.fit_pca(x, dim=16)
    r = pca.transform(x)
    centroids = ix.train_centroids(r, 16)
    assert centroids.shape == (16, 16)
    a = ix.build_shard(centroids, np.arange(0, 2000), r[:2000])
    b = ix.build_shard(centroids, np.arange(1500, 3000), r[1500:])  # 500 ids overlap
    merged, skipped = ix.merge_shards(centroids, [("a", a), ("b", b)])
    assert (merged.ntotal, skipped) == (3000, 500)
    ids, vectors = ix.ivf_contents(merged)
    assert sorted(ids.tolist()) == list(range(3000))
    np.testing.assert_allclose(vectors[np.argsort(ids)], r, atol=1e-6)


def test_merge_refuses_shards_built_with_other_centroids():
    r = ix.normalize_rows(_clustered(d=8))
    old = ix.train_centroids(r, 4, seed=0)
    new = ix.train_centroids(r, 4, seed=1)
    shard = ix.build_shard(old, np.arange(10), r[:10])
    with pytest.raises(ValueError, match="other centroids"):
        ix.merge_shards(new, [("batch-x", shard)])


def test_recall_curve_reaches_exact_search():
    r = ix.normalize_rows(_clustered())
    centroids = ix.train_centroids(r, 32)
    merged, _ = ix.merge_shards(centroids, [("a", ix.build_shard(centroids, np.arange(len(r)), r))])
    curve = ix.recall_curve(merged, n_queries=200)
    assert [p.nprobe for p in curve] == [1, 2, 4, 8, 16, 32]
    assert curve[-1].recall_at_10 == pytest.approx(1.0)
    recalls = [p.recall_at_10 for p in curve]
    assert recalls == sorted(recalls) and recalls[0] < 1.0
    chosen = ix.choose_nprobe(curve, 0.95)
    assert chosen.recall_at_10 >= 0.95 and all(p.recall_at_10 < 0.95 for p in curve if p.nprobe < chosen.nprobe)


def test_image_index_search_and_publication(tmp_path):
    x = _clustered(n=500)
    pca = ix.fit_pca(x, dim=16)
    centroids = ix.train_centroids(pca.transform(x), 4)
    ids = np.arange(100, 600)
    merged, _ = ix.merge_shards(centroids, [("a", ix.build_shard(centroids, ids, pca.transform(x)))])
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
