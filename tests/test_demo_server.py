"""The demo web server: every fault mode over real HTTP (urllib, and img2dataset's own fetch function)."""
from __future__ import annotations

import hashlib
import http.client
import io
import json
import select
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from multiprocessing.pool import ThreadPool
from pathlib import Path

import pytest
from PIL import Image

from clipmill.components.common.errors import InputError
from clipmill.components.demo_corpus import DEMO_BASE_URL, load_ground_truth, serve_web
from clipmill.components.demo_corpus.corpus import generate_demo_corpus
from clipmill.components.demo_corpus.params import DemoCorpusParams

from .conftest import REPO

SLOW_SECONDS = 1.5
IMPATIENT = 0.3  # client timeout well below SLOW_SECONDS
PATIENT = 30.0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small crawl in which every behaviour occurs several times."""
    root = tmp_path_factory.mktemp("web")
    behaviours = dict.fromkeys(["not_found", "transient_5xx", "slow", "truncated", "html_as_image", "redirect",
                                "robots_noai"], 0.06)
    params = DemoCorpusParams(num_pairs=100, behaviours=behaviours, zeroshot_per_class=1, retrieval_size=1,
                              trusted_size=1, workers=1)
    generate_demo_corpus(params, 3, root / "crawl", root / "eval", root / "trusted")
    return root / "crawl" / "web", load_ground_truth(root / "crawl" / "ground_truth.parquet")


@pytest.fixture
def server(corpus):
    web, _ = corpus
    with serve_web(web, slow_seconds=SLOW_SECONDS) as base_url:
        yield base_url


def _url(base_url: str, row) -> str:
    return base_url + row.url[len(DEMO_BASE_URL):]


def _rows(truth, behaviour: str):
    rows = list(truth[truth["behaviour"] == behaviour].itertuples())
    assert rows, behaviour
    return rows


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_ok_serves_the_file_with_its_content_type(corpus, server):
    _, truth = corpus
    for row in _rows(truth, "ok")[:10]:
        with urllib.request.urlopen(_url(server, row), timeout=PATIENT) as r:
            assert r.status == 200 and r.headers["Content-Type"] == f"image/{row.image_format}"
            assert _sha(r.read()) == row.image_sha256


def test_not_found_and_unknown_paths_are_404(corpus, server):
    _, truth = corpus
    for url in [_url(server, _rows(truth, "not_found")[0]), server + "/no/such/image.jpg"]:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url, timeout=PATIENT)
        assert e.value.code == 404


def test_transient_5xx_fails_once_per_path_then_succeeds(corpus, server):
    _, truth = corpus
    first, second = _rows(truth, "transient_5xx")[:2]
    for row in (first, second):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(_url(server, row), timeout=PATIENT)
        assert e.value.code == 503
    with urllib.request.urlopen(_url(server, first), timeout=PATIENT) as r:
        assert r.status == 200 and _sha(r.read()) == first.image_sha256


def test_slow_times_out_an_impatient_client_and_answers_a_patient_one(corpus, server):
    _, truth = corpus
    row = _rows(truth, "slow")[0]
    with pytest.raises((TimeoutError, urllib.error.URLError)) as e:
        urllib.request.urlopen(_url(server, row), timeout=IMPATIENT)
    assert "timed out" in str(e.value)
    with urllib.request.urlopen(_url(server, row), timeout=PATIENT) as r:
        assert r.status == 200 and _sha(r.read()) == row.image_sha256


def test_truncated_announces_the_full_length_and_sends_part(corpus, server):
    web, truth = corpus
    row = _rows(truth, "truncated")[0]
    with urllib.request.urlopen(_url(server, row), timeout=PATIENT) as r:
        assert int(r.headers["Content-Length"]) == (web / row.image_file).stat().st_size
        with pytest.raises(http.client.IncompleteRead):
            r.read()


def test_html_as_image_is_a_page_labelled_jpeg(corpus, server):
    _, truth = corpus
    row = _rows(truth, "html_as_image")[0]
    with urllib.request.urlopen(_url(server, row), timeout=PATIENT) as r:
        body = r.read()
        assert r.headers["Content-Type"] == "image/jpeg" and body.startswith(b"<!DOCTYPE html>")
    with pytest.raises(Image.UnidentifiedImageError):
        Image.open(io.BytesIO(body))


def test_redirect_is_a_302_to_the_image(corpus, server):
    _, truth = corpus
    row = _rows(truth, "redirect")[0]
    conn = http.client.HTTPConnection(server[len("http://"):], timeout=PATIENT)
    conn.request("GET", row.url[len(DEMO_BASE_URL):])
    response = conn.getresponse()
    assert response.status == 302 and response.getheader("Location").startswith("/")
    conn.close()
    with urllib.request.urlopen(_url(server, row), timeout=PATIENT) as r:
        assert r.status == 200 and r.geturl() != _url(server, row) and _sha(r.read()) == row.image_sha256


def test_robots_noai_sends_the_opt_out_header(corpus, server):
    _, truth = corpus
    row = _rows(truth, "robots_noai")[0]
    with urllib.request.urlopen(_url(server, row), timeout=PATIENT) as r:
        assert r.headers["X-Robots-Tag"] == "noai" and _sha(r.read()) == row.image_sha256


def _expected_outcome(row, stream, err) -> bool:
    if row.behaviour in ("ok", "redirect", "transient_5xx"):
        return stream is not None and _sha(stream.getvalue()) == row.image_sha256
    if row.behaviour == "html_as_image":
        return stream is not None and stream.getvalue().startswith(b"<!DOCTYPE html>")
    expected_error = {"not_found": "404", "slow": "timed out", "truncated": "IncompleteRead",
                      "robots_noai": "X-Robots-Tag"}[row.behaviour]
    return stream is None and expected_error in err


def test_img2dataset_fetch_sees_each_behaviour(corpus):
    """img2dataset's own fetch-with-retry: transient errors recover, the other faults fail as intended."""
    from img2dataset.downloader import download_image_with_retry  # imported here: it pulls in torch

    web, truth = corpus
    rows = list(truth.itertuples())
    timeout = 3.0  # generous, so that only the slow URLs time out on a busy machine

    def fetch(row):
        _, stream, err = download_image_with_retry((row.uid, _url(base_url, row)), timeout=timeout, retries=1,
                                                   user_agent_token=None,
                                                   disallowed_header_directives=["noai", "noimageai"])
        return row, stream, err

    with serve_web(web, slow_seconds=3 * timeout) as base_url, ThreadPool(16) as pool:
        outcomes = pool.map(fetch, rows)
    wrong = [(row.behaviour, err) for row, stream, err in outcomes if not _expected_outcome(row, stream, err)]
    assert not wrong
    assert {row.behaviour for row in rows} == {"ok", "not_found", "transient_5xx", "slow", "truncated",
                                                "html_as_image", "redirect", "robots_noai"}


