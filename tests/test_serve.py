"""trainer/serve.py: a real uvicorn server on a free port, every endpoint and every bad input, and a bundle
published over the served one while requests run (no error, no answer mixing the two)."""

from __future__ import annotations

import json
import pathlib
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import ROOT, build_bundle, raw_customer_ids


PIDS: dict[str, int] = {}  # the module's server process, for its memory


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port: int, path: str, body=None, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else (json.dumps(body, allow_nan=True).encode() if body is not None else None)
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"Content-Type": "application/json"}, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def server(built, tmp_path_factory):
    """The fp32 bundle copied to a path of its own, served; yields (port, bundle path)."""
    path = tmp_path_factory.mktemp("served") / "bundle"
    shutil.copytree(built["base"] / "fp32" / "output", path)
    port = free_port()
    log = open(tmp_path_factory.mktemp("serve-log") / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "trainer.serve", f"serve.bundle={path}", f"serve.port={port}",
                             "serve.reload_poll_s=0.2", "serve.max_batch=8", f"hydra.run.dir={path.parent / 'run'}"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    PIDS["server"] = proc.pid
    try:
        for _ in range(600):
            try:
                if call(port, "/health")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}: {open(log.name).read()[-3000:]}")
            time.sleep(0.2)
        yield port, path
    finally:
        proc.terminate()
        proc.wait(30)


def test_every_endpoint(server, built):
    from trainer.serving.bundle import Bundle

    port, path = server
    b = Bundle.load(str(path))
    code, health = call(port, "/health")
    assert code == 200 and health["status"] == "ok" and health["fingerprint"] == b.fingerprint
    assert health["digest"] == b.digest
    code, version = call(port, "/version")
    assert code == 200 and version["step"] == b.manifest["step"] and version["articles"] == len(b.article_ids) - 1
    ids = raw_customer_ids(built)[:3]
    code, got = call(port, "/recommend", {"customer_id": ids[0], "k": 5})
    want = b.recommend(customer_ids=[ids[0]], k=5)
    assert code == 200 and got["fingerprint"] == b.fingerprint and got["digest"] == b.digest
    assert version["digest"] == b.digest
    assert got["exclude_seen"] is False and b.manifest["exclude_seen"] is False  # tiny's data.exclude_seen
    assert [a["article_id"] for a in got["results"][0]["articles"]] == want.article_ids[0]
    assert got["results"][0]["articles"][0]["title"] == b.title(want.article_ids[0][0])
    code, got = call(port, "/recommend", {"queries": [{"customer_id": i} for i in ids], "k": 4, "exclude_seen": False})
    want = b.recommend(customer_ids=ids, k=4, exclude_seen=False)
    assert code == 200 and [[a["article_id"] for a in r["articles"]] for r in got["results"]] == want.article_ids
    known = int(b.article_ids[1])
    code, got = call(port, "/recommend", {"history": [known, 999_999_999_999], "k": 3})
    assert code == 200 and got["results"][0]["unknown_articles"] == 1 and not got["results"][0]["cold_start"]


def test_every_bad_input(server):
    port, _ = server
    code, got = call(port, "/recommend", {"customer_id": "nobody-at-all", "k": 3})
    assert code == 200 and got["results"][0]["cold_start"] and got["results"][0]["reason"] == "unknown customer"
    assert call(port, "/recommend", {"customer_id": "x", "k": 10**7})[0] == 422  # k beyond the catalogue
    assert call(port, "/recommend", {"customer_id": "x", "k": 0})[0] == 422
    assert call(port, "/recommend", raw=b'{"customer_id": "x", "k":')[0] == 422  # malformed JSON
    assert call(port, "/recommend", {"k": 3})[0] == 422  # neither a customer nor a history
    assert call(port, "/recommend", {"history": "abc"})[0] == 422  # wrong type
    assert call(port, "/recommend", {"queries": [{"customer_id": "x"}] * 9})[0] == 413  # max_batch 8


