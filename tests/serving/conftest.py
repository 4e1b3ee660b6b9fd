"""The HTTP server's tests need the [serve] extra (fastapi, uvicorn) and the test extra's clients (httpx, openai),
which the README's test command installs: where one is missing (a GPU machine with torch alone) the test files
that import them, or a server module that does, are left out of collection, not errors. The files are found by
their imports, so a new server test needs no list kept by hand."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

CLIENTS = ("fastapi", "uvicorn", "httpx", "openai")
SERVER_MODULES = ("sigmatune.serving.server", "sigmatune.serving.routes", "sigmatune.serving.api_input")


def imported_modules(path: Path) -> set[str]:
    """The modules a test file imports at its top level."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    return names | {node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}


def needs_the_server(path: Path) -> bool:
    return any(
        name.split(".")[0] in CLIENTS or name.startswith(SERVER_MODULES) for name in imported_modules(path)
    )


SERVER_FILES = sorted(p.name for p in Path(__file__).parent.glob("test_*.py") if needs_the_server(p))
SERVE_EXTRA = all(importlib.util.find_spec(name) is not None for name in CLIENTS)
collect_ignore = [] if SERVE_EXTRA else SERVER_FILES
