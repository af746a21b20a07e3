"""Acting on near-duplicate groups: what people decided, and which copy to keep.

- :class:`Decisions`: per image_id, *keep* or *set aside*; per pair of images, *not duplicates*
  (never grouped again); each with when and by whom. A real database through SQLAlchemy:
  SQLite in the data folder, or the Dagster instance's Postgres (tables prefixed ``imgsim_``).
  Keyed by content (image_id), so a decision outlives re-ingests, renames and regroupings; never
  in an artifact that a rerun rewrites.
- :class:`Photos`: what the manifests say of every image: its files, size, capture time, camera.
- :class:`KeepRules`: the ordered rules that suggest which member of a group to keep.
- :class:`Review`: the groups of ``near_duplicates`` without the pairs people separated, largest
  first, paged without looking at more than the page.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import sqlalchemy as sa

from imgsim_assets.core import duplicates, tables

KEEP, SET_ASIDE = "keep", "set_aside"
GROUPING_KEY = b"imgsim.grouping"  # near_duplicates' Parquet metadata: the rule its groups were made by
ACTIONS = (KEEP, SET_ASIDE)
LOCAL = "local"  # who decided, when no token names someone

metadata = sa.MetaData()
decisions_table = sa.Table(
    "imgsim_decisions", metadata,
    sa.Column("image_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("decided_by", sa.String(200), nullable=False),
)
separations_table = sa.Table(
    "imgsim_separations", metadata,
    sa.Column("image_id_a", sa.BigInteger, primary_key=True, autoincrement=False),  # the smaller id
    sa.Column("image_id_b", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("decided_by", sa.String(200), nullable=False),
)
# Every change, in order: what the version of the decisions counts.
changes_table = sa.Table(
    "imgsim_decision_changes", metadata,
    sa.Column("change", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("count", sa.Integer, nullable=False),
    sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("decided_by", sa.String(200), nullable=False),
)


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def engine_for(url: str) -> sa.Engine:
    """An engine on ``url`` (an SQLAlchemy URL); an SQLite file waits for a writer instead of
    failing, and its folder is created."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return sa.create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": 30})

    @sa.event.listens_for(engine, "connect")
    def _wal(connection, _record):  # readers do not block the one writer
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")

    return engine


def upsert(connection: sa.Connection, table: sa.Table, rows: list[dict], keys: Sequence[str]) -> None:
    """Insert ``rows``, replacing the rows with the same ``keys``."""
    if not rows:
        return
    dialect = connection.dialect.name
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        raise ValueError(f"decisions need SQLite or PostgreSQL, not {dialect}")
    statement = insert(table)
    others = {c.name: statement.excluded[c.name] for c in table.columns if c.name not in keys}
    for start in range(0, len(rows), 5000):
        connection.execute(statement.on_conflict_do_update(index_elements=list(keys), set_=others), rows[start : start + 5000])


@dataclass(frozen=True)
class Decision:
    action: str
    decided_at: dt.datetime
    decided_by: str


