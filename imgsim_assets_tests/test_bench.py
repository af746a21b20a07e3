"""The GPU benchmark script is prepared here and run where a GPU is lent: keep it working on CPU."""

from bench import hostile, throughput


def test_throughput_bench_runs_both_decoders_on_cpu(tmp_path, capsys):
    results = throughput.main(
        ["--device", "cpu", "--models", "dinov2_vits14", "--depth", "1", "--images", "6", "--batch-size", "4",
         "--dir", str(tmp_path)]
    )
    assert set(results) == {("dinov2_vits14", "workers"), ("dinov2_vits14", "nvjpeg")}
    assert all(rate > 0 for rate in results.values())
    out = capsys.readouterr().out
    assert "files -> vectors, workers decode" in out and "files -> vectors, nvjpeg decode" in out


def test_device_decode_gives_the_pixels_of_the_pillow_path(tmp_path):
    import numpy as np
    import torch

    from bench._common import write_photos
    from imgsim_assets.core.images import Preprocess, preprocess_file

    paths = write_photos(tmp_path, per_size=4, sizes=((1280, 960),))  # the 4th is stored rotated (EXIF 6)
    pre = Preprocess()
    (batch,) = throughput.device_batches(paths, pre, torch.device("cpu"), batch_size=4)
    for path, pixels in zip(paths, batch.numpy()):
        _, expected = preprocess_file(path, tmp_path, pre)
        assert pixels.shape == expected.shape
        assert np.abs(pixels.astype(int) - expected.astype(int)).mean() < 2.0


def test_hostile_bench_accounts_for_every_variant(capsys):
    outcomes, escaped = hostile.main(["--variants", "300", "--seed", "3"])
    assert not escaped and sum(outcomes.values()) == 300
    assert outcomes["ok"] and outcomes["truncated"] and outcomes["not_an_image"]  # the damage is varied
    assert "exceptions escaped           0" in capsys.readouterr().out
