import gc

import faiss
import numpy as np
import pyarrow as pa
import pytest
from dagster import AssetKey, build_input_context, build_output_context
from sklearn.decomposition import PCA

from imgsim_assets.core import index as ix
from imgsim_assets.core import recall
from imgsim_assets.core.search import ImageIndex, similarity_score
from imgsim_assets.core.storage import publish_dir
from imgsim_assets.io_managers import ImageIndexIOManager


def _clustered(n=3000, d=48, clusters=20, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, d))
    x = centers[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, d))
    return x.astype(np.float32)


def test_pca_matches_sklearn_and_its_transform_is_the_published_pretransform():
    x = _clustered()
    model = ix.fit_pca(x, dim=16)
    ref = PCA(n_components=16).fit(x)
    np.testing.assert_allclose(np.abs(model.components), np.abs(ref.components_), atol=1e-4)
    reduced = model.transform(x[:50])
    np.testing.assert_allclose(np.linalg.norm(reduced, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(reduced, ix.normalize_rows((x[:50] - model.mean) @ model.components.T), atol=1e-5)
    published = ix.with_pretransform(model, faiss.IndexFlatIP(16))
    assert not ix.has_legacy_pretransform(published)
    assert np.array_equal(recall.searched_space(published)[1](x[:50]), reduced)  # the same code, the same bits


def _near_their_mean(n=300, d=48, spread=1e-5, seed=0):
    """Unit embeddings within ``spread`` of one another, as a barely trained model gives."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=d)
    return ix.normalize_rows(centre / np.linalg.norm(centre) + spread * rng.normal(size=(n, d)))


def _bias_form(model, x):
    """The pre-transform indexes were once published with: the mean folded into a bias."""
    linear = faiss.LinearTransform(model.input_dim, model.output_dim, True)
    faiss.copy_array_to_vector(model.components.ravel(), linear.A)
    faiss.copy_array_to_vector((-model.components @ model.mean).astype(np.float32), linear.b)
    linear.is_trained = True
    return ix.normalize_rows(linear.apply(x))


def test_pca_of_embeddings_near_their_mean_keeps_its_precision():
    # Centring after projecting (x·Aᵀ − A·mean) cancels almost everything here: what is left is
    # rounding, which normalisation blows up. Centring first keeps the float64 answer.
    x = _near_their_mean()
    model = ix.fit_pca(x, dim=16)
    exact = (x.astype(np.float64) - model.mean.astype(np.float64)) @ model.components.T.astype(np.float64)
    exact /= np.linalg.norm(exact, axis=1, keepdims=True)
    assert np.abs(model.transform(x) - exact).max() < 1e-4
    assert np.abs(_bias_form(model, x) - exact).max() > 1e-3  # what the queries of such indexes got
    legacy = faiss.IndexPreTransform(faiss.IndexFlatIP(16))
    legacy.prepend_transform(faiss.LinearTransform(48, 16, True))
    assert ix.has_legacy_pretransform(legacy)


def _simd_levels() -> list[int]:
    """Every Faiss SIMD level this CPU runs (one, the compiled one, without dynamic dispatch)."""
    config = getattr(faiss, "SIMDConfig", None)
    if config is None or not hasattr(config, "set_level"):
        return [-1]
    return [level for level in range(faiss.SIMDLevel_COUNT) if config.is_simd_level_available(level)]


@pytest.mark.parametrize("nlist", [1, 4])
def test_an_exact_index_measures_exact_at_every_simd_level(nlist):
    # Exact ties (the same vector under other ids) and near ties 1e-6..1e-4 apart, all close
    # to the mean: the case that once measured a Flat index at recall@10 0.93.
    x = _near_their_mean(n=240)
    rng = np.random.default_rng(1)
    near = ix.normalize_rows(x[:40] + rng.choice([1e-6, 1e-5, 1e-4], size=(40, 1)) * rng.normal(size=(40, 48)))
    x = np.concatenate([x, x[:40], near]).astype(np.float32)
    ids = np.arange(len(x))
    model = ix.fit_pca(x, dim=16)
    published = ix.with_pretransform(model, _flat(model.transform(x), ids, nlist=nlist))
    queries = ix.sample_indices(len(x), 120, seed=2)
    levels = _simd_levels()
    config = getattr(faiss, "SIMDConfig", None)
    saved = config.get_level() if levels != [-1] else None
    try:
        for level in levels:
            if level >= 0:
                config.set_level(level)
            evaluation = recall.evaluate(published, x[queries], ids[queries], lambda: [(ids, x)], nprobes=[nlist])
            point = evaluation.curve[0]
            assert (point.recall_at_10, point.one_recall_at_1) == (1.0, 1.0), (level, point)
    finally:
        if saved is not None:
            config.set_level(saved)


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


def _flat(r, ids, nlist=1, codec="Flat"):
    template = ix.build_template(ix.IndexPlan(nlist, codec, r.shape[1]), r)
    merged, _ = ix.merge_shards(template, [("a", ix.build_shard(template, ids, r))])
    return merged


def test_evaluation_streams_leaves_the_query_out_and_counts_duplicates_once():
    r = ix.normalize_rows(_clustered(n=600, d=16))
    ids = np.arange(600)
    chunks = [(ids[:250], r[:250]), (ids[200:], r[200:])]  # ids 200..249 appear twice
    index = _flat(r, ids)
    evaluation = recall.evaluate(index, r[:50], ids[:50], lambda: chunks)
    assert evaluation.num_queries == 50 and len(evaluation.curve) == 1
    assert evaluation.curve[0].recall_at_10 == pytest.approx(1.0) and evaluation.curve[0].one_recall_at_1 == 1.0
    # A truth that kept the query itself, or counted an id twice, would have failed the exact index.
    assert (evaluation.pca_recall_at_10, evaluation.pca_one_recall_at_1) == (1.0, 1.0)


def test_tie_aware_recall_counts_equal_scores_as_hits():
    # Row 0: five copies score 0.99; the truth lists four of them, the index returned the fifth
    # among its four (a tie, a hit) and, within epsilon, another. Row 1: 0.7 missed, 3 of 4.
    truth = np.array([[0.99, 0.99, 0.99, 0.99], [0.9, 0.8, 0.7, 0.6]], np.float32)
    found = np.array([[0.99, 0.99, 0.99, 0.99 - 5e-5], [0.9, 0.8, 0.6, -np.inf]], np.float32)
    recall_k, one = recall.tie_aware_recall(found, truth)
    assert recall_k == pytest.approx((4 / 4 + 3 / 4) / 2) and one == 1.0
    assert recall.tie_aware_recall(found, truth, epsilon=0.0)[0] == pytest.approx((3 / 4 + 3 / 4) / 2)
    worst_first = np.array([[0.5, 0.99, 0.99, 0.99], [-np.inf, 0.8, 0.6, 0.9]], np.float32)
    assert recall.tie_aware_recall(worst_first, truth)[1] == 0.0
    short = np.array([[0.9, -np.inf, -np.inf, -np.inf]], np.float32)  # a database of one vector
    assert recall.tie_aware_recall(short, short) == (1.0, 1.0)


def test_copies_of_one_picture_are_ties_not_misses():
    rng = np.random.default_rng(0)
    distinct = ix.normalize_rows(_clustered(n=400, d=32))
    base = distinct[0]
    copies = ix.normalize_rows(base + 1e-6 * rng.normal(size=(50, 32)))  # 50 re-encodes of one picture
    r = np.concatenate([distinct, copies]).astype(np.float32)
    ids = np.arange(len(r))
    index = _flat(r, ids)
    queries = np.r_[np.arange(400, 450), np.arange(1, 50)]
    evaluation = recall.evaluate(index, r[queries], ids[queries], lambda: [(ids, r)])
    assert evaluation.curve[0].recall_at_10 == pytest.approx(1.0)
    # Comparing ids instead: among 50 equal vectors the exact order is arbitrary.
    found = recall.search_excluding_self(index, r[queries], ids[queries], 10)
    sims = r[queries] @ r.T
    sims[np.arange(len(queries)), queries] = -np.inf
    exact_ids = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    by_id = np.mean([len(np.intersect1d(f, t)) / 10 for f, t in zip(found, exact_ids)])
    assert by_id < 0.99


def test_recall_curve_reaches_exact_search_and_pca_loss_is_apart():
    x = ix.normalize_rows(_clustered())  # embeddings are unit vectors
    pca = ix.fit_pca(x, dim=8)
    r = pca.transform(x)
    ids = np.arange(len(r))
    index = _flat(r, ids, nlist=32)
    queries = ix.sample_indices(len(r), 200)
    ladder = recall.nprobe_ladder(index.nlist)
    evaluation = recall.evaluate(index, x[queries], ids[queries], lambda: [(ids, x)], pca.transform, ladder)
    curve = evaluation.curve
    assert [p.nprobe for p in curve] == ladder == [1, 2, 4, 8, 16, 32]
    assert curve[-1].recall_at_10 == pytest.approx(1.0)  # every list probed: exact in the PCA space
    recalls = [p.recall_at_10 for p in curve]
    assert recalls == sorted(recalls) and recalls[0] < 1.0
    assert all(p.ms_per_query > 0 for p in curve)
    chosen = evaluation.cheapest(0.95)
    assert chosen.recall_at_10 >= 0.95 and all(p.recall_at_10 < 0.95 for p in curve if p.nprobe < chosen.nprobe)
    # 8 of 48 dimensions: exact search after PCA misses most of the raw top 10, whatever nprobe;
    # the loss shrinks as PCA keeps more.
    assert evaluation.pca_recall_at_10 < 0.5
    wider = ix.fit_pca(x, dim=40)
    wider_index = _flat(wider.transform(x), ids)
    wider_recall = recall.evaluate(wider_index, x[queries], ids[queries], lambda: [(ids, x)], wider.transform)
    assert wider_recall.pca_recall_at_10 > evaluation.pca_recall_at_10 + 0.2
    assert recall.evaluate(index, r[queries], ids[queries], lambda: [(ids, r)]).pca_recall_at_10 == 1.0


def test_build_template_one_list_is_the_mean_direction_and_factory_comes_from_faiss():
    r = ix.normalize_rows(_clustered(d=16))
    exact = ix.build_template(ix.plan_index(len(r), 16), r)
    np.testing.assert_allclose(ix.shard_centroids(exact)[0], ix.normalize_rows(r.mean(axis=0, keepdims=True))[0],
                               atol=1e-5)
    assert ix.factory_of(exact) == "Flat"
    for codec, name in [("Flat", "IVF8,Flat"), ("SQ8", "IVF8,SQ8"), ("PQ4", "IVF8,PQ4x8")]:
        template = ix.build_template(ix.IndexPlan(8, codec, 16), r)
        assert ix.factory_of(template) == name and template.is_trained


def test_shard_round_trips_through_plain_arrays(tmp_path):
    x = _clustered(n=500)
    pca = ix.fit_pca(x, dim=16)
    template = ix.build_template(ix.IndexPlan(4, "SQ8", 16), pca.transform(x))
    shard = ix.Shard.build(template, pca, np.arange(100, 600), x)
    assert shard.drift == pytest.approx(1.0, abs=0.05)
    np.savez(tmp_path / "s.npz", **shard.to_arrays())
    with np.load(tmp_path / "s.npz", allow_pickle=False) as arrays:
        back = ix.Shard.from_arrays(arrays)
    assert (back.pca_residual, back.drift) == (shard.pca_residual, shard.drift)
    assert sorted(back.ids.tolist()) == list(range(100, 600))
    assert back.layout == ix.layout_fingerprint(template)
    # Only the lists travel: codes (500 × 16 bytes), ids and list numbers, not the trained tables.
    assert set(arrays.files) >= {"ids", "lists", "codes"} and back.codes.shape == (500, template.code_size)
    assert (tmp_path / "s.npz").stat().st_size < 500 * (template.code_size + 16) + 4096
    on_disk = ix.ShardFile(str(tmp_path / "s.npz"))  # as faiss_index reads shards: one at a time
    assert (on_disk.layout, on_disk.drift) == (back.layout, shard.drift)
    from_file, _ = ix.merge_shards(template, [("s", on_disk)])
    in_memory, _ = ix.merge_shards(template, [("s", shard)])
    assert np.array_equal(ix.ivf_ids(from_file), ix.ivf_ids(in_memory))


def test_shards_written_whole_by_earlier_versions_still_load(tmp_path):
    x = _clustered(n=300)
    pca = ix.fit_pca(x, dim=16)
    template = ix.build_template(ix.IndexPlan(4, "SQ8", 16), pca.transform(x))
    whole = faiss.clone_index(template)
    whole.add_with_ids(pca.transform(x), np.arange(300, dtype=np.int64))
    np.savez(tmp_path / "old.npz", index=faiss.serialize_index(whole), pca_residual=np.array(0.5), drift=np.array(1.1))
    with np.load(tmp_path / "old.npz", allow_pickle=False) as arrays:
        back = ix.Shard.from_arrays(arrays)
    assert (back.pca_residual, back.drift, back.layout) == (0.5, 1.1, ix.layout_fingerprint(template))
    merged, _ = ix.merge_shards(template, [("old", back)])
    assert np.array_equal(np.sort(ix.ivf_ids(merged)), np.arange(300))
    read_late, _ = ix.merge_shards(template, [("old", ix.ShardFile(str(tmp_path / "old.npz")))])
    assert np.array_equal(ix.ivf_ids(read_late), ix.ivf_ids(merged))
    assert ix.ShardFile(str(tmp_path / "old.npz")).drift == 1.1


@pytest.mark.parametrize("codec", ["Flat", "SQ8", "PQ4"])
def test_merge_equals_faiss_merge_from_list_by_list(codec):
    """The merge lays out every list exactly as adding the shards one after another with Faiss'
    own merge_from (duplicates removed first) does: same ids, same order, same codes."""
    x = ix.fit_pca(_clustered(n=1200), dim=16).transform(_clustered(n=1200))
    template = ix.build_template(ix.IndexPlan(8, codec, 16), x)
    parts = [np.arange(0, 500), np.arange(400, 900), np.arange(850, 1200)]
    merged, skipped = ix.merge_shards(template, [(f"s{i}", ix.build_shard(template, p, x[p])) for i, p in enumerate(parts)])
    reference, seen = faiss.clone_index(template), set()
    for p in parts:
        fresh = np.array([i for i in p if i not in seen])
        seen.update(fresh.tolist())
        one = faiss.clone_index(template)
        one.add_with_ids(x[fresh], fresh.astype(np.int64))
        reference.merge_from(one, 0)
    assert skipped == 150 and merged.ntotal == reference.ntotal == 1200
    for n in range(merged.nlist):
        size = merged.invlists.list_size(n)
        assert size == reference.invlists.list_size(n)
        ids = [faiss.rev_swig_ptr(i.invlists.get_ids(n), size).copy() for i in (merged, reference)]
        codes = [faiss.rev_swig_ptr(i.invlists.get_codes(n), size * merged.code_size).copy() for i in (merged, reference)]
        assert np.array_equal(*ids) and np.array_equal(*codes)
    merged.nprobe = reference.nprobe = 4
    assert np.array_equal(merged.search(x[:50], 10)[1], reference.search(x[:50], 10)[1])


def test_drift_is_the_pca_residual_relative_to_training():
    x = _clustered(n=2000, d=48)
    pca = ix.fit_pca(x, dim=8)
    assert pca.train_residual == pytest.approx(float(pca.residual_fraction(x).mean()))
    same = pca.residual_fraction(_clustered(n=500, d=48, seed=0)).mean() / pca.train_residual
    other = pca.residual_fraction(np.random.default_rng(5).normal(size=(500, 48)).astype(np.float32)).mean() / pca.train_residual
    assert same == pytest.approx(1.0, abs=0.1) and other > 1.5


def _image_index(x: np.ndarray) -> ImageIndex:
    """An index of ``x`` (ids 100…), with one image found at a second path."""
    pca = ix.fit_pca(x, dim=16)
    template = ix.train_template(ix.train_centroids(pca.transform(x), 4))
    ids = np.arange(100, 100 + len(x))
    merged, _ = ix.merge_shards(template, [("a", ix.build_shard(template, ids, pca.transform(x)))])
    merged.nprobe = 4
    catalog = pa.table({"image_id": np.r_[ids, ids[:1]], "batch": ["a"] * (len(x) + 1),
                        "path": [f"a/{i}.png" for i in ids] + ["b/copy.png"]})
    return ImageIndex(ix.with_pretransform(pca, merged), catalog, {"nprobe": 4})


def test_image_index_search_and_publication(tmp_path):
    x = _clustered(n=500)
    index = _image_index(x)
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


def test_an_index_published_by_this_process_is_read_without_a_second_copy(tmp_path):
    manager = ImageIndexIOManager(root=str(tmp_path))
    key = AssetKey("faiss_index")
    index = _image_index(_clustered(n=300))
    manager.handle_output(build_output_context(asset_key=key), index)
    assert manager.load_input(build_input_context(asset_key=key)) is index  # still held: the same object
    other = _image_index(_clustered(n=200, seed=3))
    manager.handle_output(build_output_context(asset_key=key), other)
    assert manager.load_input(build_input_context(asset_key=key)) is other  # the version the link points at
    ImageIndexIOManager(root=str(tmp_path)).handle_output(build_output_context(asset_key=key), index)
    assert manager.load_input(build_input_context(asset_key=key)) is index  # by another manager of this process
    del index, other
    gc.collect()
    loaded = manager.load_input(build_input_context(asset_key=key))  # no longer held: read from disk
    assert loaded.num_vectors == 300 and loaded.search(_clustered(n=300)[:1], k=1)[0][0].image_id == 100


def test_shard_with_the_wrong_dimension_names_both():
    r = ix.normalize_rows(_clustered(d=8))
    template = ix.train_template(ix.train_centroids(r, 4))
    with pytest.raises(ValueError, match="dimension 16 but the trained index has 8"):
        ix.build_shard(template, np.arange(5), np.zeros((5, 16), np.float32))


def test_tuning_stops_at_the_first_round_that_reaches_the_target():
    x = ix.normalize_rows(_clustered())
    ids = np.arange(len(x))
    index = _flat(x, ids, nlist=32)
    queries = ix.sample_indices(len(x), 200)
    tuned = recall.tune(index, x[queries], ids[queries], lambda: [(ids, x)], target=0.5, per_round=2)
    assert [p.nprobe for p in tuned.curve][:2] == [1, 2] and len(tuned.curve) < 6
    assert tuned.curve[-1].recall_at_10 >= 0.5 or len(tuned.curve) == 2
    full = recall.tune(index, x[queries], ids[queries], lambda: [(ids, x)], target=1.01, per_round=2)
    assert [p.nprobe for p in full.curve] == [1, 2, 4, 8, 16, 32]  # never reached: the whole ladder
    assert full.cheapest(1.01).nprobe == max(full.curve, key=lambda p: p.recall_at_10).nprobe


def test_merge_skips_ids_an_earlier_shard_holds_across_many_shards():
    x = ix.fit_pca(_clustered(n=300), dim=16).transform(_clustered(n=300))
    template = ix.train_template(ix.train_centroids(x, 4), "Flat", x)
    ids = np.arange(300)
    # Five shards overlapping their neighbours by 20 ids: the first holder of each id keeps it.
    shards = [(f"s{i}", ix.build_shard(template, ids[i * 50 : i * 50 + 70], x[i * 50 : i * 50 + 70])) for i in range(5)]
    merged, skipped = ix.merge_shards(template, shards)
    assert skipped == 4 * 20 and merged.ntotal == 270
    assert np.array_equal(np.sort(ix.ivf_ids(merged)), np.arange(270))


def test_catalog_lists_every_ok_file_of_indexed_images_in_batch_order():
    from imgsim_assets.core import tables
    from imgsim_assets.core.build import catalog as _catalog
    from imgsim_assets.core.build import catalog_schema

    manifests = {
        "b2": pa.table({"image_id": [5, 6, 7], "path": ["b2/x.jpg", "b2/bad.jpg", "b2/copy.jpg"],
                        "status": ["ok", "rejected", "ok"]}),
        "b1": pa.table({"image_id": [7, 8], "path": ["b1/a.jpg", "b1/gone.jpg"], "status": ["ok", "ok"]}),
    }
    catalog = _catalog(manifests, np.array([5, 7]))  # 8 is not in the index, 6 was rejected
    assert catalog.select(["image_id", "batch", "path"]).to_pylist() == [
        {"image_id": 7, "batch": "b1", "path": "b1/a.jpg"},
        {"image_id": 5, "batch": "b2", "path": "b2/x.jpg"},
        {"image_id": 7, "batch": "b2", "path": "b2/copy.jpg"},
    ]
    # Manifests without the photo columns (written before they existed): all null.
    assert catalog.schema == catalog_schema() and all(catalog[c].null_count == 3 for c in tables.PHOTO_COLUMNS)
    assert _catalog({}, np.array([], np.int64)).schema == catalog_schema()


def test_recall_within_a_fixed_sample_of_the_database():
    x = ix.normalize_rows(_clustered(n=6000))
    ids = np.arange(len(x)) * 7919 + 11  # spread ids, as hashes are
    index = _flat(x, ids, nlist=32)
    queries = ix.sample_indices(len(x), 200)
    ladder = recall.nprobe_ladder(index.nlist)
    full = recall.evaluate(index, x[queries], ids[queries], lambda: [(ids, x)], nprobes=ladder)
    sampled = recall.evaluate(index, x[queries], ids[queries], lambda: [(ids, x)], nprobes=ladder, max_database=1500)
    assert full.database_fraction == 1.0 and sampled.database_fraction == pytest.approx(0.25)
    assert 0.2 < recall.in_sample(ids, sampled.database_fraction).mean() < 0.3
    assert sampled.curve[-1].recall_at_10 == pytest.approx(1.0)  # every list probed: exact within the sample
    recalls = [p.recall_at_10 for p in sampled.curve]
    assert recalls == sorted(recalls) and recalls[0] < 1.0
    # Neighbours within a sample are farther away, never easier to find than within everything.
    for a, b in zip(sampled.curve, full.curve):
        assert a.recall_at_10 <= b.recall_at_10 + 0.05
    assert sampled.metadata()["recall_database_fraction"] == pytest.approx(0.25)