class Decisions:
    """Keep / set aside per image_id and "not duplicates" per pair, in a database."""

    def __init__(self, url_or_engine: str | sa.Engine) -> None:
        self.engine = engine_for(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
        try:
            metadata.create_all(self.engine)
        except (sa.exc.OperationalError, sa.exc.IntegrityError, sa.exc.ProgrammingError):
            metadata.create_all(self.engine)  # another process created the tables meanwhile: they are there now

    def _changed(self, connection, kind: str, count: int, by: str, when: dt.datetime) -> None:
        connection.execute(changes_table.insert(), {"kind": kind, "count": count, "decided_at": when, "decided_by": by})

    def decide(self, choices: dict[int, str | None], by: str = LOCAL) -> int:
        """Record ``image_id → keep | set_aside`` (None: undecided again); how many changed."""
        bad = {a for a in choices.values() if a is not None and a not in ACTIONS}
        if bad:
            raise ValueError(f"unknown decision {sorted(bad)[0]!r}; choose {', '.join(ACTIONS)} or none")
        when = now()
        rows = [{"image_id": int(i), "action": a, "decided_at": when, "decided_by": by} for i, a in choices.items() if a]
        cleared = [int(i) for i, a in choices.items() if not a]
        with self.engine.begin() as connection:
            upsert(connection, decisions_table, rows, ["image_id"])
            for start in range(0, len(cleared), 5000):
                connection.execute(decisions_table.delete().where(decisions_table.c.image_id.in_(cleared[start : start + 5000])))
            self._changed(connection, "decide", len(choices), by, when)
        return len(choices)

    def separate(self, image_ids: Iterable[int], by: str = LOCAL) -> int:
        """"Not duplicates": every pair of ``image_ids`` is never grouped again; how many pairs."""
        ids = sorted({int(i) for i in image_ids})
        if len(ids) < 2:
            raise ValueError("not duplicates needs two images or more")
        when = now()
        rows = [{"image_id_a": a, "image_id_b": b, "decided_at": when, "decided_by": by}
                for n, a in enumerate(ids) for b in ids[n + 1 :]]
        with self.engine.begin() as connection:
            upsert(connection, separations_table, rows, ["image_id_a", "image_id_b"])
            self._changed(connection, "separate", len(rows), by, when)
        return len(rows)

    def of(self, image_ids: Sequence[int] | None = None) -> dict[int, Decision]:
        """The decision of each of ``image_ids`` that has one (all of them when None)."""
        query = sa.select(decisions_table)
        out: dict[int, Decision] = {}
        with self.engine.connect() as connection:
            if image_ids is None:
                rows = connection.execute(query).all()
            else:
                ids = [int(i) for i in image_ids]
                rows = [r for s in range(0, len(ids), 5000)
                        for r in connection.execute(query.where(decisions_table.c.image_id.in_(ids[s : s + 5000]))).all()]
        for r in rows:
            out[int(r.image_id)] = Decision(r.action, _aware(r.decided_at), r.decided_by)
        return out

    def separated(self) -> tuple[np.ndarray, np.ndarray]:
        """Every separated pair, as (smaller ids, larger ids)."""
        with self.engine.connect() as connection:
            rows = connection.execute(sa.select(separations_table.c.image_id_a, separations_table.c.image_id_b)).all()
        pairs = np.array(rows, dtype=np.int64).reshape(-1, 2)
        return pairs[:, 0], pairs[:, 1]

    def version(self, kind: str | None = None) -> int:
        """Grows with every change (of ``kind``, ``decide`` or ``separate``, when given): what a
        cache of groups and decisions is keyed by."""
        query = sa.select(sa.func.max(changes_table.c.change))
        if kind is not None:
            query = query.where(changes_table.c.kind == kind)
        with self.engine.connect() as connection:
            return int(connection.execute(query).scalar() or 0)


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)  # SQLite keeps no zone


# --- what the manifests say of each image ---------------------------------------------------

PHOTO_COLUMNS = ("path", "image_id", "status", "bytes", *tables.PHOTO_COLUMNS)  # what the review reads of a manifest


def read_manifests(paths: Iterable[str | Path]) -> pa.Table:
    """The ok rows of the given ``raw_images`` manifests, with :data:`PHOTO_COLUMNS` (nulls where a
    manifest written before a column existed lacks it), sorted by image_id then path."""
    empty = pa.schema([tables.MANIFEST_SCHEMA.field(name) for name in PHOTO_COLUMNS]).empty_table()
    read = [tables.manifest_columns(pq.ParquetFile(path), PHOTO_COLUMNS) for path in paths]
    table = pa.concat_tables([empty, *read])
    table = table.filter(pc.equal(table.column("status"), "ok"))
    return table.sort_by([("image_id", "ascending"), ("path", "ascending")])


