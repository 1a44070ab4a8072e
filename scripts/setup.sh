#!/usr/bin/env bash
# Set up a fresh machine: system packages (FFCV's build needs OpenCV and libjpeg-turbo; Debian's
# dataset-fashion-mnist holds the default dataset), then a virtual environment in .venv with the
# project, its dev and ffcv extras, torchattacks and the official AutoAttack.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
if command -v apt-get >/dev/null; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq pkg-config libopencv-dev libturbojpeg0-dev \
    dataset-fashion-mnist >/dev/null
fi
python3 -m venv .venv
source .venv/bin/activate
pip install -q --upgrade pip
# torch 2.14.1 / torchvision 0.29.1 are the newest releases this workplace serves from local disk.
pip install -q torch==2.14.1 torchvision==0.29.1
pip install -q -e '.[dev,ffcv]' 'ray[default,train,tune]==2.60.0'
# torchattacks pins requests~=2.25, which would downgrade what Ray needs: install it without deps.
pip install -q --no-deps torchattacks pyautoattack
echo "setup done: source .venv/bin/activate"
