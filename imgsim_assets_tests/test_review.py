"""Decisions on duplicate groups, the suggested keeper, and moving set-aside files: on real
SQLite and PostgreSQL databases and real files."""

import datetime as dt
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgsim_assets.core import review as rv
from imgsim_assets.core import setaside as sa_
from imgsim_assets.core.tables import MANIFEST_SCHEMA

UTC = dt.timezone.utc


def _manifest(rows: list[dict]) -> pa.Table:
    fields = [MANIFEST_SCHEMA.field(name) for name in rv.PHOTO_COLUMNS]
    return pa.table({f.name: pa.array([r.get(f.name) for r in rows], f.type) for f in fields})


def _photos(tmp_path, rows, name="b1") -> rv.Photos:
    path = tmp_path / f"{name}.parquet"
    pq.write_table(_manifest(rows), path)
    return rv.Photos.from_manifests([path])


def test_decisions_are_kept_by_image_id_with_who_and_when(tmp_path):
    db = rv.Decisions(f"sqlite:///{tmp_path / 'review.db'}")
    assert db.version() == 0
    db.decide({1: rv.KEEP, 2: rv.SET_ASIDE}, by="alice")
    db.decide({2: rv.KEEP, 3: rv.SET_ASIDE})
    again = rv.Decisions(f"sqlite:///{tmp_path / 'review.db'}")  # another process, later
    found = again.of()
    assert {i: d.action for i, d in found.items()} == {1: rv.KEEP, 2: rv.KEEP, 3: rv.SET_ASIDE}
    assert found[1].decided_by == "alice" and found[3].decided_by == rv.LOCAL
    assert found[1].decided_at.tzinfo is not None and abs(found[1].decided_at - rv.now()) < dt.timedelta(minutes=1)
    db.decide({3: None})  # undecided again
    assert set(again.of([1, 3, 99])) == {1}
    assert again.version() == 3
    with pytest.raises(ValueError, match="unknown decision 'delete'"):
        db.decide({4: "delete"})


def test_postgres_holds_the_same_decisions(postgres_url):
    url = postgres_url.replace("postgresql://", "postgresql+psycopg2://")
    db = rv.Decisions(url)
    db.decide({10: rv.KEEP, 11: rv.SET_ASIDE}, by="bob")
    db.decide({11: rv.KEEP}, by="carol")  # an upsert, not a second row
    db.separate([10, 12, 11])
    found = rv.Decisions(url).of([10, 11])
    assert (found[10].action, found[11].action, found[11].decided_by) == (rv.KEEP, rv.KEEP, "carol")
    a, b = db.separated()
    assert sorted(zip(a.tolist(), b.tolist())) == [(10, 11), (10, 12), (11, 12)]


def test_groups_leave_out_separated_pairs_and_come_largest_first():
    # 1-2-3 chained, 4-5, 6-7-8-9 all pairs; 1-2 separated later.
    a = np.array([1, 2, 4, 6, 6, 6, 7, 7, 8])
    b = np.array([2, 3, 5, 7, 8, 9, 8, 9, 9])
    s = np.array([0.9, 0.95, 0.99, 0.97, 0.96, 0.98, 0.99, 0.97, 0.96], np.float32)
    groups = rv.group_pairs(a, b, s)
    assert [g.tolist() for g in map(groups.of, range(len(groups)))] == [[6, 7, 8, 9], [1, 2, 3], [4, 5]]
    assert groups.score.tolist() == pytest.approx([0.96, 0.9, 0.99]) and groups.best[0] == pytest.approx(0.99)
    apart = rv.group_pairs(a, b, s, separated=(np.array([1]), np.array([2])))
    assert [g.tolist() for g in map(apart.of, range(len(apart)))] == [[6, 7, 8, 9], [4, 5], [2, 3]]


