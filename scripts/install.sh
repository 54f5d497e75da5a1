#!/usr/bin/env bash
# One-command install: a virtual environment with the pinned stack, plus the OS tools the sandbox uses.
set -euo pipefail
VENV="${1:-.venv}"
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && ! command -v unshare >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq util-linux >/dev/null
fi
# A venv left by another Python minor version (its compiled packages would not import) is made anew; only a
# directory with pyvenv.cfg counts as a venv, so nothing else is ever deleted.
minor='import sys; print("%d.%d" % sys.version_info[:2])'
want=$(python3 -c "$minor")
if [ -f "$VENV/pyvenv.cfg" ] && [ "$("$VENV/bin/python" -c "$minor" 2>/dev/null)" != "$want" ]; then
  echo "install: $VENV was made by another Python; recreating it with Python $want"
  rm -rf "$VENV"
fi
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# deepspeed is an sdist: build it without compiled ops (they JIT-build on first use).
DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install -q -r requirements.txt
"$VENV/bin/python" -c "import torch, transformers, peft, accelerate; print('installed: torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
# DeepSpeed's CPU ops (Adam for ZeRO offload, shared-memory collectives) JIT-build on their first use, about two
# minutes on 2 cores: on a machine without CUDA (CPU runs, and the test suite's ZeRO runs), build them now into
# the venv's extension cache with the venv's ninja, where every run looks (utils/train_setup.py's
# venv_extension_cache), so that no run waits for them. Best effort: they still build on first use otherwise.
LOPA_ROOT="$(cd "$(dirname "$0")/.." && pwd)" "$VENV/bin/python" - <<'PY' > "${TMPDIR:-/tmp}/lopa-ds-ops.log" 2>&1 \
  || echo "install: DeepSpeed's CPU ops not built now (see ${TMPDIR:-/tmp}/lopa-ds-ops.log); they build on first use"
import os
import sys

import torch

sys.path.insert(0, os.environ["LOPA_ROOT"])
from utils.train_setup import venv_extension_cache

venv_extension_cache()
if not torch.cuda.is_available():
    from deepspeed.ops.op_builder import CPUAdamBuilder
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    for builder in (CPUAdamBuilder(), ShareMemCommBuilder()):
        builder.load(verbose=False)
PY
