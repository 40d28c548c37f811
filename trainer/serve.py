"""Serve a bundle (trainer/bundle.py) over HTTP: a FastAPI app under uvicorn, on localhost by default.

    python -m trainer.serve data=small                          # runs/small/bundle/output on 127.0.0.1:8000
    python -m trainer.serve serve.bundle=/srv/bundle serve.port=9000

    POST /recommend  {"customer_id": "...", "k": 12, "exclude_seen": true}  (exclude_seen: the bundle's default)
                     {"history": [604869002, 564440002], "k": 12}          (raw article ids, oldest first)
                     {"queries": [{"customer_id": "..."}, {"history": [...]}], "k": 12}   (a batch)
      -> {"results": [{"articles": [{"article_id", "title", "score"}], "cold_start", "reason",
                        "unknown_articles"}], "exclude_seen", "fingerprint", "bundle"}
    GET /health, GET /version, GET /metrics (Prometheus)

On localhost by default. Any other ``serve.host`` needs a bearer token, read from the environment
(``TWOTOWER_SERVE_TOKEN``; every endpoint but /health then asks for ``Authorization: Bearer <token>``), or
an explicit ``serve.insecure=true``: the service has no other access control.

A bundle published later at the same path (trainer.bundle publishes whole, by rename) is picked up
by a watcher thread: loaded and verified aside, then swapped in one assignment. A request reads the
bundle once, so it is answered wholly by the old one or wholly by the new one; a bundle that fails to
load (caught mid-publish, damaged, any error at all) is logged and shown by /health (``degraded``, the path
and the reason) while the current one keeps serving, and a good bundle published after it is picked up.
Every answer, /health, /version and the reload log name the bundle by its digest (its files' checksums)
beside the run's fingerprint.

Bad input is refused before any work, naming what is wrong: a body over ``serve.max_body_bytes``, more than
``serve.max_batch`` queries, more than ``serve.max_results`` queries x k or a history over
``serve.max_history`` articles is a 413; malformed JSON, NaN or Infinity, a wrong type (strict: ``k`` an
integer, not ``true`` or ``12.0``; ``exclude_seen`` a boolean, not ``"yes"``), an unknown field, an article id
outside int64, k outside 1..``serve.max_k`` or the catalogue, a customer id longer than any the bundle holds or
holding NUL or unpaired surrogates is a 422; more than ``serve.max_concurrency`` requests in flight a 429. An unknown customer gets the cold-start list (``cold_start``,
``reason``); unknown articles in a history are ignored and counted (``unknown_articles``).
"""

import logging
import os
import queue
import threading
import time
from typing import Optional

import calendar
import hmac
import json
from dataclasses import dataclass
from typing import Annotated

import hydra
from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from omegaconf import DictConfig
from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, StrictStr

from data.runinfo import start_run
from trainer import config as _train_config  # noqa: F401  (registers the serve schema)
from trainer.serving.bundle import MANIFEST, Answer, Bundle, BundleError

log = logging.getLogger(__name__)


class LiveBundle:
    """The bundle being served, swapped whole when a newer one is published at ``path``."""

    def __init__(self, path: str, poll_s: float = 2.0):
        self.path, self.poll_s = path, poll_s
        self.current = Bundle.load(path)
        self.stamp = self._stamp()
        self.loads = 1
        self.failure: dict | None = None  # the last published bundle that did not load: path, reason, when
        self._failed_stamp = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="bundle-watcher", daemon=True)

    def start(self) -> "LiveBundle":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _stamp(self):
        try:
            st = os.stat(os.path.join(self.path, MANIFEST))
            return st.st_ino, st.st_mtime_ns, st.st_size
        except OSError:
            return None

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception:  # noqa: BLE001  (the watcher outlives anything: the old bundle keeps serving)
                log.exception("bundle watcher: unexpected error; still serving %s", self.current.digest)

    def check(self) -> bool:
        """Loads the bundle at ``path`` if it changed since the current one; True when swapped. Whatever
        fails while loading (mid-publish, damaged, a manifest of another shape) is logged and kept for
        /health, the current bundle keeps serving, and the same files are not tried again."""
        stamp = self._stamp()
        if stamp is None or stamp == self.stamp or stamp == self._failed_stamp:
            return False
        try:
            fresh = Bundle.load(self.path)
        except Exception as e:  # noqa: BLE001  (any error: keep serving the current bundle)
            if self._stamp() == stamp:  # not replaced meanwhile: these files are bad, not half-published
                self._failed_stamp = stamp
                self.failure = {"path": self.path, "reason": f"{type(e).__name__}: {e}", "at": time.time()}
            log.warning("bundle at %s not loaded (%s: %s); still serving %s", self.path, type(e).__name__, e,
                        self.current.digest)
            return False
        if self._stamp() != stamp:  # replaced again while loading: load that one next time
            return False
        self.current, self.stamp, self.failure = fresh, stamp, None
        self.loads += 1
        log.info("serving the bundle published at %s (digest %s; run %s step %s, as of %s)", self.path, fresh.digest,
                 fresh.manifest["run"], fresh.manifest["step"], fresh.manifest["as_of"])
        return True