def test_the_keeper_is_chosen_by_the_ordered_rules_unknown_values_losing(tmp_path):
    t = dt.datetime
    rows = [
        {"path": "b1/small.jpg", "image_id": 1, "status": "ok", "width": 100, "height": 100, "bytes": 5,
         "captured_at": t(2020, 1, 1), "modified_at": t(2021, 1, 1, tzinfo=UTC)},
        {"path": "b1/big_late.jpg", "image_id": 2, "status": "ok", "width": 200, "height": 100, "bytes": 9,
         "captured_at": t(2022, 1, 1), "modified_at": t(2020, 1, 1, tzinfo=UTC)},
        {"path": "b1/big_early.jpg", "image_id": 3, "status": "ok", "width": 100, "height": 200, "bytes": 7,
         "captured_at": t(2019, 1, 1), "modified_at": t(2023, 1, 1, tzinfo=UTC)},
        {"path": "b1/big_undated.jpg", "image_id": 4, "status": "ok", "width": 200, "height": 100, "bytes": 8,
         "modified_at": t(2018, 1, 1, tzinfo=UTC)},
        {"path": "b1/broken.jpg", "image_id": 5, "status": "rejected"},
    ]
    photos = _photos(tmp_path, rows)
    members = photos.describe([1, 2, 3, 4])
    assert members[1]["pixels"] == 20000 and members[1]["batch"] == "b1" and members[1]["files"] == ["b1/big_late.jpg"]
    assert rv.KeepRules().keeper(members) == 3  # most pixels (2, 3, 4 tie), then the earliest capture
    assert rv.KeepRules(("most_pixels", "oldest_file")).keeper(members) == 4
    assert rv.KeepRules.parse("earliest_capture").keeper(members) == 3
    assert rv.KeepRules.parse("latest_capture,most_pixels").keeper(members) == 2  # undated 4 never wins on dates
    assert rv.KeepRules.parse("fewest_pixels").keeper(members) == 1
    assert photos.describe([5])[0]["files"] == []  # rejected files are no members
    with pytest.raises(ValueError, match="unknown keep rule 'prettiest'"):
        rv.KeepRules.parse("most_pixels,prettiest")


def _collection(tmp_path, groups=3, size=3):
    """``groups`` groups of ``size`` files each, on disk, with their manifest and pairs."""
    images = tmp_path / "data" / "images"
    rows, a, b, s = [], [], [], []
    for g in range(groups):
        ids = [100 * (g + 1) + m for m in range(size)]
        for m, image_id in enumerate(ids):
            path = f"b{g % 2}/sub/g{g}_{m}.jpg"
            (images / path).parent.mkdir(parents=True, exist_ok=True)
            (images / path).write_bytes(bytes([g, m]) * 10)
            rows.append({"path": path, "image_id": image_id, "status": "ok", "width": 10 * (m + 1), "height": 10,
                         "bytes": 20})
        for i in range(size):
            for j in range(i + 1, size):
                a.append(ids[i])
                b.append(ids[j])
                s.append(0.99 - 0.01 * g)
    pairs = pa.table({"image_id_a": a, "image_id_b": b, "similarity": pa.array(s, pa.float32())})
    return images, _photos(tmp_path, rows), pairs


def test_review_pages_suggests_and_accepts_above_a_score(tmp_path):
    images, photos, pairs = _collection(tmp_path, groups=5)
    db = rv.Decisions(f"sqlite:///{tmp_path / 'review.db'}")
    review = rv.Review.build(pairs, photos, db)
    page, total = review.page(2, 2)
    assert total == 5 and [g.number for g in page] == [2, 3]
    first = review.group(0)
    assert first.keeper == 102 and [m["suggested"] for m in first.members] == [rv.SET_ASIDE, rv.SET_ASIDE, rv.KEEP]
    db.decide({300: rv.KEEP})  # a person's own choice is never overwritten by accepting
    groups, decided = review.accept(min_score=0.965, by="alice")
    assert (groups, decided) == (3, 8)  # groups 0-2 (scores 0.99, 0.98, 0.97), 9 members, 300 already decided
    found = db.of()
    assert found[300].action == rv.KEEP and found[302].action == rv.KEEP and found[301].action == rv.SET_ASIDE
    assert found[102].decided_by == "alice" and 400 not in found
    assert review.page(1, 10, min_score=0.975)[1] == 2
    # "Not duplicates" for group 0: it is gone from the review once rebuilt from the same pairs.
    db.separate([100, 101, 102])
    again = rv.Review.build(pairs, photos, db)
    assert len(again.groups) == 4 and 100 not in again.groups.members


