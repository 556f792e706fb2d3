"""`pip install .` (not only editable) ships the configs: a built wheel composes every experiment."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO


def source_copy(dest: Path) -> Path:
    """The working tree's files (tracked, and new ones git does not ignore) copied to `dest`: pip builds in
    the source tree, so building from the checkout would leave build/ and *.egg-info behind, and a stale
    build/lib there (a module deleted since) could end up in the wheel."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("needs git to list the source files")
    for name in filter(None, listed.stdout.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.mark.slow  # builds a wheel with pip (~10 s with a warm pip cache, a minute cold)
def test_wheel_carries_configs_and_composes_from_any_directory(tmp_path):
    source = source_copy(tmp_path / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(tmp_path / "whl")],
                   check=True, capture_output=True, timeout=300)
    wheel, = (tmp_path / "whl").glob("compress-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    data = (".yaml", ".csv")  # config files and the tables experiments are generated from
    shipped = {n for n in names if n.startswith("compress/configs/") and n.endswith(data)}
    in_repo = {f"compress/configs/{p.relative_to(REPO / 'configs').as_posix()}" for p in (REPO / "configs").rglob("*")
               if p.suffix in data}
    assert shipped == in_repo
    # Every module of the package is shipped (a subpackage missing from pyproject's list is not).
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "compress").rglob("*.py") if "__pycache__" not in p.parts}
    assert modules - names == set()
    # From the wheel alone, in another directory: a YAML experiment and a row of the ApproxConv table (CSV).
    code = ("import compress, sys; assert compress.__file__.startswith(sys.argv[1]), compress.__file__\n"
            "from compress.job.compose import compose\n"
            "for name in ('cfdp_resnet56', 'approxconv_resnet32_cheb_3322'):\n"
            "    c = compose([f'experiment={name}'])\n"
            "    print(c.method.name, c.arch.name, c.method.compress_rate if c.method.name == 'cfdp' else c.method.harmonics)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site")], cwd=tmp_path, capture_output=True,
                         text=True, env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["cfdp resnet56 [0.]+[0.18]*29", "approxconv resnet32 [3, 3, 2, 2]"]
