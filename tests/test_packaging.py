"""The wheel as users install it: every module and every shipped search space inside it.

``make wheel-check`` goes further (a clean virtual environment, a search from outside the
source tree); this test keeps the default suite fast by only building and unpacking the wheel.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_every_module_and_search_space(tmp_path):
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info next to the sources
    for name in ("autoprune", "search_spaces"):
        shutil.copytree(ROOT / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "_spaces"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("autoprune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    spaces = sorted(p.name for p in (ROOT / "search_spaces").glob("*.yaml"))
    modules = {p.relative_to(src).as_posix() for p in (src / "autoprune").rglob("*.py")}
    assert "per_layer_structured.yaml" in spaces
    assert {n for n in names if n.startswith("autoprune/_spaces/")} == {
        f"autoprune/_spaces/{s}" for s in spaces}
    assert {n for n in names if n.endswith(".py")} == modules

    # Installed (unpacked, no source tree next to it), the package finds its spaces.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import autoprune.space as s; print(s.SPACES_DIR); "
            "print(' '.join(s.builtin_spaces())); print(s.load_space('mixed').name)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, text=True,
                         capture_output=True, env={**os.environ, "PYTHONPATH": str(site)})
    lines = out.stdout.splitlines()
    assert lines == [str(site / "autoprune" / "_spaces"), " ".join(s[:-5] for s in spaces),
                     "mixed"]