def test_apply_moves_set_aside_files_and_undo_puts_them_back(tmp_path):
    images, photos, pairs = _collection(tmp_path, groups=2)
    data = images.parent
    place = sa_.Place(data, images)
    db = rv.Decisions(f"sqlite:///{data / 'review.db'}")
    db.decide({100: rv.KEEP, 101: rv.SET_ASIDE, 102: rv.SET_ASIDE, 201: rv.SET_ASIDE})
    day = dt.date(2026, 12, 4)
    moves = sa_.plan(db, photos, place, day)
    assert [(m.image_id, m.source, m.target) for m in moves] == [
        (101, "b0/sub/g0_1.jpg", "set-aside/2026-12-04/b0/sub/g0_1.jpg"),
        (102, "b0/sub/g0_2.jpg", "set-aside/2026-12-04/b0/sub/g0_2.jpg"),
        (201, "b1/sub/g1_1.jpg", "set-aside/2026-12-04/b1/sub/g1_1.jpg")]
    before = {p: p.read_bytes() for p in images.rglob("*.jpg")}
    outcome = sa_.apply(db, place, moves, by="alice")
    assert outcome.moved == 3 and not outcome.failed
    for m in moves:
        assert not (images / m.source).exists() and (data / m.target).read_bytes() == before[images / m.source]
    assert sa_.plan(db, photos, place, day) == []  # nothing left to move
    [listed] = sa_.applies(db)
    assert listed["state"] == sa_.APPLIED and listed["files"] == {sa_.MOVED: 3} and listed["applied_by"] == "alice"

    sa_.undo(db, place, [outcome.apply_id])
    assert {p: p.read_bytes() for p in images.rglob("*.jpg")} == before
    assert not list((data / "set-aside").rglob("*.jpg"))
    assert set(db.of()) == {100}  # the restored images are undecided again
    assert sa_.applies(db)[0]["state"] == sa_.UNDONE
    with pytest.raises(KeyError, match="no apply"):
        sa_.undo(db, place, [outcome.apply_id])


def test_a_move_never_replaces_a_file_already_at_its_set_aside_place(tmp_path):
    images, photos, _ = _collection(tmp_path, groups=1)
    place = sa_.Place(images.parent, images)
    db = rv.Decisions(f"sqlite:///{tmp_path / 'review.db'}")
    db.decide({101: rv.SET_ASIDE})
    [move] = sa_.plan(db, photos, place)
    place.target(move).parent.mkdir(parents=True)
    place.target(move).write_bytes(b"someone else's")
    outcome = sa_.apply(db, place, [move], by="local")
    assert outcome.moved == 0 and "both the file and another" in outcome.failed[0][1]
    assert place.source(move).exists() and place.target(move).read_bytes() == b"someone else's"
    assert sa_.applies(db)[0]["files"] == {sa_.FAILED: 1}


APPLY_SLOWLY = """
import sys, time
from imgsim_assets.core import review as rv, setaside as sa_
from pathlib import Path
data = Path(sys.argv[1])
db = rv.Decisions(f"sqlite:///{data / 'review.db'}")
photos = rv.Photos.from_manifests([data / 'manifest.parquet'])
place = sa_.Place(data, data / 'images')
original = sa_._move_file
def slow(src, dst):
    original(src, dst)
    time.sleep(0.01)
sa_._move_file = slow
sa_.apply(db, place, sa_.plan(db, photos, place), by='local', progress=lambda n, total: print(n, flush=True))
"""


