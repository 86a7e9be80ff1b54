#!/usr/bin/env bash
# `make bundle`: everything an edge box needs to install the aggregator without internet, in one
# folder: wheels of spar-edge and its `edge` extra for the box's platform (default: a Jetson on
# JetPack 6, aarch64, Python 3.10), the shipped models and the configs, an install script and
# checksums. Build it on a machine with PyPI access, copy the folder (or its .tar.gz) to the box:
#     tar xzf spar-edge-bundle.tar.gz && cd spar-edge-bundle && ./install.sh
#
# ARCH (aarch64 | x86_64), PYTHON_VERSION (3.10), OUT (build/spar-edge-bundle);
# EXTRA=edge-jetpack leaves ONNX Runtime out (a Jetson whose JetPack provides onnxruntime-gpu);
# DOWNLOAD=0 skips the dependency wheels (layout checks without network: the tests use it).
set -euo pipefail

BIN=${VENV:-.venv}/bin
ARCH=${ARCH:-aarch64}
PY=${PYTHON_VERSION:-3.10}
EXTRA=${EXTRA:-edge}
OUT=${OUT:-build/spar-edge-bundle}
DOWNLOAD=${DOWNLOAD:-1}
case "$ARCH" in aarch64|x86_64) ;; *) echo "ARCH must be aarch64 or x86_64, got $ARCH" >&2; exit 2 ;; esac
case "$EXTRA" in edge|edge-jetpack) ;; *) echo "EXTRA must be edge or edge-jetpack, got $EXTRA" >&2; exit 2 ;; esac

rm -rf "$OUT"
mkdir -p "$OUT/wheels"
# spar-edge itself (pure Python), built with this environment's setuptools: no download
"$BIN/pip" wheel -q --no-deps --no-build-isolation --wheel-dir "$OUT/wheels" .
rm -rf build/lib build/bdist.*  # setuptools' in-tree leftovers (build/ also holds model builds: only these)
WHEEL=$(basename "$(ls "$OUT"/wheels/spar_edge-*.whl)")
if [ "$DOWNLOAD" = 1 ]; then
    # Binary wheels only, for the box's platform and Python, never this machine's.
    "$BIN/pip" download -q --dest "$OUT/wheels" --only-binary=:all: --implementation cp --python-version "$PY" \
        --platform "manylinux2014_$ARCH" --platform "manylinux_2_17_$ARCH" --platform "manylinux_2_28_$ARCH" \
        "$OUT/wheels/$WHEEL[$EXTRA]" $(python3 - "$PY" <<'PYV'
import sys
major, minor = map(int, sys.argv[1].split(".")[:2])
# pip evaluates environment markers for this interpreter, not for --python-version: spar-edge's
# `tomli; python_version < "3.11"` must be named for an older box.
print("tomli>=2.0" if (major, minor) < (3, 11) else "")
PYV
)
fi
mkdir -p "$OUT/models"
for model in parking_lot parking_lot_multi ridgecrest_like; do
    cp -r "models/$model" "$OUT/models/"
done
cp -r configs "$OUT/configs"
VENV_FLAGS=""
[ "$EXTRA" = edge-jetpack ] && VENV_FLAGS="--system-site-packages"  # JetPack's onnxruntime-gpu and tensorrt
cat > "$OUT/install.sh" <<INSTALL
#!/usr/bin/env bash
# Offline install of the spar-edge aggregator: a virtual environment beside this folder's wheels.
set -euo pipefail
cd "\$(dirname "\$0")"
sha256sum -c --quiet SHA256SUMS
PYTHON=\${PYTHON:-python3}
\$PYTHON -m venv $VENV_FLAGS \${VENV:-venv}
\${VENV:-venv}/bin/pip install --no-index --find-links wheels "spar-edge[$EXTRA]"
\${VENV:-venv}/bin/spar-aggregator --help > /dev/null
echo "installed: \${VENV:-venv}/bin/spar-aggregator run --config configs/aggregator.toml"
INSTALL
chmod +x "$OUT/install.sh"
cat > "$OUT/BUNDLE.json" <<META
{"spar_edge": "$WHEEL", "extra": "$EXTRA", "arch": "$ARCH", "python": "$PY", "dependencies_downloaded": $([ "$DOWNLOAD" = 1 ] && echo true || echo false),
 "commit": "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)", "built": "$(date -u +%FT%TZ)"}
META
(cd "$OUT" && find . -type f ! -name SHA256SUMS -print0 | sort -z | xargs -0 sha256sum > SHA256SUMS)
tar -C "$(dirname "$OUT")" -czf "$OUT.tar.gz" "$(basename "$OUT")"
echo "bundle: $OUT ($(du -sh "$OUT" | cut -f1)), $OUT.tar.gz; on the box: ./install.sh"
