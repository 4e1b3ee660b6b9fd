"""Install advice that works: sigmatune is not on PyPI, so an extra is installed from the clone (or the
missing package by name); a CPU machine gets a line that installs torch without CUDA (issue 38)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from sigmatune import SigmaConfig, get_sigma_model
from tests.models import tiny_llama

ROOT = Path(__file__).resolve().parents[2]
FROM_PYPI = re.compile(r"pip install [\"']?sigmatune\[")  # an extra of a package PyPI does not have


def test_the_readme_installs_from_the_clone_and_has_a_cpu_line():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert not FROM_PYPI.search(readme)
    install = readme[readme.index("## Install") :]
    cpu = install.index("pip install torch --index-url https://download.pytorch.org/whl/cpu")
    assert cpu < install.index('pip install -e ".[cli]"')  # torch first, then sigmatune from the clone


def test_inspect_plot_without_matplotlib_names_what_to_install(tmp_path):
    get_sigma_model(tiny_llama(), SigmaConfig(rank=4)).save_pretrained(tmp_path / "adapter")
    child = (  # matplotlib made unimportable, as where it is not installed
        "import sys; sys.modules['matplotlib'] = None; from sigmatune.cli import main; "
        f"sys.exit(main(['inspect', {str(tmp_path / 'adapter')!r}, '--plot', {str(tmp_path / 'p.png')!r}]))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and "pip install matplotlib" in done.stderr, done.stderr
    assert "pip install -e '.[plot]'" in done.stderr and not FROM_PYPI.search(done.stderr), done.stderr