class Photos:
    """Per image_id: every file (path under the images root) and the first file's metadata."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table.combine_chunks()  # one chunk: a row is found in constant time
        self.ids = self.table.column("image_id").to_numpy()
        self.paths = self.table.column("path").to_pylist()

    @classmethod
    def from_manifests(cls, paths: Iterable[str | Path]) -> "Photos":
        return cls(read_manifests(paths))

    def _rows(self, image_id: int) -> tuple[int, int]:
        lo, hi = np.searchsorted(self.ids, [image_id, image_id + 1])
        return int(lo), int(hi)

    def files(self, image_id: int) -> list[str]:
        lo, hi = self._rows(image_id)
        return self.paths[lo:hi]

    def describe(self, image_ids: Sequence[int]) -> list[dict]:
        """One dict per image: ``image_id``, ``path`` (its first file), ``batch``, ``files`` and
        the metadata columns (None where unknown)."""
        out = []
        for image_id in image_ids:
            lo, hi = self._rows(int(image_id))
            if lo == hi:
                out.append({"image_id": int(image_id), "path": None, "batch": None, "files": [], "copies": 0})
                continue
            row = {name: self.table.column(name)[lo].as_py() for name in PHOTO_COLUMNS if name not in ("status",)}
            row["batch"] = row["path"].split("/", 1)[0]
            row["files"] = self.paths[lo:hi]
            row["copies"] = hi - lo
            out.append(row)
        return out


@dataclass(frozen=True)
class KeepRules:
    """Which member of a group to keep: the first rule that tells two members apart decides; the
    lowest image_id settles a full tie. Unknown values (no EXIF date, say) lose to known ones."""

    rules: tuple[str, ...] = ("most_pixels", "earliest_capture", "oldest_file")

    # rule → (field, direction): 1 smallest first, -1 largest first
    KNOWN = {
        "most_pixels": ("pixels", -1), "fewest_pixels": ("pixels", 1),
        "earliest_capture": ("captured_at", 1), "latest_capture": ("captured_at", -1),
        "oldest_file": ("modified_at", 1), "newest_file": ("modified_at", -1),
        "largest_file": ("bytes", -1), "smallest_file": ("bytes", 1),
        "shortest_path": ("path_length", 1),
    }

    def __post_init__(self) -> None:
        unknown = [r for r in self.rules if r not in self.KNOWN]
        if unknown:
            raise ValueError(f"unknown keep rule {unknown[0]!r}; choose from {', '.join(self.KNOWN)}")

    @classmethod
    def parse(cls, text: str) -> "KeepRules":
        return cls(tuple(r.strip() for r in text.split(",") if r.strip())) if text.strip() else cls()

    def key(self, member: dict):
        out = []
        for rule in self.rules:
            name, direction = self.KNOWN[rule]
            value = len(member.get("path") or "") if name == "path_length" else member.get(name)
            if isinstance(value, dt.datetime):
                value = (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).timestamp()
            out.append((1, 0.0) if value is None else (0, direction * float(value)))
        return (*out, member["image_id"])

    def keeper(self, members: Sequence[dict]) -> int:
        return min(members, key=self.key)["image_id"]


# --- groups ----------------------------------------------------------------------------------

@dataclass
class Groups:
    """Near-duplicate groups as arrays: group ``g``'s members are ``members[starts[g]:starts[g+1]]``."""

    members: np.ndarray  # image_ids, group by group
    starts: np.ndarray
    score: np.ndarray  # per group: its lowest pair similarity (every pair at least this similar)
    best: np.ndarray  # per group: its highest pair similarity

    def __len__(self) -> int:
        return len(self.score)

    def of(self, g: int) -> np.ndarray:
        return self.members[self.starts[g] : self.starts[g + 1]]

    def sizes(self) -> np.ndarray:
        return np.diff(self.starts)


