"""Moving set-aside images out of the collection, and back: never a deletion, always undoable.

Every file of an image decided *set aside* (:mod:`review`) moves to
``<data dir>/set-aside/<date>/<path under the images root>`` (the path starts with its batch).
An apply writes its journal first (every planned move, in the decisions' database), then moves
file by file: a hard link to the new place, then the old name removed; a file system without
links gets a rename that never replaces a file. A killed apply is finished by the next one (or
rolled back by ``undo``): from the journal and what is on disk, each file is in exactly one
place. The next ingest sees the moved files as removed from their batch, by the ordinary path.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import sqlalchemy as sa

from imgsim_assets.core.review import SET_ASIDE, Decisions, Photos, metadata, now

SET_ASIDE_DIR = "set-aside"
PLANNED, MOVED, RESTORED, FAILED = "planned", "moved", "restored", "failed"
APPLYING, APPLIED, UNDONE = "applying", "applied", "undone"

applies_table = sa.Table(
    "imgsim_applies", metadata,
    sa.Column("apply_id", sa.String(64), primary_key=True),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("applied_by", sa.String(200), nullable=False),
)
moves_table = sa.Table(
    "imgsim_moves", metadata,
    sa.Column("apply_id", sa.String(64), sa.ForeignKey("imgsim_applies.apply_id"), primary_key=True),
    sa.Column("source", sa.Text, primary_key=True),  # under the images root
    sa.Column("target", sa.Text, nullable=False),  # under the data root
    sa.Column("image_id", sa.BigInteger, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("bytes", sa.BigInteger),
)


@dataclass(frozen=True)
class Move:
    image_id: int
    source: str  # path under the images root, as in the manifests
    target: str  # path under the data root
    bytes: int | None = None


@dataclass(frozen=True)
class Place:
    """Where the files live."""

    data_dir: Path
    images_dir: Path

    def source(self, move: Move) -> Path:
        return self.images_dir / move.source

    def target(self, move: Move) -> Path:
        return self.data_dir / move.target


def _inside(relative: str) -> bool:
    """A manifest path that stays inside its root (never '..' or absolute)."""
    parts = Path(relative).parts
    return bool(parts) and not Path(relative).is_absolute() and ".." not in parts


def plan(decisions: Decisions, photos: Photos, place: Place, day: dt.date | None = None) -> list[Move]:
    """Every file of every set-aside image that is still in its batch folder, and where it goes."""
    day = day or dt.date.today()
    moved = moved_sources(decisions)
    out = []
    for image_id, decision in sorted(decisions.of().items()):
        if decision.action != SET_ASIDE:
            continue
        for path in photos.files(image_id):
            if not _inside(path) or path in moved or not place.images_dir.joinpath(path).is_file():
                continue
            out.append(Move(image_id, path, f"{SET_ASIDE_DIR}/{day.isoformat()}/{path}",
                            place.images_dir.joinpath(path).stat().st_size))
    return out


def moved_sources(decisions: Decisions) -> set[str]:
    """Sources that an apply moved (or is moving) and no undo has put back."""
    with decisions.engine.connect() as connection:
        rows = connection.execute(sa.select(moves_table.c.source).where(moves_table.c.state.in_((PLANNED, MOVED)))).all()
    return {r.source for r in rows}


def _move_file(src: Path, dst: Path) -> None:
    """``src`` → ``dst`` without ever replacing a file at ``dst`` (FileExistsError)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK):
            raise
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "already there", str(dst)) from None
        os.rename(src, dst)  # no links here: a rename (checked free just before)
        return
    os.unlink(src)


def _settle(src: Path, dst: Path) -> str:
    """Finish a move the journal says was started: ``MOVED`` once only ``dst`` holds it."""
    if os.path.lexists(dst) and os.path.lexists(src):
        if os.path.samefile(src, dst):  # killed between the link and the unlink
            os.unlink(src)
            return MOVED
        raise FileExistsError(errno.EEXIST, "both the file and another at its set-aside place", str(dst))
    if os.path.lexists(dst):
        return MOVED
    if os.path.lexists(src):
        _move_file(src, dst)
        return MOVED
    raise FileNotFoundError(errno.ENOENT, "gone from its batch and not set aside", str(src))


@dataclass
class Outcome:
    apply_id: str
    moved: int
    failed: list[tuple[str, str]]  # (source, why)


def _mark(connection, apply_id: str, sources: Iterable[str], state: str) -> None:
    sources = list(sources)
    if sources:
        connection.execute(moves_table.update().where(moves_table.c.apply_id == apply_id,
                                                      moves_table.c.source.in_(sources)).values(state=state))


