#!/usr/bin/env bash
# Wheels a GPU machine without a package registry lacks, for its CPython 3.12 on x86-64: pydantic (the
# engine's inputs) and bitsandbytes (QLoRA, int8/nf4 weights, 8-bit Adam).  torch, transformers, peft, numpy,
# networkx and PyYAML are expected there already.
#   bash validate/device/wheels.sh [DEST]        (default .whl, which .gitignore keeps out of git)
set -euo pipefail
dest=${1:-.whl}
mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest" \
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
  typing-extensions==4.15.0 bitsandbytes==0.50.2
ls -la "$dest"
