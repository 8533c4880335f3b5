"""Packaging: a built wheel (not editable) ships the default model and its card; `streamrnn info` runs from it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import streamrnn

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"  # a clean copy: no stale build/ of an earlier build leaks into the wheel
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__", ".hypothesis", ".*_cache"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "license" not in r.stderr.lower() or "deprecat" not in r.stderr.lower(), r.stderr
    (whl,) = out.glob("streamrnn-*.whl")
    return whl


def test_wheel_ships_models_and_cards(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in (ROOT / "exported").iterdir():
        if f.suffix in (".onnx", ".md"):
            assert f"streamrnn/exported/{f.name}" in names


def test_streamrnn_info_from_an_installed_wheel(wheel, tmp_path):
    """Fresh venv; the current venv's site-packages give the dependencies (no network, no build)."""
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # dependencies from this venv, appended after the new venv's own site-packages; its .pth files
    # (the editable install of this checkout) are not processed from a path added this way
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                        "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("STREAMRNN_MODEL", "PYTHONPATH")}
    code = "import streamrnn; print(streamrnn.__file__); print(streamrnn.DEFAULT_MODEL)"
    where = subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                           env=env).stdout.split()
    assert all(p.startswith(site) for p in where), where
    r = subprocess.run([str(env_dir / "bin" / "streamrnn"), "info", "--json", "--providers", "cpu"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    shipped = streamrnn.load(streamrnn.DEFAULT_MODEL, providers="cpu").spec
    assert d["name"] == shipped.name and d["fingerprint"] == shipped.fingerprint
