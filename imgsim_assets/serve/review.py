"""The duplicate review over HTTP: groups with their metadata and suggestions, decisions, "not
duplicates", bulk acceptance, and the set-aside moves (plan, apply, undo, export).

Reads are paged from a :class:`core.review.Review` rebuilt only when ``near_duplicates``, a
manifest or the separations change. Writes take a JSON body (so a page of another site cannot
post a form here), from this origin only, and from loopback unless the service has a token.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from imgsim_assets.core import review as rv
from imgsim_assets.core import setaside
from imgsim_assets.core.storage import artifact_path
from imgsim_assets.serve.http import ApiError, _float_param, _int_param, is_loopback

class ReviewService:
    """The handlers of ``/duplicates...``."""

    def __init__(self, service, database_url: str, rules: rv.KeepRules) -> None:
        self.service = service
        self.config = service.config
        self.decisions = rv.Decisions(database_url)
        self.rules = rules
        self.place = setaside.Place(self.config.assets_dir.parent, self.config.images_dir)
        self._lock = threading.Lock()
        self._cached: tuple[tuple, rv.Review] | None = None

    # --- reading ---------------------------------------------------------------------------

    def current(self) -> rv.Review:
        """The review as of now: rebuilt when its inputs changed, else the cached one."""
        manifests = rv.manifest_files(self.config.assets_dir)
        pairs_file = artifact_path(self.config.assets_dir, "near_duplicates", suffix=".parquet")
        key = (_mtime(pairs_file), tuple((p.name, _mtime(p)) for p in manifests), self.decisions.version("separate"))
        with self._lock:
            if self._cached is None or self._cached[0] != key:
                pairs = self.service.live.table("near_duplicates", lambda t: t)
                photos = rv.Photos.from_manifests(manifests)
                self._cached = (key, rv.Review.build(pairs, photos, self.decisions, rv.grouping_of(pairs), self.rules))
            return self._cached[1]

    async def groups(self, request: Request) -> JSONResponse:
        """Groups to review, largest first: GET /duplicates?page=P&per_page=N[&min_score=S]."""
        page, per_page = _int_param(request, "page", 1, 1, 1 << 30), _int_param(request, "per_page", 20, 1, 200)
        min_score = _float_param(request, "min_score")

        def answer():
            review = self.current()
            shown, total = review.page(page, per_page, min_score)
            return {"groups": [g.to_dict() for g in shown], "page": page, "per_page": per_page,
                    "total_groups": total, "keep_rules": list(self.rules.rules)}

        return JSONResponse(await asyncio.to_thread(answer))

    async def plan(self, request: Request) -> JSONResponse:
        """What an apply would move now: GET /duplicates/plan."""
        def answer():
            moves = setaside.plan(self.decisions, self.current().photos, self.place)
            return {"moves": [m.__dict__ for m in moves], "files": len(moves),
                    "bytes": sum(m.bytes or 0 for m in moves)}

        return JSONResponse(await asyncio.to_thread(answer))

    async def applies(self, request: Request) -> JSONResponse:
        """Every apply, newest first: GET /duplicates/applies."""
        return JSONResponse({"applies": await asyncio.to_thread(setaside.applies, self.decisions)})

    async def export(self, request: Request) -> Response:
        """Groups, members, metadata and decisions: GET /duplicates/export?format=csv|json."""
        kind = request.query_params.get("format", "json")
        if kind not in EXPORTS:
            raise ApiError(422, "bad_parameter", f"format must be csv or json, got {kind!r}")
        body = await asyncio.to_thread(lambda: EXPORTS[kind](self.current()))
        return Response(body, media_type="text/csv; charset=utf-8" if kind == "csv" else "application/json",
                        headers={"Content-Disposition": f'attachment; filename="duplicates.{kind}"'})

    # --- writing ---------------------------------------------------------------------------

    async def _body(self, request: Request) -> tuple[dict, str]:
        """The JSON body of a write, and who writes; refused unless it is safe to take."""
        if not self.config.token and not is_loopback((request.client.host if request.client else "") or ""):
            raise ApiError(403, "forbidden", "decisions and moves are taken from loopback only, unless the service "
                           "has a token (imgsim serve --token-file)")
        origin = request.headers.get("origin")
        if origin is not None and origin.split("://", 1)[-1].lower() != request.headers.get("host", "").lower():
            raise ApiError(403, "forbidden", f"writes are taken from this service's own page, not from {origin}")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise ApiError(415, "unsupported_media_type", "send the body as application/json")
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError as e:
            raise ApiError(400, "bad_json", f"the body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "bad_json", "the body must be a JSON object")
        return body, ("token" if self.config.token else rv.LOCAL)

    async def decide(self, request: Request) -> JSONResponse:
        """POST /duplicates/decisions {"decisions": {"IMAGE_ID": "keep" | "set_aside" | null}}."""
        body, by = await self._body(request)
        raw = body.get("decisions")
        if not isinstance(raw, dict) or not raw:
            raise ApiError(400, "bad_request", 'give {"decisions": {"IMAGE_ID": "keep" | "set_aside" | null}}')
        try:
            choices = {int(k): v for k, v in raw.items()}
            changed = await asyncio.to_thread(self.decisions.decide, choices, by)
        except ValueError as e:
            raise ApiError(400, "bad_request", str(e)) from None
        return JSONResponse({"decided": changed, "by": by})

    async def separate(self, request: Request) -> JSONResponse:
        """POST /duplicates/separate {"image_ids": [...]}: not duplicates, never grouped again."""
        body, by = await self._body(request)
        try:
            pairs = await asyncio.to_thread(self.decisions.separate, [int(i) for i in body.get("image_ids") or []], by)
        except (TypeError, ValueError) as e:
            raise ApiError(400, "bad_request", f"give {{\"image_ids\": [two or more ids]}}: {e}") from None
        return JSONResponse({"separated_pairs": pairs, "by": by})

    async def accept(self, request: Request) -> JSONResponse:
        """POST /duplicates/accept {"min_score": S}: the suggestion for every group at least S similar."""
        body, by = await self._body(request)
        try:
            min_score = float(body["min_score"])
        except (KeyError, TypeError, ValueError):
            raise ApiError(400, "bad_request", 'give {"min_score": S}') from None
        groups, images = await asyncio.to_thread(lambda: self.current().accept(min_score, by))
        return JSONResponse({"groups": groups, "decided": images, "by": by})

    async def apply(self, request: Request) -> JSONResponse:
        """POST /duplicates/apply {}: move every set-aside file (journaled; finishes an interrupted apply first)."""
        _, by = await self._body(request)

        def run():
            resumed = setaside.resume(self.decisions, self.place)
            outcome = setaside.apply(self.decisions, self.place,
                                     setaside.plan(self.decisions, self.current().photos, self.place), by)
            return {"apply_id": outcome.apply_id, "moved": outcome.moved,
                    "failed": [{"path": s, "reason": r} for s, r in outcome.failed],
                    "resumed": [o.apply_id for o in resumed]}

        return JSONResponse(await asyncio.to_thread(run))

    async def undo(self, request: Request) -> JSONResponse:
        """POST /duplicates/undo {"apply_id": ID} or {"all": true}: put the files back."""
        body, by = await self._body(request)
        if not body.get("all") and not body.get("apply_id"):
            raise ApiError(400, "bad_request", 'give {"apply_id": ID} or {"all": true}')
        ids = None if body.get("all") else [str(body["apply_id"])]
        try:
            outcomes = await asyncio.to_thread(setaside.undo, self.decisions, self.place, ids, by)
        except KeyError as e:
            raise ApiError(404, "unknown_apply", str(e.args[0])) from None
        return JSONResponse({"undone": [{"apply_id": o.apply_id, "restored": o.moved,
                                         "failed": [{"path": s, "reason": r} for s, r in o.failed]} for o in outcomes]})


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


EXPORTS = {"csv": rv.export_csv, "json": rv.export_json}
