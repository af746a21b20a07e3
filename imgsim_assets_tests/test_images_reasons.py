"""Rejection reasons: documented in the README, carried by one exception."""

from pathlib import Path

from imgsim_assets.core import images


def test_every_reason_is_documented():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert [r for r in images.REASONS if f"| `{r}` |" not in readme] == []



def test_a_rejection_carries_its_reason_and_a_text_message():
    rejected = images.Rejected(images.OUTSIDE_ROOT, "links to /srv/caf\udce9.png, outside /data")
    assert (rejected.reason, rejected.message) == (images.OUTSIDE_ROOT, "links to /srv/caf\\xe9.png, outside /data")
    assert str(rejected) == rejected.message
    record = images.ImageRecord(path="x.png").reject(rejected)
    assert (record.status, record.reason, record.message) == (images.REJECTED, rejected.reason, rejected.message)
