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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port: int, path: str, body=None, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
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
