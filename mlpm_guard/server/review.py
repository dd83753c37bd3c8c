"""The review page and hot reload: operators see the logged decisions, mark them fine or harmful,
see what teaching the corrections would cost, apply them, and roll back, without a restart.

The page is plain server-rendered HTML (forms and inline SVG plots, no script), served under
``/review`` by the app when it has a decision log. Behind an API key, a browser signs in once at
``/review/login`` and gets a cookie holding a keyed digest of the key (never the key itself),
``SameSite=Strict`` so that no other site can post the page's forms.

:class:`PrototypeReloader` keeps the guard on the current version of a
:class:`~mlpm_guard.estimator.prototype_store.PrototypeStore`: the app polls the store's ``CURRENT`` file,
so every replica serving the same store (Ray Serve, several processes) follows a teach or a
rollback made by any of them or by the CLI.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse

from ..estimator.prototype_store import PrototypeStore, TeachingCost, teaching_cost
from ..guardrail.decision_log import (
    Correction,
    DecisionFilter,
    DecisionLog,
    LoggedDecision,
)
from ..vocabulary.errors import MlpmGuardError
from ..vocabulary.types import Route
from .service import Service

if TYPE_CHECKING:
    from ..guardrail.guard import Guard

logger = logging.getLogger(__name__)

COOKIE = "mlpm_guard_review"
LOGIN_PATH = "/review/login"
_FORM_LIMIT = 256 * 1024


def review_token(api_key: str) -> str:
    """The cookie value that stands for ``api_key`` (a keyed digest: the cookie never holds the key)."""
    return hmac.new(api_key.encode("utf-8"), b"mlpm-guard review page", hashlib.sha256).hexdigest()


def cookie_ok(cookie_header: str, api_key: str) -> bool:
    """Whether a Cookie header carries the review token of ``api_key``."""
    for part in cookie_header.split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE and hmac.compare_digest(value.encode(), review_token(api_key).encode()):
            return True
    return False


class PrototypeReloader:
    """Keeps ``guard.prototypes`` on the store's current version.

    Args:
        guard: the served guard; its prototypes are replaced in place (each request reads them
            when it starts, so a request in flight finishes on the version it began with).
        store: the prototype store.
    """

    def __init__(self, guard: Guard, store: PrototypeStore) -> None:
        self.guard, self.store = guard, store
        self._lock = threading.Lock()
        self.last_reload_ms: float | None = None

    @property
    def version(self) -> str | None:
        return getattr(self.guard.prototypes, "version_", None)

    def check(self) -> str | None:
        """Load the current version if the guard is not on it; returns the version loaded, or None."""
        with self._lock:
            current = self.store.current
            if current == self.version:
                return None
            start = time.perf_counter()
            prototypes = self.store.load(current, backbone=self.guard.backbone)
            self.guard.use_prototypes(prototypes)
            self.last_reload_ms = (time.perf_counter() - start) * 1000.0
        logger.info("prototypes %s loaded in %.0f ms", current, self.last_reload_ms)
        return current

    async def watch(self, every_s: float) -> None:
        """Poll the store every ``every_s`` seconds until cancelled; a failed load is logged and retried."""
        while True:
            await asyncio.sleep(every_s)
            try:
                await asyncio.to_thread(self.check)
            except Exception as exc:  # noqa: BLE001 - keep serving the loaded version
                logger.error("could not load the store's current prototypes: %s: %s", type(exc).__name__, exc)


@dataclass
class Review:
    """What the review routes work with."""

    service: Service
    log: DecisionLog
    reloader: PrototypeReloader | None
    harmful_probes: Sequence[str]

    @property
    def store(self) -> PrototypeStore | None:
        return self.reloader.store if self.reloader is not None else None


def add_review_routes(app: FastAPI, review: Review) -> None:
    """``/review`` (the page and its forms) and ``/v1/prototypes/reload``."""
    settings = review.service.settings

    @app.get(LOGIN_PATH)
    async def login_page(request: Request) -> HTMLResponse:
        return _page("Sign in", _login_form(request.query_params.get("error")))

    @app.post(LOGIN_PATH)
    async def login(request: Request) -> Any:
        form = await _form(request)
        key = settings.api_key
        if key is None:
            return RedirectResponse("/review", status_code=303)
        if not hmac.compare_digest(form.get("key", "").encode(), key.encode()):
            return RedirectResponse(LOGIN_PATH + "?error=1", status_code=303)
        response = RedirectResponse("/review", status_code=303)
        response.set_cookie(COOKIE, review_token(key), httponly=True, samesite="strict", path="/review")
        return response

    @app.get("/review")
    async def page(request: Request) -> HTMLResponse:
        where, query = _filter(request.query_params)
        rows = await asyncio.to_thread(review.log.decisions, where)
        return _page("Review", await asyncio.to_thread(_body, review, rows, query, request.query_params.get("note")))

    @app.post("/review/correct")
    async def correct(request: Request) -> Any:
        form = await _form(request)
        decision_id = int(form["decision_id"]) if form.get("decision_id", "").isdigit() else None
        logged = await asyncio.to_thread(review.log.get, decision_id) if decision_id is not None else None
        text = form.get("text", "").strip() or (logged.text if logged is not None else None)
        label = form.get("label")
        if not text or label not in ("safe", "unsafe"):
            note = "this decision's text was not kept: paste the text to teach" if not text else "unknown label"
            return _back(form, note, status=400)
        if logged is not None and logged.text is None and text:
            from ..guardrail.decision_log import text_sha256

            if text_sha256(text) != logged.text_sha256:
                return _back(form, "the pasted text is not the text of this decision (its hash differs)", status=400)
        category = form.get("category") or None
        await asyncio.to_thread(review.log.add_correction, Correction(
            text=text, label=label, category=category if label == "unsafe" else None, decision_id=decision_id))
        return _back(form, f"marked {'fine' if label == 'safe' else 'harmful'}")

    @app.post("/review/corrections/{correction_id}/delete")
    async def delete(correction_id: int, request: Request) -> Any:
        form = await _form(request)
        await asyncio.to_thread(review.log.delete_correction, correction_id)
        return _back(form, "correction removed")

    @app.post("/review/preview")
    async def preview(request: Request) -> Any:
        form = await _form(request)
        if review.store is None:
            return _back(form, "no prototypes store: start the server with --prototypes-store DIR", status=400)
        pending = await asyncio.to_thread(review.log.corrections, pending=True)
        if not pending:
            return _back(form, "no pending corrections")
        cost = await asyncio.to_thread(teaching_cost, review.service.guard.prototypes, pending,
                                       review.service.guard.backbone, review.harmful_probes)
        return _page("Cost of teaching", _cost_body(cost, pending, form.get("back", "")))

    @app.post("/review/apply")
    async def apply(request: Request) -> Any:
        form = await _form(request)
        store = review.store
        if store is None:
            return _back(form, "no prototypes store: start the server with --prototypes-store DIR", status=400)
        pending = await asyncio.to_thread(review.log.corrections, pending=True)
        if not pending:
            return _back(form, "no pending corrections")
        guard = review.service.guard
        info = await asyncio.to_thread(store.teach, pending, guard.backbone, loaded=guard.prototypes)
        await asyncio.to_thread(review.log.mark_applied, [c.id for c in pending if c.id is not None], info.version)
        await asyncio.to_thread(review.reloader.check)  # type: ignore[union-attr]
        return _back(form, f"taught {len(pending)} correction(s): now serving {info.version}")

    @app.post("/review/rollback")
    async def rollback(request: Request) -> Any:
        form = await _form(request)
        if review.store is None:
            return _back(form, "no prototypes store", status=400)
        try:
            version = await asyncio.to_thread(review.store.rollback, form.get("version") or None)
        except MlpmGuardError as exc:
            return _back(form, str(exc), status=400)
        await asyncio.to_thread(review.reloader.check)  # type: ignore[union-attr]
        return _back(form, f"rolled back: now serving {version}")

    @app.post("/v1/prototypes/reload")
    async def reload() -> JSONResponse:
        if review.reloader is None:
            return JSONResponse({"error": {"message": "no prototypes store (start with --prototypes-store DIR)",
                                           "type": "invalid_request_error"}}, status_code=400)
        loaded = await asyncio.to_thread(review.reloader.check)
        return JSONResponse({"version": review.reloader.version, "reloaded": loaded is not None,
                             "reload_ms": review.reloader.last_reload_ms if loaded is not None else None})


# ---------------------------------------------------------------------- requests
async def _form(request: Request) -> dict[str, str]:
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > _FORM_LIMIT:
            break
    fields = parse_qs(bytes(body[:_FORM_LIMIT]).decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[-1] for k, v in fields.items()}


def _filter(params: Any) -> tuple[DecisionFilter, dict[str, str]]:
    """The log filter of the page's query string (bad values are ignored, not errors: it is a form)."""
    query = {k: params.get(k, "") for k in ("route", "category", "min_p", "max_p", "hours", "limit")}
    where: dict[str, Any] = {"limit": 200}
    if query["route"] in {r.value for r in Route}:
        where["route"] = Route(query["route"])
    if query["category"]:
        where["category"] = query["category"]
    for key, field in (("min_p", "min_p_unsafe"), ("max_p", "max_p_unsafe")):
        number = _number(query[key])
        if number is not None and 0 <= number <= 1:
            where[field] = number
    hours = _number(query["hours"])
    if hours is not None and hours > 0:
        where["since"] = time.time() - hours * 3600
    limit = _number(query["limit"])
    if limit is not None and 1 <= limit <= 5000:
        where["limit"] = int(limit)
    return DecisionFilter(**where), {k: v for k, v in query.items() if v}


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _back(form: dict[str, str], note: str, status: int = 303) -> Any:
    back = form.get("back", "")
    query = back + ("&" if back else "") + urlencode({"note": note})
    if status != 303:
        return _page("Review", f"<p class=note>{_e(note)}</p><p><a href='/review?{_e(back)}'>back</a></p>", status)
    return RedirectResponse(f"/review?{query}", status_code=303)