def _run(decisions: Decisions, place: Place, apply_id: str, todo: list[Move], step: Callable[[Move], str],
         done_state: str, final: str, progress=None, commit_every: int = 256) -> Outcome:
    """Run ``step`` on each move, recording its state ``commit_every`` moves at a time (a kill
    loses at most that much bookkeeping, which the next run recovers from the disk)."""
    failed: list[tuple[str, str]] = []
    finished: list[str] = []
    with decisions.engine.connect() as connection:
        for n, move in enumerate(todo, 1):
            try:
                step(move)
                finished.append(move.source)
            except OSError as e:
                failed.append((move.source, f"{type(e).__name__}: {e}"))
            if len(finished) >= commit_every or n == len(todo):
                _mark(connection, apply_id, finished, done_state)
                connection.commit()
                finished = []
            if progress:
                progress(n, len(todo))
        if final == APPLIED:  # a file that could not move stays where it is, and says why
            _mark(connection, apply_id, [source for source, _ in failed], FAILED)
        connection.execute(applies_table.update().where(applies_table.c.apply_id == apply_id)
                           .values(state=final if not failed or final == APPLIED else APPLIED, finished_at=now()))
        connection.commit()
    return Outcome(apply_id, len(todo) - len(failed), failed)


def unfinished(decisions: Decisions) -> list[str]:
    with decisions.engine.connect() as connection:
        return [r.apply_id for r in connection.execute(
            sa.select(applies_table.c.apply_id).where(applies_table.c.state == APPLYING).order_by(applies_table.c.started_at))]


def _moves(decisions: Decisions, apply_id: str, states: tuple[str, ...]) -> list[Move]:
    with decisions.engine.connect() as connection:
        rows = connection.execute(sa.select(moves_table).where(moves_table.c.apply_id == apply_id,
                                                               moves_table.c.state.in_(states))
                                  .order_by(moves_table.c.source)).all()
    return [Move(int(r.image_id), r.source, r.target, r.bytes) for r in rows]


def resume(decisions: Decisions, place: Place, progress=None) -> list[Outcome]:
    """Finish every apply a kill interrupted, from its journal and the disk."""
    return [_run(decisions, place, apply_id, _moves(decisions, apply_id, (PLANNED,)),
                 lambda m: _settle(place.source(m), place.target(m)), MOVED, APPLIED, progress)
            for apply_id in unfinished(decisions)]


def apply(decisions: Decisions, place: Place, moves: list[Move], by: str, progress=None) -> Outcome:
    """Journal ``moves``, then carry them out (see the module's description)."""
    apply_id = f"{now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    with decisions.engine.begin() as connection:
        connection.execute(applies_table.insert(), {"apply_id": apply_id, "started_at": now(), "state": APPLYING,
                                                    "applied_by": by})
        rows = [{"apply_id": apply_id, "source": m.source, "target": m.target, "image_id": m.image_id,
                 "state": PLANNED, "bytes": m.bytes} for m in moves]
        for start in range(0, len(rows), 5000):
            connection.execute(moves_table.insert(), rows[start : start + 5000])
    return _run(decisions, place, apply_id, moves, lambda m: _settle(place.source(m), place.target(m)),
                MOVED, APPLIED, progress)


def _restore(place: Place, move: Move) -> None:
    src, dst = place.source(move), place.target(move)
    if os.path.lexists(src) and not os.path.lexists(dst):
        return  # already back (or never left)
    if os.path.lexists(src) and os.path.samefile(src, dst):
        os.unlink(dst)
        return
    _move_file(dst, src)


def undo(decisions: Decisions, place: Place, apply_ids: list[str] | None = None, by: str = "local",
         progress=None) -> list[Outcome]:
    """Put back every file of ``apply_ids`` (all applies when None), newest first, and make its
    image undecided again, so that the next plan does not move it once more."""
    with decisions.engine.connect() as connection:
        query = sa.select(applies_table.c.apply_id).where(applies_table.c.state.in_((APPLYING, APPLIED)))
        known = [r.apply_id for r in connection.execute(query.order_by(applies_table.c.started_at.desc()))]
    if apply_ids is not None:
        missing = sorted(set(apply_ids) - set(known))
        if missing:
            raise KeyError(f"no apply {missing[0]!r} to undo (see `imgsim duplicates applies`)")
        known = [a for a in known if a in apply_ids]
    outcomes = []
    for apply_id in known:
        todo = _moves(decisions, apply_id, (PLANNED, MOVED))
        outcome = _run(decisions, place, apply_id, todo, lambda m: _restore(place, m), RESTORED, UNDONE, progress)
        stuck = {source for source, _ in outcome.failed}
        restored = {m.image_id for m in todo} - {m.image_id for m in todo if m.source in stuck}
        if restored:
            decisions.decide({i: None for i in restored}, by)
        outcomes.append(outcome)
    return outcomes


def applies(decisions: Decisions) -> list[dict]:
    """Every apply, newest first, with its counts per state."""
    with decisions.engine.connect() as connection:
        rows = connection.execute(sa.select(applies_table).order_by(applies_table.c.started_at.desc())).all()
        counts = connection.execute(sa.select(moves_table.c.apply_id, moves_table.c.state, sa.func.count())
                                    .group_by(moves_table.c.apply_id, moves_table.c.state)).all()
    by_apply: dict[str, dict[str, int]] = {}
    for apply_id, state, n in counts:
        by_apply.setdefault(apply_id, {})[state] = int(n)
    return [{"apply_id": r.apply_id, "state": r.state, "applied_by": r.applied_by,
             "started_at": r.started_at.isoformat(), "finished_at": r.finished_at.isoformat() if r.finished_at else None,
             "files": by_apply.get(r.apply_id, {})} for r in rows]