def test_a_directory_without_routes_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="routes.json: no routes file"):
        with serve_web(tmp_path):
            pass
    (tmp_path / "routes.json").write_text(json.dumps({"routes": []}))
    with pytest.raises(InputError, match="field 'format'"):
        with serve_web(tmp_path):
            pass


def _first_line(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "clipmill demo-server printed no base URL"
    return proc.stdout.readline().strip()


def test_demo_server_command_serves_until_interrupted(corpus, tmp_path):
    web, truth = corpus
    row = _rows(truth, "ok")[0]
    cmd = [str(Path(sys.executable).parent / "clipmill"), "demo-server", "--web", str(web),
           "--params", str(REPO / "params.yaml")]
    stderr = open(tmp_path / "stderr.log", "w")  # a file, not a pipe nobody reads: the server never blocks on it
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        base_url = _first_line(proc, timeout=180)
        assert base_url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(_url(base_url, row), timeout=PATIENT) as r:
            assert r.status == 200 and _sha(r.read()) == row.image_sha256
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, (tmp_path / "stderr.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()


def _web(tmp_path: Path, routes: dict) -> Path:
    web = tmp_path / "web"
    (web / "img").mkdir(parents=True, exist_ok=True)
    (web / "img" / "a.jpg").write_bytes(b"inside")
    (web / "routes.json").write_text(json.dumps({"format": 1, "routes": routes}))
    return web


@pytest.mark.parametrize("route, problem", [
    ({"behaviour": "ok", "file": "../secret.txt", "content_type": "text/plain"}, "is not a file name inside"),
    ({"behaviour": "ok", "file": "/etc/hostname", "content_type": "text/plain"}, "is not a file name inside"),
    ({"behaviour": "ok", "file": "img/link.jpg", "content_type": "image/jpeg"}, "is not a file name inside"),
    ({"behaviour": "redirect", "target": "http://169.254.169.254/latest/meta-data/"}, "is not a path on this server"),
    ({"behaviour": "redirect", "target": "//evil.test/x"}, "is not a path on this server"),
])
def test_routes_reading_outside_web_or_redirecting_off_server_are_refused_at_start(tmp_path, route, problem):
    (tmp_path / "secret.txt").write_text("private key")
    web = _web(tmp_path, {"/x": route})
    (web / "img" / "link.jpg").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(InputError, match=problem) as err:
        with serve_web(web):
            pass
    assert err.value.field == "routes" and err.value.file == str(web / "routes.json")


def test_a_file_swapped_for_a_link_out_of_web_after_start_is_not_served(tmp_path):
    (tmp_path / "secret.txt").write_text("private key")
    web = _web(tmp_path, {"/a": {"behaviour": "ok", "file": "img/a.jpg", "content_type": "image/jpeg"}})
    with serve_web(web) as base_url:
        with urllib.request.urlopen(base_url + "/a", timeout=PATIENT) as r:
            assert r.read() == b"inside"
        (web / "img" / "a.jpg").unlink()
        (web / "img" / "a.jpg").symlink_to(tmp_path / "secret.txt")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base_url + "/a", timeout=PATIENT)
        assert err.value.code == 404


def test_a_port_in_use_is_one_config_error_not_a_traceback(corpus):
    from clipmill.components.common.errors import ConfigError

    web, _ = corpus
    with serve_web(web) as base_url:
        port = int(base_url.rsplit(":", 1)[1])
        with pytest.raises(ConfigError, match=f"cannot serve .* at 127.0.0.1:{port}: Address already in use"):
            with serve_web(web, port=port):
                pass