# ---------------------------------------------------------------------- HTML
_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5rem;max-width:80rem}table{border-collapse:collapse;width:100%}
td,th{border-bottom:1px solid #ddd;padding:.3rem;text-align:left;vertical-align:top;font-size:.9rem}
.refuse{color:#a00}.note{background:#ffd;padding:.4rem}.plots{display:flex;gap:2rem;flex-wrap:wrap}
form.inline{display:inline}code{font-size:.8rem}"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    doc = (f"<!doctype html><html><head><meta charset=utf-8><title>mlpm-guard: {_e(title)}</title>"
           f"<style>{_STYLE}</style></head><body><h1>mlpm-guard: {_e(title)}</h1>{body}</body></html>")
    return HTMLResponse(doc, status_code=status, headers={"Cache-Control": "no-store"})


def _login_form(error: str | None) -> str:
    wrong = "<p class=note>Wrong key.</p>" if error else ""
    return (f"{wrong}<form method=post action='{LOGIN_PATH}'><label>API key "
            "<input type=password name=key id=key autofocus></label> <button type=submit id=login>Sign in</button></form>")


def _body(review: Review, rows: list[LoggedDecision], query: dict[str, str], note: str | None) -> str:
    back = urlencode(query)
    parts = [f"<p class=note id=note>{_e(note)}</p>" if note else ""]
    version = review.reloader.version if review.reloader is not None else None
    stats = review.log.stats.to_dict()
    parts.append(f"<p>Prototypes: <b id=version>{_e(version or 'not versioned')}</b>. Log: {stats['written']} written, "
                 f"{stats['dropped']} dropped, {stats['failed']} failed since start. "
                 f"Texts are {'kept' if review.log.settings.store_text else 'not kept (hashes only)'}.</p>")
    parts.append(_filter_form(query))
    scores = [r.p_unsafe for r in rows if r.p_unsafe is not None]
    parts.append("<div class=plots>" + histogram_svg(scores) + flag_rate_svg(rows) + "</div>")
    parts.append(f"<h2>Decisions ({len(rows)})</h2>" + _table(rows, back))
    parts.append(_corrections(review, back))
    if review.store is not None:
        parts.append(_versions(review.store, back))
    return "".join(parts)


def _filter_form(query: dict[str, str]) -> str:
    options = "".join(f"<option value='{r.value}'{' selected' if query.get('route') == r.value else ''}>{r.value}</option>"
                      for r in Route)
    return ("<form method=get action='/review' id=filter>"
            f"<label>route <select name=route><option value=''>any</option>{options}</select></label> "
            f"<label>category <input name=category size=6 value='{_e(query.get('category'))}'></label> "
            f"<label>P(unsafe) from <input name=min_p size=4 value='{_e(query.get('min_p'))}'></label> "
            f"<label>to <input name=max_p size=4 value='{_e(query.get('max_p'))}'></label> "
            f"<label>last hours <input name=hours size=4 value='{_e(query.get('hours'))}'></label> "
            f"<label>at most <input name=limit size=4 value='{_e(query.get('limit'))}'></label> "
            "<button type=submit>Filter</button></form>")


def _table(rows: list[LoggedDecision], back: str) -> str:
    out = ["<table id=decisions><tr><th>time (UTC)</th><th>route</th><th>P(unsafe)</th><th>category</th>"
           "<th>view</th><th>text</th><th>judge</th></tr>"]
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.time))
        text = _e(r.text) if r.text is not None else f"<code title='SHA-256 of the text'>{r.text_sha256[:16]}</code>"
        paste = "" if r.text is not None else "<input name=text size=20 placeholder='paste the text' required> "
        hidden = f"<input type=hidden name=decision_id value={r.id}><input type=hidden name=back value='{_e(back)}'>"
        fine = (f"<form class=inline method=post action='/review/correct'>{hidden}{paste}"
                f"<input type=hidden name=label value=safe><button type=submit name=fine id=fine-{r.id}>this was fine"
                "</button></form>")
        harmful = (f"<form class=inline method=post action='/review/correct'>{hidden}{paste}"
                   "<input type=hidden name=label value=unsafe><input name=category size=4 placeholder='S1..S14'> "
                   f"<button type=submit id=harmful-{r.id}>this was harmful</button></form>")
        score = f"{r.p_unsafe:.3f}" if r.p_unsafe is not None else ""
        out.append(f"<tr id=row-{r.id}><td>{when}</td><td class={_e(r.route.value)}>{_e(r.route.value)}</td>"
                   f"<td>{score}</td><td>{_e(r.category)}</td><td>{_e(r.view)}</td><td>{text}</td>"
                   f"<td>{fine} {harmful}</td></tr>")
    return "".join(out) + "</table>"