def test_a_bundle_published_while_requests_run_is_swapped_whole(server, built):
    """A bundle of the same run as of two weeks later (other histories, so other answers) is published
    over the served one (through data/staging.py, as trainer.bundle does) while clients keep asking:
    no request fails, and every answer is wholly the old bundle's or wholly the new one's, labelled so."""
    import numpy as np

    from data.staging import staged
    from trainer.serving.bundle import Bundle

    port, path = server
    old = Bundle.load(str(path))
    later = str(np.datetime64(old.manifest["as_of"]) + 14)
    build_bundle(built["base"] / "train", built["base"] / "later", f"bundle.as_of={later}")
    new = Bundle.load(str(built["base"] / "later" / "output"))
    ids = raw_customer_ids(built)[:8]
    body = {"queries": [{"customer_id": i} for i in ids], "k": 6, "exclude_seen": False}
    expect = {b.manifest["as_of"]: b.recommend(customer_ids=ids, k=6, exclude_seen=False).article_ids
              for b in (old, new)}
    assert expect[old.manifest["as_of"]] != expect[later]  # else a mixed answer could not be told apart
    seen, errors, done = [], [], threading.Event()

    def client():
        while not done.is_set():
            code, got = call(port, "/recommend", body)
            if code != 200:
                errors.append((code, got))
                continue
            seen.append((got["bundle"]["as_of"], [[a["article_id"] for a in r["articles"]] for r in got["results"]]))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    with staged(str(path), "manifest.json") as out:
        for f in (built["base"] / "later" / "output").iterdir():
            shutil.copy(f, out)
    for _ in range(300):
        if call(port, "/version")[1]["as_of"] == later:
            break
        time.sleep(0.1)
    time.sleep(1.0)
    done.set()
    for t in threads:
        t.join()
    assert not errors
    assert {label for label, _ in seen} == {old.manifest["as_of"], later}  # answered before and after the swap
    assert all(answer == expect[label] for label, answer in seen)  # never a mixed answer


def test_a_bundle_that_fails_to_load_leaves_the_old_one_serving_and_health_says_why(server, built):
    """A published manifest that raises while loading (no "files": a KeyError in the old watcher, which ended
    the thread): the old bundle keeps answering, /health reports the path and the reason, and a good bundle
    published next is picked up."""
    from data.staging import staged
    from trainer.serving.bundle import Bundle

    port, path = server
    before = call(port, "/health")[1]
    good = Bundle.load(str(path))
    with staged(str(path), "manifest.json") as out:
        for f in pathlib.Path(good.path).iterdir():
            shutil.copy(f, out)
        manifest = json.loads((pathlib.Path(out) / "manifest.json").read_text())
        del manifest["files"]
        (pathlib.Path(out) / "manifest.json").write_text(json.dumps(manifest))
    for _ in range(300):
        health = call(port, "/health")[1]
        if health["status"] != "ok":
            break
        time.sleep(0.1)
    assert health["status"] == "degraded" and health["digest"] == before["digest"]
    assert health["reload_failure"]["path"] == str(path) and "no list of the bundle's files" in \
        health["reload_failure"]["reason"]
    code, got = call(port, "/recommend", {"history": [int(good.article_ids[1])], "k": 3})
    assert code == 200 and got["digest"] == before["digest"]
    with staged(str(path), "manifest.json") as out:  # a good bundle again: the int8 one
        for f in (built["base"] / "int8" / "output").iterdir():
            shutil.copy(f, out)
    for _ in range(300):
        health = call(port, "/health")[1]
        if health["status"] == "ok" and health["digest"] != before["digest"]:
            break
        time.sleep(0.1)
    assert health["status"] == "ok" and "reload_failure" not in health
    assert health["digest"] == Bundle.load(str(path)).digest != before["digest"]


def serve(bundle, run_dir, *overrides: str, env: dict | None = None) -> tuple[subprocess.Popen, int]:
    """``python -m trainer.serve`` of ``bundle`` on a free localhost port, once /health answers: (process, port)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "trainer.serve", f"serve.bundle={bundle}", f"serve.port={port}",
                             *overrides, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if call(port, "/health")[0] == 200:
                return proc, port
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("the server did not answer /health in 2 minutes")


def declared_only(port: int, length: int) -> tuple[int, dict]:
    """A POST that declares ``length`` bytes and sends none: the answer must not wait for them."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("POST", "/recommend")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(length))
    conn.endheaders()
    r = conn.getresponse()
    out = r.status, json.loads(r.read() or b"{}")
    conn.close()
    return out


