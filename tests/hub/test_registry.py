"""Registry downloads from a real loopback index: once, checked by sha256."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from functools import partial

import pytest

from sigmatune.hub.registry import npm_file, registry_file


class _Index(http.server.SimpleHTTPRequestHandler):
    """A package index on loopback: /simple/<project>/ as PEP 691 JSON, and the files."""

    def do_GET(self):
        if self.path.startswith("/simple/demo/"):
            files = [{"filename": "demo-1.0.tar.gz", "url": "/files/demo-1.0.tar.gz", "hashes": {}}]
            body = json.dumps({"files": files}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.pypi.simple.v1+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def index(tmp_path, monkeypatch):
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "demo-1.0.tar.gz").write_bytes(b"payload " * 1000)
    (tmp_path / "@scope" / "demo" / "-").mkdir(parents=True)  # an npm registry's tarball address
    (tmp_path / "@scope" / "demo" / "-" / "demo-1.0.tgz").write_bytes(b"payload " * 1000)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Index, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_port}/simple")
    monkeypatch.setenv("npm_config_registry", f"http://127.0.0.1:{server.server_port}")
    yield hashlib.sha256(b"payload " * 1000).hexdigest()
    server.shutdown()


def test_registry_file_downloads_once_and_checks_sha256(index, isolated_cache):
    with pytest.raises(RuntimeError, match=r"has sha256 .* expected 0000: refused"):
        registry_file("demo", "demo-1.0.tar.gz", "0000")
    assert not (isolated_cache.parent / "downloads" / "demo-1.0.tar.gz").exists()
    path = registry_file("demo", "demo-1.0.tar.gz", index)
    assert path.read_bytes() == b"payload " * 1000
    assert registry_file("demo", "demo-1.0.tar.gz", "not checked again") == path
    with pytest.raises(RuntimeError, match=r"lists no demo-2\.0\.tar\.gz.*put it at"):
        registry_file("demo", "demo-2.0.tar.gz", index)


def test_npm_file_downloads_once_and_checks_sha256(index, isolated_cache):
    downloads = isolated_cache.parent / "downloads"
    with pytest.raises(RuntimeError, match=r"scope-demo-1\.0\.tgz .* has sha256 .* expected 0000: refused"):
        npm_file("@scope/demo", "1.0", "0000")
    assert not list(downloads.iterdir())  # nothing half-written is left
    path = npm_file("@scope/demo", "1.0", index)
    assert (
        path == downloads / "scope-demo-1.0.tgz" and path.read_bytes() == b"payload " * 1000
    )  # npm pack's name
    assert npm_file("@scope/demo", "1.0", "not checked again") == path
    with pytest.raises(
        RuntimeError, match=r"could not download scope-demo-2\.0\.tgz .*npm pack @scope/demo@2\.0.*put it at"
    ):
        npm_file("@scope/demo", "2.0", index)