def _corrections(review: Review, back: str) -> str:
    corrections = review.log.corrections()
    pending = [c for c in corrections if c.applied_version is None]
    out = [f"<h2>Corrections ({len(pending)} pending)</h2><table id=corrections><tr><th>text</th><th>label</th>"
           "<th>category</th><th>applied in</th><th></th></tr>"]
    for c in reversed(corrections[-200:]):
        delete = "" if c.applied_version else (
            f"<form class=inline method=post action='/review/corrections/{c.id}/delete'>"
            f"<input type=hidden name=back value='{_e(back)}'><button type=submit>remove</button></form>")
        label = "fine" if c.label == "safe" else "harmful"
        out.append(f"<tr><td>{_e(c.text)}</td><td>{label}</td><td>{_e(c.category)}</td>"
                   f"<td>{_e(c.applied_version or 'pending')}</td><td>{delete}</td></tr>")
    out.append("</table>")
    if pending and review.store is not None:
        out.append(f"<form class=inline method=post action='/review/preview'><input type=hidden name=back value='{_e(back)}'>"
                   "<button type=submit id=preview>Show the cost on the harmful probes</button></form> "
                   f"<form class=inline method=post action='/review/apply'><input type=hidden name=back value='{_e(back)}'>"
                   f"<button type=submit id=apply>Apply {len(pending)} correction(s)</button></form>")
    elif pending:
        out.append("<p>Start the server with <code>--prototypes-store DIR</code> to apply corrections here, or "
                   "run <code>mlpm-guard prototypes teach</code>.</p>")
    return "".join(out)


