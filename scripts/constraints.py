"""The tested versions in scripts/constraints.txt, for the environment this Python runs in.

    python scripts/constraints.py effective scripts/constraints.txt  # the pins setup.sh hands pip (-c) here
    python scripts/constraints.py diff scripts/constraints.txt       # what is installed against the pins
    python scripts/constraints.py freeze                              # a new constraints file from this venv

The file pins every package the README's two commands install (sigmatune's `[cli]`, and
`[cli,plot,serve,test]` for the tests) except sigmatune and torch. torch is named only on its comment
line (`# torch==…`): setup.sh installs that release where no torch is installed, and keeps a torch that
is. Where the installed torch is not the tested build, the packages it requires itself (a CUDA build
pins its Triton exactly, some releases pin sympy) follow that torch instead of the file, and torch is
pinned to what is installed: pip never swaps a user's torch. Standard library only: it runs before
anything else is installed.
"""

from __future__ import annotations

import platform
import re
import sys
from importlib import metadata

LEFT_OUT = {"sigmatune", "torch", "pip"}  # never pinned in the file (pip: the venv's own)
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")
TESTED_TORCH = re.compile(r"^# torch==(\S+)")
HEADER = """\
# The tested versions. scripts/setup.sh installs with these pins (pip's -c), so the README's two
# commands (scripts/train.sh: [cli]; scripts/test.sh: [cli,plot,serve,test]) get the set the suite passed
# with; pyproject.toml's ranges stay open for anyone installing sigmatune otherwise. Written by
# `bash scripts/test-newest.sh --update` from a virtualenv that passed the suite: edit by hand only to
# pin one package back. {python}.
# torch is not pinned below. The tested build is on the next line: setup.sh installs that release where no
# torch is installed (tests/test_install.py checks they agree) and keeps a torch that is (constraints.py).
# torch=={torch}
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read(path: str) -> tuple[dict[str, str], str | None]:
    """The pins {canonical name: version} and the tested torch's version (its comment line)."""
    pins, torch = {}, None
    with open(path, encoding="utf-8") as file:
        lines = file.read().splitlines()
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if found := TESTED_TORCH.match(line):
            torch = found[1]
        elif line and not line.startswith("#"):
            pin = PIN.match(line)
            if pin is None:
                raise SystemExit(f"{path}:{number}: expected name==version, found {line!r}")
            pins[canonical(pin[1])] = pin[2]
    return pins, torch


def installed() -> dict[str, tuple[str, str]]:
    """{canonical name: (name as the package spells it, version)} of this environment."""
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonical(name), (name, dist.version))
    return found


def requirement_names(package: str) -> set[str]:
    """The packages `package` requires itself (any marker, any extra: a superset is safe here)."""
    names = set()
    for requirement in metadata.requires(package) or []:
        if name := re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement):
            names.add(canonical(name[1]))
    return names


def effective(pins: dict[str, str], tested_torch: str | None, torch: str | None, torch_needs: set[str]):
    """The constraint lines for an environment whose torch is `torch` (None: not installed), and a note
    on what was left to that torch (None when nothing was)."""
    note = None
    if torch is not None and torch != tested_torch:
        kept = sorted(name for name in pins if name in torch_needs)
        pins = {name: version for name, version in pins.items() if name not in torch_needs}
        note = (
            f"torch {torch} is installed, not the tested {tested_torch}: it is kept, and what it requires "
            f"itself ({', '.join(kept) or 'nothing pinned'}) follows it rather than scripts/constraints.txt"
        )
    lines = [f"{name}=={version}" for name, version in sorted(pins.items())]
    if torch is not None:
        lines.append(f"torch=={torch}")
    return lines, note


def main(argv: list[str]) -> int:
    mode, *paths = argv
    here = installed()
    torch = here.get("torch", (None, None))[1]
    if mode == "effective":
        pins, tested_torch = read(paths[0])
        lines, note = effective(pins, tested_torch, torch, requirement_names("torch") if torch else set())
        if note:
            print(note, file=sys.stderr)
        print("\n".join(lines))
    elif mode == "diff":
        pins, tested_torch = read(paths[0])
        pins["torch"] = tested_torch or "?"
        versions = {name: version for name, (_, version) in here.items() if name not in LEFT_OUT - {"torch"}}
        differ = sorted(name for name in set(pins) & set(versions) if pins[name] != versions[name])
        added, missing = sorted(set(versions) - set(pins)), sorted(set(pins) - set(versions))
        for name in differ:
            print(f"  {name}: {pins[name]} -> {versions[name]}")
        for name in added:
            print(f"  {name}: (not pinned) -> {versions[name]}")
        print(
            f"{len(differ)} of the {len(pins)} pinned versions differ, {len(added)} installed packages are not "
            f"pinned, {len(missing)} pinned ones are not installed{': ' if missing else ''}{', '.join(missing)}"
        )
    elif mode == "freeze":
        python = f"Python {platform.python_version()} ({platform.system()} {platform.machine()})"
        sys.stdout.write(HEADER.format(python=python, torch=torch))
        for name in sorted(set(here) - LEFT_OUT):
            print(f"{here[name][0]}=={here[name][1]}")
    else:
        raise SystemExit(f"unknown mode {mode!r}: effective, diff or freeze")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
