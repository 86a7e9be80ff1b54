"""`make bundle`: the offline install folder for an edge box. The dependency wheels come from PyPI
(not reachable from tests: DOWNLOAD=0); what is checked here is everything else the box relies on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from spar_wire.model_manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "spar-edge-bundle"
    env = {**os.environ, "VENV": str(Path(sys.executable).parent.parent), "DOWNLOAD": "0", "OUT": str(out),
           "EXTRA": "edge-jetpack"}
    done = subprocess.run(["bash", "scripts/make_bundle.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_the_bundle_holds_the_wheel_models_configs_and_an_installer(bundle):
    wheel = next((bundle / "wheels").glob("spar_edge-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "edge_runtime/dashboard_static/index.html" in names  # the page works offline from the wheel
    jetpack = [line for line in metadata.splitlines() if 'extra == "edge-jetpack"' in line]
    assert jetpack and not any("onnxruntime" in line or "torch" in line for line in jetpack)
    for model in ("parking_lot", "parking_lot_multi", "ridgecrest_like"):
        load_manifest(bundle / "models" / model / "model.int8.dynamic.manifest.json").verify_artifact()
    assert (bundle / "configs" / "aggregator-busy-lot.toml").exists()
    installer = (bundle / "install.sh").read_text()
    assert "--no-index --find-links wheels" in installer and '"spar-edge[edge-jetpack]"' in installer
    assert "--system-site-packages" in installer  # JetPack's onnxruntime-gpu and tensorrt
    info = json.loads((bundle / "BUNDLE.json").read_text())
    assert (info["arch"], info["python"], info["dependencies_downloaded"]) == ("aarch64", "3.10", False)


def test_the_checksums_cover_every_file_and_catch_a_change(bundle):
    check = subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=bundle, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    listed = {line.split(maxsplit=1)[1].strip() for line in (bundle / "SHA256SUMS").read_text().splitlines()}
    files = {f"./{p.relative_to(bundle)}" for p in bundle.rglob("*") if p.is_file() and p.name != "SHA256SUMS"}
    assert listed == files
    with tarfile.open(f"{bundle}.tar.gz") as archive:
        assert "spar-edge-bundle/install.sh" in archive.getnames()
    (bundle / "configs" / "aggregator.toml").write_text("# changed\n")
    check = subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=bundle, capture_output=True, text=True)
    assert check.returncode != 0 and "aggregator.toml" in check.stdout


def test_bad_settings_are_refused(tmp_path):
    env = {**os.environ, "ARCH": "armv7", "OUT": str(tmp_path / "b")}
    done = subprocess.run(["bash", "scripts/make_bundle.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "ARCH must be aarch64 or x86_64" in done.stderr
