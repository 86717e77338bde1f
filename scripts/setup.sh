#!/usr/bin/env bash
# Install everything ttt_meta needs, idempotently (seconds when already done).
#
# Into $PYTHON's environment when PYTHON is set, else into the project's virtual environment .venv, created
# when missing from $BASE_PYTHON (default python3). Nothing is written into a system Python unless PYTHON
# names it. Supported: Python 3.10 to 3.12, with the pip that `python -m venv` gives (23.x) or a current one.
#   torch 2.14.1 + torchvision 0.29.1; learn2learn 0.2.0 built from its sdist with regenerated Cython sources
#   (its shipped C files do not compile on Python >= 3.11, learn2learn issue #413); then this package, editable.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "error: $1" >&2; exit 2; }

if [ -z "${PYTHON:-}" ] || [ "$PYTHON" = .venv/bin/python ]; then
    PYTHON=.venv/bin/python
    if [ ! -x "$PYTHON" ]; then
        BASE=${BASE_PYTHON:-python3}
        command -v "$BASE" >/dev/null || fail "no '$BASE' to create the virtual environment .venv from. Install Python 3.10 to 3.12, or set BASE_PYTHON=/path/to/python3."
        echo "setup: creating the virtual environment .venv with $("$BASE" --version 2>&1)"
        "$BASE" -m venv .venv || fail "'$BASE -m venv .venv' failed. On Debian or Ubuntu install the python3-venv package, or set BASE_PYTHON to a Python that has venv."
    fi
fi
case $PYTHON in */*) PYTHON=$(cd "$(dirname "$PYTHON")" 2>/dev/null && pwd)/$(basename "$PYTHON") ;; esac
command -v "$PYTHON" >/dev/null || fail "PYTHON=$PYTHON is not a Python interpreter. Leave PYTHON unset to use .venv, or point it at one."
"$PYTHON" -c 'import sys; sys.exit(not ((3, 10) <= sys.version_info[:2] <= (3, 12)))' \
    || fail "$("$PYTHON" --version 2>&1) is not supported (torch 2.14.1 with learn2learn 0.2.0 needs Python 3.10 to 3.12). Set BASE_PYTHON (for .venv) or PYTHON to a supported interpreter."
PIP="$PYTHON -m pip install --disable-pip-version-check --no-input"

if ! "$PYTHON" - <<'CHECK' 2>/dev/null; then
import importlib.metadata as md
want = {"torch": "2.14.1", "torchvision": "0.29.1", "learn2learn": "0.2.0"}
for name, version in want.items():
    assert md.version(name).split("+")[0] == version, name
for name in ["lightning", "torchmetrics", "tensorboard", "jsonargparse", "matplotlib", "pytest", "gym", "scipy"]:
    md.version(name)
import learn2learn  # noqa: F401  (the compiled extension loads)
CHECK
    echo "setup: installing torch, torchvision, learn2learn and the rest into $("$PYTHON" -c 'import sys; print(sys.prefix)')"
    $PIP "torch==2.14.1" "torchvision==0.29.1" cython setuptools wheel
    $PIP gym requests tqdm scipy
    # --use-pep517: pip < 24 hands --config-settings to setup.py only through PEP 517 (learn2learn has no
    # pyproject.toml). --no-cache-dir: always built from its source, never from a wheel cached by an earlier build.
    $PIP --use-pep517 --no-build-isolation --no-cache-dir --config-settings=--build-option=build_ext "learn2learn==0.2.0"
    $PIP "lightning>=2.4,<3" "torchmetrics>=1.4" "tensorboard>=2.15" "jsonargparse[signatures]>=4.32" "matplotlib>=3.8" "pytest>=8"
fi

# this checkout, editable (re-done when the installed ttt_meta points at another folder; checked from / so that
# the checkout itself is not on the path)
HERE=$(pwd -P)
if ! (cd / && "$PYTHON" -c "import ttt_meta, pathlib, sys; sys.exit(str(pathlib.Path(ttt_meta.__file__).resolve().parents[1]) != sys.argv[1])" "$HERE") 2>/dev/null; then
    echo "setup: installing ttt_meta from $HERE"
    $PIP --no-build-isolation --no-deps -e .
fi