def chunked(port: int, body: bytes) -> tuple[int, dict]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/recommend", body=iter([body]), headers={"Content-Type": "application/json"},
                 encode_chunked=True)
    r = conn.getresponse()
    out = r.status, json.loads(r.read() or b"{}")
    conn.close()
    return out


def test_hostile_requests_get_a_4xx_naming_the_limit_and_cost_nothing(server):
    """The probes that used to cost gigabytes or a 500, against the live server: each gets its 4xx, the
    server answers after them, and its memory stays within 50 MB of where it was."""
    port, _ = server
    call(port, "/recommend", {"history": [1], "k": 3})
    idle = rss_mb(PIDS["server"])
    probes = [
        ({"customer_id": "a" * 40_000, "k": 3}, 422, "longer than any customer id"),
        ({"history": [2**63], "k": 3}, 422, "less than or equal"),
        ({"history": [10**30], "k": 3}, 422, "less than or equal"),
        ({"history": [1], "k": 3, "extra": float("nan")}, 422, "NaN"),
        ({"history": [float("inf")], "k": 3}, 422, "Infinity"),
        ({"customer_id": "\ud800", "k": 3}, 422, "unpaired surrogate"),
        ({"customer_id": "abc\x00", "k": 3}, 422, "NUL"),
        ({"customer_id": "x", "k": True}, 422, "int"),
        ({"customer_id": "x", "k": 12.0}, 422, "int"),
        ({"customer_id": "x", "k": 3, "exclude_seen": "yes"}, 422, "bool"),
        ({"customer_id": "x", "k": 3, "surprise": 1}, 422, "extra"),
        ({"queries": [{"customer_id": "x"}] * 8, "k": 5000}, 422, "serve.max_k"),
        ({"history": list(range(1, 2001)), "k": 3}, 413, "serve.max_history"),
    ]
    for body, status, says in probes:
        code, got = call(port, "/recommend", body)
        assert code == status and says in json.dumps(got), (body, code, got)
    for size in (1 << 20, 10 << 20):  # a 1 MB id, a 10 MB body: refused on their declared length, unread
        code, got = declared_only(port, size)
        assert code == 413 and "serve.max_body_bytes" in got["detail"]
    code, got = chunked(port, b'{"customer_id": "' + b"a" * 300_000 + b'"}')  # no length given: read to the limit
    assert code == 413 and "serve.max_body_bytes" in got["detail"]
    assert call(port, "/recommend", {"history": [1], "k": 3})[0] == 200
    assert rss_mb(PIDS["server"]) - idle < 50