class _Job:
    def __init__(self, bundle: Bundle, kind: str, values: list, k: int, exclude_seen):
        self.bundle, self.kind, self.values, self.k, self.exclude_seen = bundle, kind, values, k, exclude_seen
        self.done = threading.Event()
        self.answer: Answer | None = None
        self.error: BaseException | None = None


class Batcher:
    """The queries of the requests in flight, answered together on one model thread: each round takes every
    job that queued while the last round ran (up to ``max_queries`` queries; no waiting when nothing did, so a
    lone request pays nothing) and makes one ``Bundle.recommend`` per (bundle, kind, k, exclude_seen). Under
    load requests are answered in batches, which a CPU answers an order of magnitude faster per query than one
    by one; and concurrent requests never run the model at once (no oversubscribed cores, no thrashed caches)."""

    def __init__(self, max_queries: int):
        self.max_queries = max_queries
        self.jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, name="model", daemon=True).start()

    def recommend(self, bundle: Bundle, kind: str, values: list, k: int, exclude_seen) -> Answer:
        job = _Job(bundle, kind, values, k, exclude_seen)
        self.jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.answer

    def _run(self) -> None:
        while True:
            jobs = [self.jobs.get()]
            size = len(jobs[0].values)
            while size < self.max_queries:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                jobs.append(job)
                size += len(job.values)
            groups: dict = {}
            for job in jobs:
                groups.setdefault((id(job.bundle), job.kind, job.k, job.exclude_seen), []).append(job)
            for group in groups.values():
                self._answer(group)

    @staticmethod
    def _answer(group: list) -> None:
        first = group[0]
        values = [v for job in group for v in job.values]
        arg = "customer_ids" if first.kind == "customer_id" else "histories"
        try:
            answer = first.bundle.recommend(**{arg: values}, k=first.k, exclude_seen=first.exclude_seen)
            at = 0
            for job in group:
                n = len(job.values)
                job.answer = Answer(answer.article_ids[at:at + n], answer.scores[at:at + n],
                                    answer.cold_start[at:at + n], answer.unknown_articles[at:at + n],
                                    answer.fingerprint)
                at += n
        except BaseException as e:  # noqa: BLE001  (each request raises its own copy: a 422 or a 500 there)
            for job in group:
                job.error = e
        finally:
            for job in group:
                job.done.set()


ArticleId = Annotated[int, Strict(), Field(ge=-(2**63), le=2**63 - 1)]  # raw H&M article ids: int64


class Query(BaseModel):
    model_config = ConfigDict(extra="forbid")
    customer_id: Optional[StrictStr] = None
    history: Optional[list[ArticleId]] = None  # raw article ids, oldest first


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    customer_id: Optional[StrictStr] = None
    history: Optional[list[ArticleId]] = None
    queries: Optional[list[Query]] = None  # a batch, instead of one customer_id or history
    k: StrictInt = Field(12, ge=1)
    exclude_seen: Optional[StrictBool] = None  # None: the bundle's default (the run's data.exclude_seen)


@dataclass(frozen=True)
class Limits:
    """What one request may ask (``serve.*``): each checked before any work, a 413 or 422 naming it."""

    max_batch: int = 256
    max_k: int = 1000
    max_results: int = 25_600
    max_history: int = 1000
    max_body_bytes: int = 262_144
    max_concurrency: int = 64


def _reject(status: int, detail: str):
    return JSONResponse({"detail": detail}, status_code=status)


