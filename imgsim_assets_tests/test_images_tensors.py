"""The preprocessed pixel tensors, written to Parquet and streamed back (core.tables)."""

import numpy as np


def test_pixel_tensors_stream_in_bounded_memory(tmp_path):
    import pyarrow as pa

    from imgsim_assets.core import tables

    path = tmp_path / "tensors.parquet"
    rng = np.random.default_rng(0)
    with tables.TensorWriter(path, 56, 56, {}, rows_per_group=8) as writer:
        for i in range(960):  # 120 row groups, 27 MB of pixels
            writer.add(i, rng.integers(0, 256, (3, 56, 56), dtype=np.uint8))
    before, peak, seen = pa.total_allocated_bytes(), 0, []
    for ids, pixels in tables.iter_tensor_batches(tables.open_stream(path), 8):
        peak = max(peak, pa.total_allocated_bytes() - before)
        seen.extend(ids.tolist())
    assert seen == list(range(960))
    assert peak < 2 * 2**20, f"reading held {peak / 2**20:.1f} MB"