def test_fuzzed_requests_never_get_a_5xx(server):
    """Property-based fuzzing of the live service (localhost, bounded in count and time): bodies built around
    the schema's fields with any JSON value, NaN and Infinity, huge integers, lone surrogates and wrong types;
    every answer is a 2xx or a 4xx, and a 200 has the documented shape."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    port, _ = server
    scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
               | st.text(max_size=20) | st.sampled_from(["\ud800", "a" * 300, "", "0"]))
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
    fields = st.sampled_from(["customer_id", "history", "queries", "k", "exclude_seen", "other"])
    bodies = st.dictionaries(fields, values | st.integers(1, 20) | st.lists(st.integers(0, 10**12), max_size=5),
                             max_size=4)

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(bodies)
    def ask(body):
        raw = json.dumps(body, allow_nan=True).encode()
        code, got = call(port, "/recommend", raw=raw)
        assert code < 500, (body, code, got)
        assert code == 200 or isinstance(got.get("detail"), (str, list)), (body, code, got)  # a 4xx says why
        if code == 200:
            assert set(got) >= {"results", "exclude_seen", "fingerprint", "digest", "bundle"}
            assert all(set(r) == {"articles", "cold_start", "reason", "unknown_articles"} for r in got["results"])

    ask()


def test_metrics_count_requests_and_name_the_bundle(server):
    from trainer.serving.bundle import Bundle

    port, path = server
    call(port, "/recommend", {"history": [1], "k": 3})
    call(port, "/recommend", {"k": 0})
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read().decode()
    digest = Bundle.load(str(path)).digest
    assert 'twotower_bundle_info{as_of=' in text and f'digest="{digest}"' in text
    ok = [line for line in text.splitlines() if line.startswith('twotower_requests_total{path="/recommend",status="200"}')]
    bad = [line for line in text.splitlines() if line.startswith('twotower_requests_total{path="/recommend",status="422"}')]
    assert ok and float(ok[0].split()[-1]) >= 1 and bad and float(bad[0].split()[-1]) >= 1
    assert "twotower_request_seconds_bucket" in text and "twotower_bundle_age_seconds" in text


def test_beyond_localhost_a_token_is_asked_for(built, tmp_path):
    """Binding elsewhere without a token (or serve.insecure=true) does not start; with a token every endpoint but
    /health asks for it."""
    bundle = built["base"] / "int8" / "output"
    out = subprocess.run([sys.executable, "-m", "trainer.serve", f"serve.bundle={bundle}", "serve.host=0.0.0.0",
                          f"hydra.run.dir={tmp_path / 'exposed'}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={k: v for k, v in __import__("os").environ.items()
                                           if k != "TWOTOWER_SERVE_TOKEN"})
    assert out.returncode != 0 and "TWOTOWER_SERVE_TOKEN" in out.stderr + out.stdout
    proc, port = serve(bundle, tmp_path / "run", env={**__import__("os").environ, "TWOTOWER_SERVE_TOKEN": "s3cret"})
    try:
        assert call(port, "/recommend", {"history": [1], "k": 3})[0] == 401
        req = urllib.request.Request(f"http://127.0.0.1:{port}/recommend", data=json.dumps({"history": [1], "k": 3}).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": "Bearer s3cret"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200
        assert "s3cret" not in (tmp_path / "run" / "config.yaml").read_text()
    finally:
        proc.terminate()
        proc.wait(30)


def test_more_requests_in_flight_than_allowed_get_a_429(built, tmp_path):
    """serve.max_concurrency=1 and slow requests (a batch of 8 at the largest k): some of 6 clients at once are
    told 429 naming the setting, the others answered; none fails otherwise."""
    bundle = built["base"] / "int8" / "output"
    proc, port = serve(bundle, tmp_path / "run", "serve.max_concurrency=1")
    try:
        from trainer.serving.bundle import Bundle

        b = Bundle.load(str(bundle))
        body = {"queries": [{"history": [int(a)]} for a in b.article_ids[1:9]], "k": len(b.article_ids) - 1,
                "exclude_seen": False}
        codes = []
        threads = [threading.Thread(target=lambda: codes.append(call(port, "/recommend", body))) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert {c for c, _ in codes} <= {200, 429} and 200 in {c for c, _ in codes}
        busy = [g for c, g in codes if c == 429]
        assert busy and all("serve.max_concurrency=1" in g["detail"] for g in busy)
    finally:
        proc.terminate()
        proc.wait(30)


def test_concurrent_requests_are_answered_together_and_each_as_alone(built):
    """The batcher answers the queries of requests in flight in one call per kind: each request's answer equals
    the bundle's answer to it alone, and under load fewer model calls than requests are made."""
    from conftest import load

    from trainer.serve import Batcher

    b = load(built)
    calls = []
    original = b.recommend

    def counted(**kw):
        calls.append(len(kw.get("customer_ids") or kw.get("histories")))
        if len(calls) == 1:
            time.sleep(0.5)  # the first round is slow: the other requests queue behind it meanwhile
        return original(**kw)

    b.recommend = counted
    ids = raw_customer_ids(built)[:40]
    batcher = Batcher(max_queries=64)
    got = {}

    def ask(i):
        got[i] = batcher.recommend(b, "customer_id", [ids[i]], 6, False).article_ids[0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(ids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    b.recommend = original
    want = original(customer_ids=ids, k=6, exclude_seen=False).article_ids
    assert [got[i] for i in range(len(ids))] == want
    assert sum(calls) == len(ids) and len(calls) <= 3  # the first alone, the rest together
