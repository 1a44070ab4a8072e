#!/usr/bin/env bash
# Set up a fresh machine (stock Debian 12 / Ubuntu 24.04 with apt and pip reachable): system
# packages (python3-venv and python3-dev for the virtual environment and FFCV's C extension, a C++
# compiler, pkg-config, OpenCV and libjpeg-turbo for FFCV's build; Debian's dataset-fashion-mnist
# holds the default dataset), then a virtual environment in .venv with the project, its dev and
# ffcv extras, torchattacks and the official AutoAttack, every version pinned by constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
if command -v apt-get >/dev/null; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
    python3-venv python3-dev build-essential pkg-config libopencv-dev libturbojpeg0-dev \
    dataset-fashion-mnist >/dev/null
fi
python3 -m venv .venv
source .venv/bin/activate
pip install -q --upgrade pip
# torch 2.14.1 / torchvision 0.29.1 are the newest releases this workplace serves from local disk.
pip install -q -c constraints.txt torch torchvision
pip install -q -c constraints.txt -e '.[dev,ffcv]' 'ray[default,train,tune]'
# torchattacks pins requests~=2.25, which would downgrade what Ray needs: install it without deps.
pip install -q -c constraints.txt --no-deps torchattacks pyautoattack
echo "setup done: source .venv/bin/activate"
