"""core.search.Searcher over a materialized index: files, ids, vectors, batch filters, one encoder."""

import numpy as np
import pytest

from imgsim_assets.core.filters import Filters, FilterUnavailable
from imgsim_assets.core.sample_data import write_synthetic_batch
from imgsim_assets.core.search import FaissSearcher, UnknownImage
from imgsim_assets.ingest import ingest
from imgsim_assets_tests.test_pipeline import pipeline  # noqa: F401  (fixture)


def test_searcher_answers_files_ids_and_vectors_with_one_encoder(pipeline, tmp_path):  # noqa: F811
    settings, defs, instance = pipeline
    first = write_synthetic_batch(settings.images_dir / "b1", 12, seed=1)
    write_synthetic_batch(settings.images_dir / "b2", 12, seed=2)
    assert ingest(defs, instance, settings.images_dir, log=lambda m: None).ok

    searcher = FaissSearcher.open(settings.assets_dir, device="cpu")
    assert searcher.num_vectors == 24 and searcher.random_weights
    junk = tmp_path / "junk.jpg"
    junk.write_text("not a picture")
    answers = searcher.search_files([first[3], junk], k=3)
    assert [a.ok for a in answers] == [True, False] and answers[1].record.reason == "not_an_image"
    assert answers[1].hits == []
    top = answers[0].hits[0]
    assert top.path == f"b1/{first[3].name}" and top.rank == 1 and top.inner_product == pytest.approx(1.0, abs=1e-4)
    encoder = searcher.encoder
    assert searcher.encoder is encoder  # loaded once

    # By id: the stored raw embedding is the query, so the image is its own first neighbour.
    by_id = searcher.search_ids([top.image_id], k=24)[0]
    assert by_id[0].image_id == top.image_id and len(by_id) == 24
    only_b2 = searcher.search_ids([top.image_id], k=24, batches=["b2"])[0]
    assert len(only_b2) == 12 and {h.batch for h in only_b2} == {"b2"}
    with pytest.raises(UnknownImage, match="image_id 12345 is not in the index"):
        searcher.search_ids([12345])
    with pytest.raises(ValueError, match="no indexed batch named 'b9'"):
        searcher.search_ids([top.image_id], batches=["b9"])

    # By vectors: the same answer as by file.
    vectors = searcher.vectors_of([top.image_id])
    assert vectors.shape == (1, encoder.spec.dim)
    assert [h.image_id for h in searcher.search(vectors, k=5)[0]] == [h.image_id for h in by_id[:5]]
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_the_faiss_and_milvus_searchers_answer_what_the_service_asks_alike(pipeline):  # noqa: F811
    from imgsim_assets.core import milvus
    from imgsim_assets.core.search import MilvusSearcher

    settings, defs, instance = pipeline
    write_synthetic_batch(settings.images_dir / "b1", 5, seed=1)
    write_synthetic_batch(settings.images_dir / "b2", 7, seed=2)
    assert ingest(defs, instance, settings.images_dir, log=lambda m: None, milvus=True).ok

    faiss_searcher = FaissSearcher.open(settings.assets_dir, device="cpu")
    milvus_searcher = MilvusSearcher(milvus.connect(settings.milvus), "imgsim", device="cpu")
    for searcher in (faiss_searcher, milvus_searcher):
        assert searcher.batch_sizes() == {"b1": 5, "b2": 7}
        searcher.check_batches(["b2", "b1"])
        with pytest.raises(ValueError, match="no indexed batch named 'b9'"):
            searcher.check_batches(["b1", "b9"])
        assert searcher.info["encoder"]["model"] == searcher.encoder_info["model"] == "dinov2_vits14"
    assert faiss_searcher.info["factory"] == "PCA11,L2norm,Flat"  # the index's own info
    photo = Filters.parse(camera="canon")
    faiss_searcher.check_filters(photo)  # synthetic pictures hold no EXIF: nothing passes, but it filters
    assert faiss_searcher.search_ids([faiss_searcher.index.image_ids[0]], k=5, filters=photo) == [[]]
    with pytest.raises(FilterUnavailable, match="Milvus collection holds no photo metadata"):
        milvus_searcher.check_filters(photo)
    with pytest.raises(FilterUnavailable):
        milvus_searcher.search(np.zeros((1, 384), np.float32), k=5, filters=photo)

    faiss_searcher.warm()
    loaded = faiss_searcher._encoder
    assert loaded is not None and faiss_searcher.index._direct_map  # the model and the id → vector map, now
    again = FaissSearcher.open(settings.assets_dir, device="cpu")
    again.warm(previous=faiss_searcher)
    assert again.encoder is loaded  # the same model: taken over, not loaded twice
    milvus_searcher.warm()
    assert milvus_searcher._encoder is not None
    for searcher in (faiss_searcher, milvus_searcher):  # the model loaded here, said as the index says its own
        query_encoder = searcher.query_encoder
        assert query_encoder["weights_fingerprint"] == searcher.encoder_info["weights_fingerprint"]
        assert query_encoder["model"] == "dinov2_vits14" and query_encoder["dtype"] == "float32"
