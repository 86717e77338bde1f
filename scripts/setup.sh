#!/usr/bin/env bash
# Install everything ttt_meta needs into the current Python (or $PYTHON), idempotently: a few seconds when done.
#   torch 2.14.1 + torchvision 0.29.1, learn2learn 0.2.0 built from its sdist with regenerated Cython sources
#   (its shipped C files do not compile on Python >= 3.11, learn2learn issue #413), then this package, editable.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install --disable-pip-version-check --no-input"

if ! $PY - <<'CHECK' 2>/dev/null; then
import importlib.metadata as md
want = {"torch": "2.14.1", "torchvision": "0.29.1", "learn2learn": "0.2.0"}
for name, version in want.items():
    assert md.version(name).split("+")[0] == version, name
for name in ["lightning", "torchmetrics", "tensorboard", "jsonargparse", "matplotlib", "pytest", "gym", "scipy"]:
    md.version(name)
import learn2learn  # noqa: F401  (the compiled extension loads)
CHECK
    echo "setup: installing torch, torchvision, learn2learn and the rest"
    $PIP "torch==2.14.1" "torchvision==0.29.1" cython setuptools wheel
    $PIP gym requests tqdm scipy
    $PIP --no-build-isolation --config-settings=--build-option=build_ext "learn2learn==0.2.0"
    $PIP "lightning>=2.4,<3" "torchmetrics>=1.4" "tensorboard>=2.15" "jsonargparse[signatures]>=4.32" "matplotlib>=3.8" "pytest>=8"
fi

# this checkout, editable (re-done when the installed ttt_meta points at another folder; checked from / so that
# the checkout itself is not on the path)
HERE=$(pwd -P)
if ! (cd / && $PY -c "import ttt_meta, pathlib, sys; sys.exit(str(pathlib.Path(ttt_meta.__file__).resolve().parents[1]) != sys.argv[1])" "$HERE") 2>/dev/null; then
    echo "setup: installing ttt_meta from $(pwd)"
    $PIP --no-build-isolation --no-deps -e .
fi
