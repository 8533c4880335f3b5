"""Packaging: a built wheel (not editable) ships the default model and its card; `streamrnn info` runs from it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import background
import pytest

import streamrnn

ROOT = Path(__file__).resolve().parent.parent


@background.job("wheel build and install", file=__file__)
def _wheel_build(folder: Path) -> dict:
    """The wheel built from a clean copy of the checkout, installed into a fresh venv whose dependencies come from
    this venv's site-packages (no network, no build), and ``streamrnn info`` run from it: all other processes,
    beside the other tests (tests/background.py)."""
    src = folder / "src"  # a clean copy: no stale build/ of an earlier build leaks into the wheel
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__", ".hypothesis", ".*_cache"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(folder), str(src)], capture_output=True, text=True, timeout=300,
                           env=background.ENV)
    got: dict = {"built": built, "wheels": list(folder.glob("streamrnn-*.whl"))}
    if built.returncode != 0 or len(got["wheels"]) != 1:
        return got
    env_dir = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120,
                   env=background.ENV)
    py = env_dir / "bin" / "python"
    got["site"] = site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        capture_output=True, text=True, check=True, env=background.ENV).stdout.strip()
    # dependencies from this venv, appended after the new venv's own site-packages; its .pth files
    # (the editable install of this checkout) are not processed from a path added this way
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    got["install"] = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
                                     "--no-index", "-q", str(got["wheels"][0])], capture_output=True, text=True,
                                    timeout=300, env=background.ENV)
    env = {k: v for k, v in background.ENV.items() if k not in ("STREAMRNN_MODEL", "PYTHONPATH")}
    code = "import streamrnn; print(streamrnn.__file__); print(streamrnn.DEFAULT_MODEL)"
    got["where"] = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=folder, env=env)
    got["info"] = subprocess.run([str(env_dir / "bin" / "streamrnn"), "info", "--json", "--providers", "cpu"],
                                 capture_output=True, text=True, cwd=folder, env=env, timeout=120)
    return got


@pytest.fixture(scope="module")
def built() -> dict:
    got = background.result("wheel build and install")
    r = got["built"]
    assert r.returncode == 0, r.stderr
    assert "license" not in r.stderr.lower() or "deprecat" not in r.stderr.lower(), r.stderr
    assert len(got["wheels"]) == 1, got["wheels"]
    return got


def test_wheel_ships_models_and_cards(built):
    names = set(zipfile.ZipFile(built["wheels"][0]).namelist())
    for f in (ROOT / "exported").iterdir():
        if f.suffix in (".onnx", ".md"):
            assert f"streamrnn/exported/{f.name}" in names


def test_streamrnn_info_from_an_installed_wheel(built):
    """Fresh venv; the current venv's site-packages give the dependencies (no network, no build)."""
    assert built["install"].returncode == 0, built["install"].stderr
    assert built["where"].returncode == 0, built["where"].stderr
    where = built["where"].stdout.split()
    assert all(p.startswith(built["site"]) for p in where), where
    r = built["info"]
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    shipped = streamrnn.load(streamrnn.DEFAULT_MODEL, providers="cpu").spec
    assert d["name"] == shipped.name and d["fingerprint"] == shipped.fingerprint
