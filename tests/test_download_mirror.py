"""download.mirrors: URL prefixes answered from local directories by a loopback server the stage starts."""
from __future__ import annotations

import http.client
import io
import json
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from clipmill.components.common.errors import ConfigError, InputError
from clipmill.components.common.mirror import serve_mirror
from clipmill.components.common.params import RayParams, TrackingParams
from clipmill.components.download.params import DownloadParams
from clipmill.components.download.stage import build_requests, download

PREFIX = "http://images.example.test/site"
PATIENT = 30.0


def _png(path: Path, color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture
def plain(tmp_path) -> Path:
    """A mirror directory without a routes file: two images, and a secret beside (not inside) it."""
    _png(tmp_path / "mirror" / "a.png", "red")
    _png(tmp_path / "mirror" / "sub" / "b c.png", "blue")
    (tmp_path / "secret.txt").write_text("private key")
    (tmp_path / "mirror" / "link.png").symlink_to(tmp_path / "secret.txt")
    return tmp_path / "mirror"


def test_a_plain_directory_is_served_as_files_and_nothing_outside_it(plain):
    with serve_mirror([plain]) as base_url:
        with urllib.request.urlopen(base_url + "/sub/b%20c.png", timeout=PATIENT) as r:
            assert r.headers["Content-Type"] == "image/png"
            assert r.read() == (plain / "sub" / "b c.png").read_bytes()
        for path in ("/missing.png", "/link.png", "/sub", "/"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(base_url + path, timeout=PATIENT)
            assert err.value.code == 404, path
        conn = http.client.HTTPConnection(base_url[len("http://"):], timeout=PATIENT)
        conn.request("GET", "/../secret.txt")  # sent as is, not normalised by the client
        assert conn.getresponse().status == 404
        conn.close()


@pytest.mark.parametrize("route, problem", [
    ({"behaviour": "teapot", "file": "a.png", "content_type": "image/png"}, "is not one of"),
    ({"behaviour": "ok", "content_type": "image/png"}, "is not a file name inside"),
    ({"behaviour": "slow", "file": "a.png"}, "needs a content_type"),
])
def test_a_routes_file_that_breaks_a_rule_is_refused_at_start(plain, route, problem):
    (plain / "routes.json").write_text(json.dumps({"format": 1, "routes": {"/x": route}}))
    with pytest.raises(InputError, match=problem) as err, serve_mirror([plain]):
        pass
    assert err.value.field == "routes" and err.value.file == str(plain / "routes.json")


def test_route_files_are_checked_folder_by_folder_with_the_answer_of_a_full_resolve(plain, tmp_path):
    """A routes file's names are checked with each parent folder resolved once; every answer, for links in and
    out, dots, absolute paths and missing files, is that of resolving the name in full."""
    from clipmill.components.common.mirror import _inside, _Names

    (plain / "sub" / "up").symlink_to(tmp_path)          # a folder link out of the mirror
    (plain / "sub" / "same").symlink_to(plain / "sub")   # a folder link that stays inside
    (plain / "inner.png").symlink_to(plain / "a.png")    # a file link that stays inside
    names = ["a.png", "sub/b c.png", "link.png", "inner.png", "missing.png", "sub/missing/x.png", "sub/up/secret.txt",
             "sub/same/b c.png", "sub/../a.png", "sub/../../secret.txt", "../secret.txt", "/etc/passwd", ".", "..",
             "sub/", "sub/.", "sub//b c.png", "./a.png", "", None, 3]
    checker = _Names(plain)
    for name in names * 2:  # the second round answers from the folders already resolved
        assert checker.inside(name) == _inside(plain, name), name
    assert checker.inside("sub/up/secret.txt") is None and checker.inside("sub/same/b c.png") is not None


def test_mirror_params_are_checked_with_the_key_path():
    from clipmill.params import parse_params

    with pytest.raises(ConfigError, match=r"download\.mirrors\.0\.prefix: .*not an http\(s\)://host"):
        parse_params({"download": {"mirrors": [{"prefix": "file:///etc", "dir": "x"}]}})
    with pytest.raises(ConfigError, match=r"download\.mirrors: .*overlaps another mirror's"):
        parse_params({"download": {"mirrors": [{"prefix": "http://a.test", "dir": "x"},
                                               {"prefix": "http://a.test/b/", "dir": "y"}]}})
    mirror = DownloadParams(mirrors=[{"prefix": "http://a.test/", "dir": "x"}]).mirrors[0]
    assert mirror.prefix == "http://a.test" and mirror.slow_seconds == 20.0
    assert "mirrors" not in DownloadParams().fingerprint()


def test_only_urls_under_a_mirror_skip_the_host_check():
    params = DownloadParams(mirrors=[{"prefix": "http://127.0.0.1:9", "dir": "x"}])
    table = pd.DataFrame({"url": ["http://127.0.0.1:9/a.png", "http://127.0.0.1:90/a.png", "http://127.0.0.1:9"]})
    refusal = build_requests(table, params.mirrors, allow_private_hosts=False)["refusal"].tolist()
    assert refusal == [None, "private_host", "private_host"]


def test_the_stage_fetches_a_mirrored_prefix_from_its_directory(plain, tmp_path):
    urls = [f"{PREFIX}/a.png", f"{PREFIX}/sub/b%20c.png", f"{PREFIX}/missing.png",
            f"http://127.0.0.1:9/?u={PREFIX}/a.png"]  # the prefix elsewhere in a URL is not swapped
    pd.DataFrame({"url": urls, "caption": ["red", "blue", "none", "private"]}).to_parquet(tmp_path / "urls.parquet")
    params = DownloadParams(urls=str(tmp_path / "urls.parquet"), mirrors=[{"prefix": PREFIX, "dir": str(plain)}],
                            timeout=5, retries=0, processes_count=1, thread_count=4, image_size=16)
    summary = download(params, params.urls, tmp_path / "out", tracking=TrackingParams(enabled=False),
                       ray_params=RayParams())
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert manifest["status"].tolist() == ["success", "success", "failed_to_download", "refused"]
    assert manifest["error_reason"].tolist()[2:] == ["http_404", "private_host"]
    assert manifest["url"].tolist() == urls and summary["by_status"]["success"] == 2


def test_a_missing_mirror_directory_is_one_clear_error(tmp_path):
    pd.DataFrame({"url": [f"{PREFIX}/a.png"], "caption": ["red"]}).to_parquet(tmp_path / "urls.parquet")
    params = DownloadParams(urls=str(tmp_path / "urls.parquet"),
                            mirrors=[{"prefix": PREFIX, "dir": str(tmp_path / "nowhere")}])
    with pytest.raises(InputError, match="mirror directory .* does not exist") as err:
        download(params, params.urls, tmp_path / "out", tracking=TrackingParams(enabled=False),
                 ray_params=RayParams())
    assert err.value.file == str(tmp_path / "nowhere")

