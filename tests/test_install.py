"""The tested versions (scripts/constraints.txt) and how setup.sh hands them to pip
(scripts/constraints.py): every package the README's commands install is pinned within pyproject.toml's
ranges, the torch setup.sh installs is the tested one, and a torch the user brought is never swapped."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "scripts" / "constraints.txt"
spec = importlib.util.spec_from_file_location("constraints_script", ROOT / "scripts" / "constraints.py")
constraints = importlib.util.module_from_spec(spec)
spec.loader.exec_module(constraints)


def declared() -> list[str]:
    """pyproject.toml's dependencies and those of the extras the README's two commands install."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return project["dependencies"] + [r for extra in ("cli", "plot", "serve", "test") for r in extras[extra]]


def test_every_declared_dependency_but_torch_is_pinned_within_its_range():
    requirements = pytest.importorskip("packaging.requirements")
    pins, _ = constraints.read(CONSTRAINTS)
    assert "sigmatune" not in pins and "torch" not in pins
    for line in declared():
        requirement = requirements.Requirement(line)
        name = constraints.canonical(requirement.name)
        if name == "torch":
            continue
        assert name in pins, f"{name} is not pinned: bash scripts/test-newest.sh --update"
        assert requirement.specifier.contains(pins[name], prereleases=True), (line, pins[name])


def test_the_torch_setup_installs_is_the_tested_one():
    _, tested = constraints.read(CONSTRAINTS)
    installs = re.search(r'SIGMATUNE_TORCH:-torch==([^}"]+)', (ROOT / "scripts" / "setup.sh").read_text())
    assert tested and installs and tested.split("+")[0] == installs[1], (tested, installs)


def test_the_tested_torch_gets_every_pin_and_another_torch_keeps_what_it_requires():
    pins = {"sympy": "1.14.0", "triton": "3.9.0", "numpy": "2.3.5"}
    lines, note = constraints.effective(pins, "2.13.0+cpu", "2.13.0+cpu", {"sympy"})
    assert lines == ["numpy==2.3.5", "sympy==1.14.0", "triton==3.9.0", "torch==2.13.0+cpu"] and note is None
    lines, note = constraints.effective(pins, "2.13.0+cpu", "2.11.0+cu128", {"sympy", "triton", "filelock"})
    assert lines == ["numpy==2.3.5", "torch==2.11.0+cu128"]  # its own Triton and sympy; torch stays
    assert "2.11.0+cu128" in note and "sympy, triton" in note


def test_a_line_that_is_not_a_pin_is_refused(tmp_path):
    path = tmp_path / "constraints.txt"
    path.write_text("# torch==2.13.0+cpu\nnumpy>=2\n")
    with pytest.raises(SystemExit, match=r"constraints.txt:2: expected name==version"):
        constraints.read(path)
