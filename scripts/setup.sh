#!/usr/bin/env bash
# Idempotent setup: Debian's Fashion-MNIST, a Python 3.11 venv in .venv, fedhash with its pinned deps.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

apt_install() {
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq >/dev/null || true
        apt-get install -y -qq "$@" >/dev/null
    else
        echo "setup: need Debian packages $* (run as root, or: sudo apt-get install $*)" >&2
        exit 1
    fi
}

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    echo "setup: installing Debian package dataset-fashion-mnist"
    apt_install dataset-fashion-mnist
fi

PY=${PYTHON:-python3.11}
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "setup: installing python3.11"
    apt_install python3.11 python3.11-venv
fi
if ! "$PY" -c 'import sys, venv, ensurepip; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
    echo "setup: $PY is not a Python 3.11 with venv; set PYTHON=/path/to/python3.11" >&2
    exit 1
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $PY"
    "$PY" -m venv .venv
fi

stamp=.venv/.fedhash-installed
want=$(sha256sum pyproject.toml | cut -c1-64)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing fedhash and its pinned dependencies into .venv (first time: a few minutes)"
    .venv/bin/python -m pip install -q --upgrade pip
    # one pip command: torch and torchvision are pinned in the same install as timm
    .venv/bin/python -m pip install -q -e ".[test]"
    echo "$want" > "$stamp"
fi