def _versions(store: PrototypeStore, back: str) -> str:
    out = ["<h2>Prototype versions</h2><table id=versions><tr><th>version</th><th>parent</th><th>created</th>"
           "<th>corrections</th><th></th></tr>"]
    for info in reversed(store.history()):
        button = "<b>serving</b>" if info.current else (
            f"<form class=inline method=post action='/review/rollback'><input type=hidden name=version "
            f"value='{_e(info.version)}'><input type=hidden name=back value='{_e(back)}'>"
            f"<button type=submit>serve this version</button></form>")
        out.append(f"<tr><td>{_e(info.version)}</td><td>{_e(info.parent)}</td><td>{_e(info.created)}</td>"
                   f"<td>{len(info.corrections)}</td><td>{button}</td></tr>")
    return "".join(out) + "</table>"


def _cost_body(cost: TeachingCost, pending: list[Correction], back: str) -> str:
    rows = "".join(f"<tr><td>{_e(c.text)}</td><td>{'fine' if c.label == 'safe' else 'harmful'}</td>"
                   f"<td>{b:.3f}</td><td>{a:.3f}</td></tr>"
                   for c, b, a in zip(pending, cost.corrected_before, cost.corrected_after))
    flipped = "".join(f"<li>{_e(t)}</li>" for t in cost.flipped) or "<li>none</li>"
    return (f"<p id=cost>On {cost.n_probes} held-back harmful probes, flagged {cost.flagged_before} before and "
            f"<b>{cost.flagged_after}</b> after teaching (recall {cost.recall_before:.1%} to {cost.recall_after:.1%}).</p>"
            f"<h2>Harmful probes no longer flagged</h2><ul>{flipped}</ul>"
            "<h2>The corrected texts</h2><table><tr><th>text</th><th>marked</th><th>P(unsafe) now</th>"
            f"<th>after</th></tr>{rows}</table>"
            f"<form method=post action='/review/apply'><input type=hidden name=back value='{_e(back)}'>"
            f"<button type=submit id=apply>Apply {len(pending)} correction(s)</button></form>"
            f"<p><a href='/review?{_e(back)}'>back without applying</a></p>")