def group_pairs(a: np.ndarray, b: np.ndarray, sims: np.ndarray, rule: str = "connected",
                separated: tuple[np.ndarray, np.ndarray] | None = None) -> Groups:
    """Group the pairs ``a[i]–b[i]`` (smaller id first) by ``rule`` (see :mod:`duplicates`) after
    removing the ``separated`` pairs; groups largest first, then most similar, then lowest id.
    A group's scores are over the pairs inside it."""
    a, b, sims = np.asarray(a, np.int64), np.asarray(b, np.int64), np.asarray(sims, np.float32)
    if separated is not None and len(separated[0]) and len(a):
        apart = separated_mask(a, b, *separated)
        a, b, sims = a[~apart], b[~apart], sims[~apart]
    labels = duplicates.RULES[rule](a, b, sims)
    if not labels:
        return Groups(np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32))
    ids = np.fromiter(labels.keys(), np.int64, len(labels))
    group = np.fromiter(labels.values(), np.int64, len(labels))
    order = np.argsort(ids)
    ids, group = ids[order], group[order]
    ga, gb = _group_of(ids, group, a), _group_of(ids, group, b)
    inside = (ga >= 0) & (ga == gb)
    n = int(group.max()) + 1
    low = np.full(n, np.inf, np.float32)
    high = np.full(n, -np.inf, np.float32)
    np.minimum.at(low, ga[inside], sims[inside])
    np.maximum.at(high, ga[inside], sims[inside])
    sizes = np.bincount(group, minlength=n)
    first = np.full(n, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(first, group, ids)
    rank = np.lexsort((first, -low, -sizes))  # group numbers in review order
    position = np.empty(n, np.int64)
    position[rank] = np.arange(n)
    by = np.lexsort((ids, position[group]))
    starts = np.concatenate(([0], np.cumsum(sizes[rank])))
    return Groups(ids[by], starts, low[rank], high[rank])


def _group_of(ids: np.ndarray, group: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """The group of each of ``wanted`` (ids sorted), -1 for one in none."""
    pos = np.searchsorted(ids, wanted).clip(0, len(ids) - 1)
    return np.where(ids[pos] == wanted, group[pos], -1)


def separated_mask(a: np.ndarray, b: np.ndarray, sep_a: np.ndarray, sep_b: np.ndarray) -> np.ndarray:
    """Whether each pair ``a[i]–b[i]`` is one of the separated pairs ``sep_a[j]–sep_b[j]``."""
    out = np.zeros(len(a), bool)
    candidates = np.flatnonzero(np.isin(a, sep_a) & np.isin(b, sep_b))
    if len(candidates):
        apart = set(zip(sep_a.tolist(), sep_b.tolist()))
        out[candidates] = [(x, y) in apart for x, y in zip(a[candidates].tolist(), b[candidates].tolist())]
    return out


@dataclass
class ReviewGroup:
    number: int  # 0 = the largest
    score: float
    best: float
    members: list[dict]  # Photos.describe + decision, decided_by, decided_at, suggested
    keeper: int  # suggested

    def to_dict(self) -> dict:
        return {"group": self.number, "size": len(self.members), "score": _round(self.score),
                "max_similarity": _round(self.best), "suggested_keeper": self.keeper,
                "members": [_jsonable(m) for m in self.members]}


def _round(x: float) -> float | None:
    return round(float(x), 6) if math.isfinite(x) else None


def _jsonable(member: dict) -> dict:
    return {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in member.items()}


@dataclass
class Review:
    """The groups a person reviews: ``near_duplicates`` regrouped without separated pairs, with
    every member's metadata, decision and the suggested action."""

    groups: Groups
    photos: Photos
    decisions: Decisions
    rules: KeepRules = field(default_factory=KeepRules)

    @classmethod
    def build(cls, pairs: pa.Table | None, photos: Photos, decisions: Decisions, rule: str = "connected",
              rules: KeepRules | None = None) -> "Review":
        """From the ``near_duplicates`` table (None: not materialized) and the decisions as they are."""
        if pairs is None or not pairs.num_rows:
            a = b = np.zeros(0, np.int64)
            sims = np.zeros(0, np.float32)
        else:
            a, b, sims = (pairs.column(c).to_numpy() for c in ("image_id_a", "image_id_b", "similarity"))
        groups = group_pairs(a, b, sims, rule, decisions.separated())
        return cls(groups, photos, decisions, rules or KeepRules())

    def group(self, g: int, decided: dict[int, Decision] | None = None) -> ReviewGroup:
        ids = self.groups.of(g)
        members = self.photos.describe(ids)
        keeper = self.rules.keeper(members)
        decided = self.decisions.of(ids) if decided is None else decided
        for m in members:
            d = decided.get(m["image_id"])
            m["suggested"] = KEEP if m["image_id"] == keeper else SET_ASIDE
            m["decision"] = d.action if d else None
            m["decided_by"] = d.decided_by if d else None
            m["decided_at"] = d.decided_at if d else None
        return ReviewGroup(g, float(self.groups.score[g]), float(self.groups.best[g]), members, keeper)

    def page(self, page: int, per_page: int, min_score: float | None = None) -> tuple[list[ReviewGroup], int]:
        """Groups ``(page-1)*per_page ...`` in review order (only those whose every pair reaches
        ``min_score``), and how many there are; reads the decisions of this page's members only."""
        numbers = np.arange(len(self.groups)) if min_score is None else np.flatnonzero(self.groups.score >= min_score)
        shown = numbers[(page - 1) * per_page : page * per_page]
        ids = np.concatenate([self.groups.of(int(g)) for g in shown]) if len(shown) else np.zeros(0, np.int64)
        decided = self.decisions.of(ids.tolist())
        return [self.group(int(g), decided) for g in shown], len(numbers)

    def accept(self, min_score: float, by: str = LOCAL, overwrite: bool = False) -> tuple[int, int]:
        """Take the suggestion (keep the suggested keeper, set the others aside) for every group
        whose every pair is at least ``min_score`` similar; members already decided keep their
        decision unless ``overwrite``. (groups, images) decided."""
        numbers = np.flatnonzero(self.groups.score >= min_score)
        ids = np.concatenate([self.groups.of(int(g)) for g in numbers]) if len(numbers) else np.zeros(0, np.int64)
        decided = {} if overwrite else self.decisions.of(ids.tolist())
        choices: dict[int, str] = {}
        for g in numbers:
            members = self.photos.describe(self.groups.of(int(g)))
            keeper = self.rules.keeper(members)
            for m in members:
                if m["image_id"] not in decided:
                    choices[m["image_id"]] = KEEP if m["image_id"] == keeper else SET_ASIDE
        self.decisions.decide(choices, by)
        return len(numbers), len(choices)


def grouping_of(pairs: pa.Table | None) -> str:
    """The rule ``near_duplicates`` grouped by (``connected`` for a table that does not say)."""
    rule = ((pairs.schema.metadata or {}).get(GROUPING_KEY) or b"connected").decode() if pairs is not None else ""
    return rule if rule in duplicates.RULES else "connected"


def manifest_files(assets_dir: str | Path) -> list[Path]:
    """Every batch's ``raw_images`` manifest."""
    return sorted((Path(assets_dir) / "raw_images").glob("*.parquet"))


def load(assets_dir: str | Path, decisions: Decisions, rules: KeepRules | None = None) -> Review:
    """The review of the artifacts under ``assets_dir`` as they are now."""
    path = Path(assets_dir) / "near_duplicates.parquet"
    pairs = pq.read_table(path) if path.exists() else None
    return Review.build(pairs, Photos.from_manifests(manifest_files(assets_dir)), decisions, grouping_of(pairs), rules)


# --- export ----------------------------------------------------------------------------------

EXPORT_FIELDS = ("group", "group_size", "group_score", "image_id", "path", "batch", "copies", "width", "height",
                 "pixels", "bytes", "captured_at", "capture_offset", "camera_make", "camera_model", "gps_latitude",
                 "gps_longitude", "modified_at", "suggested", "decision", "decided_by", "decided_at")


def export_rows(review: Review) -> Iterable[dict]:
    """One row per member of every group, in review order."""
    decided = review.decisions.of()
    for g in range(len(review.groups)):
        group = review.group(g, decided)
        for m in group.members:
            yield {"group": g, "group_size": len(group.members), "group_score": _round(group.score),
                   **{k: m.get(k) for k in EXPORT_FIELDS[3:]}}


def export_csv(review: Review) -> str:
    import csv
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, EXPORT_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in export_rows(review):
        writer.writerow({k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in row.items()})
    return out.getvalue()


def export_json(review: Review) -> str:
    import json

    decided = review.decisions.of()
    groups = [review.group(g, decided).to_dict() for g in range(len(review.groups))]
    return json.dumps({"groups": groups, "keep_rules": list(review.rules.rules)}, indent=1)
