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