# ---------------------------------------------------------------------- plots (inline SVG)
def histogram_svg(scores: Sequence[float], *, bins: int = 20, width: int = 420, height: int = 160) -> str:
    """A histogram of P(unsafe) over [0, 1] as an inline SVG element."""
    counts = [0] * bins
    for s in scores:
        counts[min(int(s * bins), bins - 1)] += 1
    top = max(counts) or 1
    pad, bar = 20, (width - 40) / bins
    rects = "".join(
        f"<rect x='{pad + i * bar:.1f}' y='{height - pad - (height - 2 * pad) * c / top:.1f}' width='{bar - 1:.1f}' "
        f"height='{(height - 2 * pad) * c / top:.1f}' fill='{'#c33' if i >= bins // 2 else '#39c'}'>"
        f"<title>{i / bins:.2f}-{(i + 1) / bins:.2f}: {c}</title></rect>" for i, c in enumerate(counts))
    axis = (f"<line x1='{pad}' y1='{height - pad}' x2='{width - pad}' y2='{height - pad}' stroke='#333'/>"
            f"<text x='{pad}' y='{height - 4}' font-size='10'>0</text>"
            f"<text x='{width / 2 - 8}' y='{height - 4}' font-size='10'>0.5</text>"
            f"<text x='{width - pad - 6}' y='{height - 4}' font-size='10'>1</text>"
            f"<text x='{pad}' y='12' font-size='11'>P(unsafe) of {len(scores)} decisions (max {top} per bin)</text>")
    return f"<svg id=histogram xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}'>{rects}{axis}</svg>"


def flag_rate_svg(rows: Sequence[LoggedDecision], *, buckets: int = 24, width: int = 420, height: int = 160) -> str:
    """The share of decisions not passed (any route but ``pass``) over the rows' time span, as an inline SVG."""
    pad = 20
    if not rows:
        return f"<svg id=flag-rate xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}'>" \
               f"<text x='{pad}' y='20' font-size='11'>no decisions</text></svg>"
    start, end = min(r.time for r in rows), max(r.time for r in rows)
    span = max(end - start, 1e-9)
    flagged, total = [0] * buckets, [0] * buckets
    for r in rows:
        i = min(int((r.time - start) / span * buckets), buckets - 1)
        total[i] += 1
        flagged[i] += r.route is not Route.PASS
    points = [(pad + (width - 2 * pad) * (i + 0.5) / buckets, height - pad - (height - 2 * pad) * f / t)
              for i, (f, t) in enumerate(zip(flagged, total)) if t]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    dots = "".join(f"<circle cx='{x:.1f}' cy='{y:.1f}' r='2.5' fill='#c33'/>" for x, y in points)
    rate = sum(flagged) / len(rows)
    label = time.strftime("%m-%d %H:%M", time.gmtime(start)) + " to " + time.strftime("%m-%d %H:%M", time.gmtime(end))
    return (f"<svg id=flag-rate xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}'>"
            f"<polyline points='{line}' fill='none' stroke='#c33'/>{dots}"
            f"<line x1='{pad}' y1='{height - pad}' x2='{width - pad}' y2='{height - pad}' stroke='#333'/>"
            f"<text x='{pad}' y='12' font-size='11'>flag rate (not passed): {rate:.1%} overall</text>"
            f"<text x='{pad}' y='{height - 4}' font-size='10'>{_e(label)} UTC</text></svg>")
