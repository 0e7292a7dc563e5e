#!/usr/bin/env bash
# The packages bigssl needs that the GPU machines' image lacks (omegaconf, webdataset, simplejpeg,
# deepspeed and theirs), as wheels for its Python 3.12 in .whl/, which git ignores. Run it on a
# machine that reaches PyPI; the device machine reaches nothing. README.md, "GPU", has the command
# that installs them there and runs tools/gpu_check.py. The image's torch (2.11 when last read)
# stays: a CUDA torch wheel is far over what a device call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p .whl "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  omegaconf==2.4.0 webdataset==1.0.2 braceexpand==0.1.7 simplejpeg==1.9.0 hjson==3.1.0 pydantic==2.14.4 \
  pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
# DeepSpeed publishes no wheel: build its pure-Python one (no compiled ops; bigssl uses none).
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
du -sh .whl