class BoundedJson:
    """ASGI middleware: a POST body is read up to ``serve.max_body_bytes`` (413 past it) and must be JSON
    without NaN or Infinity (422), before the app parses it; the body is then handed on as read."""

    def __init__(self, app, max_body_bytes: int):
        self.app, self.max = app, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = _reject(413, f"request body over serve.max_body_bytes={self.max}")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max):
            return await too_big(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max:
                return await too_big(scope, receive, send)
        try:
            json.loads(body, parse_constant=_no_constant)
        except _NonFinite as e:
            return await _reject(422, str(e))(scope, receive, send)
        except ValueError:
            pass  # not JSON at all: FastAPI says so (422)
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


class _NonFinite(ValueError):
    pass


def _no_constant(name: str):
    raise _NonFinite(f"{name} is not a number this service takes (JSON has no NaN or Infinity)")


TOKEN_ENV = "TWOTOWER_SERVE_TOKEN"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
PATHS = ("/recommend", "/health", "/version", "/metrics")


class Metrics:
    """Prometheus metrics of one app (its own registry): requests by path and status, latency, the served
    bundle (digest, age) and reload failures."""

    def __init__(self, live: LiveBundle):
        self.registry = CollectorRegistry()
        self.requests = Counter("twotower_requests", "HTTP requests by path and status", ["path", "status"],
                                registry=self.registry)
        self.latency = Histogram("twotower_request_seconds", "HTTP request latency", ["path"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        age = Gauge("twotower_bundle_age_seconds", "seconds since the served bundle was created",
                    registry=self.registry)
        age.set_function(lambda: time.time() - calendar.timegm(time.strptime(live.current.manifest["created"],
                                                                              "%Y-%m-%dT%H:%M:%SZ")))
        self.bundle = Gauge("twotower_bundle_info", "the served bundle (1) by digest, run fingerprint and day",
                            ["digest", "fingerprint", "as_of"], registry=self.registry)
        Gauge("twotower_bundle_reloads", "bundles loaded since the start", registry=self.registry).set_function(
            lambda: live.loads)
        Gauge("twotower_bundle_reload_failing", "1 while a published bundle failed to load",
              registry=self.registry).set_function(lambda: float(live.failure is not None))
        self.live, self._shown = live, None

    def render(self) -> bytes:
        b = self.live.current
        if self._shown is not b:  # one labelled series: the bundle now served
            self.bundle.clear()
            self.bundle.labels(b.digest, b.fingerprint, b.manifest["as_of"]).set(1)
            self._shown = b
        return generate_latest(self.registry)


def create_app(live: LiveBundle, limits: Limits | int = Limits(), token: str | None = None) -> FastAPI:
    """The app over ``live``; with ``token``, every endpoint but /health asks for ``Authorization: Bearer``."""
    limits = Limits(max_batch=limits) if isinstance(limits, int) else limits
    max_batch = limits.max_batch
    app = FastAPI(title="two-tower retrieval", version="1")
    metrics = Metrics(live)
    batcher = Batcher(limits.max_batch)
    app.add_middleware(BoundedJson, max_body_bytes=limits.max_body_bytes)

    in_flight = [0]  # requests being answered (one event loop: no lock needed)

    @app.middleware("http")
    async def measure(request, call_next):  # outermost: counts what the body check refused too
        path = request.url.path if request.url.path in PATHS else "other"
        t0 = time.perf_counter()
        if token is not None and path != "/health" and not hmac.compare_digest(
                request.headers.get("authorization", ""), f"Bearer {token}"):
            response = JSONResponse({"detail": "a bearer token is needed (Authorization: Bearer ...)"},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
        elif in_flight[0] >= limits.max_concurrency and path != "/health":
            response = JSONResponse({"detail": f"more than serve.max_concurrency={limits.max_concurrency} "
                                               "requests in flight; try again"}, status_code=429,
                                    headers={"Retry-After": "1"})
        else:
            in_flight[0] += 1
            try:
                response = await call_next(request)
            finally:
                in_flight[0] -= 1
        metrics.requests.labels(path, str(response.status_code)).inc()
        metrics.latency.labels(path).observe(time.perf_counter() - t0)
        return response

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        """422 naming each field and what is wrong, never echoing the input (it may not be JSON-able)."""
        errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg")), "type": str(e.get("type"))}
                  for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    def about(b: Bundle) -> dict:
        m = b.manifest
        return {"digest": b.digest, "run": m["run"], "step": m["step"], "fingerprint": m["fingerprint"],
                "as_of": m["as_of"], "created": m["created"], "int8": m["int8"], "data_digest": m["data_digest"]}

    @app.get("/health")
    def health() -> dict:
        """ok; or degraded while a published bundle failed to load (the previous one still answers)."""
        b = live.current
        out = {"status": "ok" if live.failure is None else "degraded", "digest": b.digest,
               "fingerprint": b.fingerprint, "as_of": b.manifest["as_of"]}
        if live.failure is not None:
            out["reload_failure"] = live.failure
        return out

    @app.get("/version")
    def version() -> dict:
        b = live.current
        return {**about(b), "versions": b.manifest["versions"], "articles": b.manifest["articles"],
                "customers": b.manifest["customers"], "loads": live.loads}

    @app.post("/recommend")
    def recommend(req: RecommendRequest) -> dict:
        b = live.current  # one bundle for the whole request, whatever a reload does meanwhile
        queries = req.queries if req.queries is not None else [Query(customer_id=req.customer_id, history=req.history)]
        if req.queries is not None and (req.customer_id is not None or req.history is not None):
            raise HTTPException(422, "give queries, or one customer_id or history, not both")
        if len(queries) > max_batch:
            raise HTTPException(413, f"{len(queries)} queries: at most serve.max_batch={max_batch} per request")
        if req.k > limits.max_k:
            raise HTTPException(422, f"k={req.k}: at most serve.max_k={limits.max_k}")
        if len(queries) * req.k > limits.max_results:
            raise HTTPException(413, f"{len(queries)} queries x k={req.k}: at most serve.max_results="
                                     f"{limits.max_results} per request")
        n_articles = len(b.article_ids) - 1
        if req.k > n_articles:
            raise HTTPException(422, f"k={req.k}: the catalogue has {n_articles} articles")
        for i, q in enumerate(queries):
            if (q.customer_id is None) == (q.history is None):
                raise HTTPException(422, f"query {i}: give a customer_id or a history")
            if q.history is not None and len(q.history) > limits.max_history:
                raise HTTPException(413, f"query {i}: a history of {len(q.history)} articles, at most "
                                         f"serve.max_history={limits.max_history}")
            if q.customer_id is not None:
                why = b.id_problem(q.customer_id)
                if why:
                    raise HTTPException(422, f"query {i}: customer_id {why}")
        results = [None] * len(queries)
        for kind in ("customer_id", "history"):
            at = [i for i, q in enumerate(queries) if getattr(q, kind) is not None]
            if not at:
                continue
            args = {"customer_ids": [queries[i].customer_id for i in at]} if kind == "customer_id" else {
                "histories": [queries[i].history for i in at]}
            try:
                answer = batcher.recommend(b, kind, list(args.values())[0], req.k, req.exclude_seen)
            except BundleError as e:
                raise HTTPException(422, str(e)) from e
            known = b.customer_rows(args["customer_ids"]) > 0 if kind == "customer_id" else None
            for j, i in enumerate(at):
                cold = answer.cold_start[j]
                reason = None
                if cold:
                    reason = ("unknown customer" if known is not None and not known[j]
                              else "no purchases before the bundle's day" if kind == "customer_id"
                              else "no known article in the history")
                results[i] = {
                    "articles": [{"article_id": int(a), "title": b.title(a), "score": None if s != s else float(s)}
                                 for a, s in zip(answer.article_ids[j], answer.scores[j])],
                    "cold_start": cold, "reason": reason, "unknown_articles": answer.unknown_articles[j]}
        return {"results": results, "exclude_seen": b.exclude_seen if req.exclude_seen is None else req.exclude_seen,
                "fingerprint": b.fingerprint, "digest": b.digest, "bundle": about(b)}

    return app


@hydra.main(config_path="../conf", config_name="serve", version_base="1.3")
def main(cfg: DictConfig) -> None:
    import uvicorn

    import torch

    start_run(cfg)
    sc = cfg.serve
    token = os.environ.get(TOKEN_ENV) or None
    if str(sc.host) not in LOOPBACK and token is None and not sc.insecure:
        raise SystemExit(f"serve.host={sc.host} exposes the service beyond this machine: set a bearer token in "
                         f"the environment ({TOKEN_ENV}=...), or serve.insecure=true to serve without one")
    torch.set_num_threads(int(sc.threads))
    live = LiveBundle(str(sc.bundle), sc.reload_poll_s).start()
    log.info("serving %s (digest %s; run %s step %s, fingerprint %s) on http://%s:%d", sc.bundle, live.current.digest,
             live.current.manifest["run"], live.current.manifest["step"], live.current.fingerprint, sc.host, sc.port)
    try:
        limits = Limits(int(sc.max_batch), int(sc.max_k), int(sc.max_results), int(sc.max_history),
                        int(sc.max_body_bytes), int(sc.max_concurrency))
        uvicorn.run(create_app(live, limits, token), host=str(sc.host), port=int(sc.port), log_level="warning",
                    workers=1)
    finally:
        live.stop()


if __name__ == "__main__":
    main()