def test_a_killed_apply_is_finished_or_undone_with_every_file_in_exactly_one_place(tmp_path):
    data = tmp_path / "data"
    images = data / "images"
    rows = []
    for n in range(400):
        path = f"batch/{n:04d}.jpg"
        (images / path).parent.mkdir(parents=True, exist_ok=True)
        (images / path).write_bytes(n.to_bytes(4, "big"))
        rows.append({"path": path, "image_id": 1000 + n, "status": "ok"})
    pq.write_table(_manifest(rows), data / "manifest.parquet")
    db = rv.Decisions(f"sqlite:///{data / 'review.db'}")
    db.decide({1000 + n: rv.SET_ASIDE for n in range(400)})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-c", APPLY_SLOWLY, str(data)], stdout=subprocess.PIPE, text=True, env=env)
    for line in child.stdout:  # kill it half-way through the moves
        if int(line) >= 150:
            os.kill(child.pid, signal.SIGKILL)
            break
    child.wait()
    assert child.returncode == -signal.SIGKILL

    place = sa_.Place(data, images)

    def where():
        out = {}
        for n in range(400):
            at_source = (images / f"batch/{n:04d}.jpg").exists()
            aside = list((data / "set-aside").glob(f"*/batch/{n:04d}.jpg"))
            assert at_source + len(aside) == 1, n  # in exactly one place
            out[n] = "source" if at_source else "aside"
        return out

    placed = where()
    assert 150 <= sum(v == "aside" for v in placed.values()) < 400
    [journal] = sa_.applies(db)
    assert journal["state"] == sa_.APPLYING and sum(journal["files"].values()) == 400  # written before any move
    # The journal's "moved" are aside; what it still calls planned may be either (its last
    # bookkeeping was lost with the process), and nothing it does not know of moved.
    with db.engine.connect() as c:
        states = dict(c.execute(pa_select_moves()).all())
    assert all(placed[int(Path(s).stem)] == "aside" for s, st in states.items() if st == sa_.MOVED)

    # Undo rolls back the interrupted apply: everything is in place again.
    sa_.undo(db, place)
    assert set(where().values()) == {"source"}
    assert all(images.joinpath(f"batch/{n:04d}.jpg").read_bytes() == n.to_bytes(4, "big") for n in range(400))

    # Killed again, then resumed by the next apply: everything is aside.
    db.decide({1000 + n: rv.SET_ASIDE for n in range(400)})
    child = subprocess.Popen([sys.executable, "-c", APPLY_SLOWLY, str(data)], stdout=subprocess.PIPE, text=True, env=env)
    for line in child.stdout:
        if int(line) >= 100:
            os.kill(child.pid, signal.SIGKILL)
            break
    child.wait()
    [outcome] = sa_.resume(db, place)
    assert not outcome.failed
    assert set(where().values()) == {"aside"}
    assert sa_.applies(db)[0]["state"] == sa_.APPLIED


def pa_select_moves():
    import sqlalchemy

    return sqlalchemy.select(sa_.moves_table.c.source, sa_.moves_table.c.state)


def test_the_cli_lists_accepts_plans_applies_exports_and_undoes(tmp_path, monkeypatch, capsys):
    from imgsim_assets import cli

    images, _, pairs = _collection(tmp_path, groups=2)
    data = images.parent
    (data / "assets" / "raw_images").mkdir(parents=True)
    (tmp_path / "b1.parquet").rename(data / "assets" / "raw_images" / "b1.parquet")
    pq.write_table(pairs, data / "assets" / "near_duplicates.parquet")
    monkeypatch.setenv("IMGSIM_DATA_DIR", str(data))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))

    assert cli.main(["duplicates", "list"]) == 0
    out = capsys.readouterr().out
    assert "group 0: 3 images, every pair >= 0.9900" in out and "*                  102  undecided" in out
    assert cli.main(["duplicates", "accept", "--min-score", "0.985"]) == 0
    assert "for 1 groups: 3 images decided" in capsys.readouterr().out
    assert cli.main(["duplicates", "plan"]) == 0
    out = capsys.readouterr().out
    assert out.count("would move b0/sub/") == 2 and "2 files (0.0 MiB) would move; nothing moved" in out and not list(data.glob("set-aside/*/*"))
    assert cli.main(["duplicates", "apply"]) == 0
    assert sorted(p.name for p in data.glob("set-aside/*/b0/sub/*")) == ["g0_0.jpg", "g0_1.jpg"]
    assert cli.main(["duplicates", "export", "--format", "csv", "-o", str(tmp_path / "d.csv")]) == 0
    rows = (tmp_path / "d.csv").read_text().splitlines()
    assert rows[0].startswith("group,group_size,group_score,image_id") and len(rows) == 1 + 6
    assert sum(",set_aside,set_aside," in r for r in rows) == 2
    assert cli.main(["duplicates", "undo", "--all"]) == 0
    assert (images / "b0/sub/g0_0.jpg").exists() and not list(data.glob("set-aside/*/b0/sub/*"))
    assert cli.main(["duplicates", "undo"]) == 2  # neither an id nor --all
