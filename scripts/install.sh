#!/usr/bin/env bash
# One-command install: a virtual environment with the pinned stack, plus the OS tools the sandbox uses.
set -euo pipefail
VENV="${1:-.venv}"
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && ! command -v unshare >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq util-linux >/dev/null
fi
# A venv left by another Python (its packages would not import) is made anew; the same one is reused.
want=$(python3 -c 'import sys; print(sys.version.split()[0])')
if [ -x "$VENV/bin/python" ] && [ "$("$VENV/bin/python" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null)" != "$want" ]; then
  echo "install: $VENV was made by another Python; recreating it with Python $want"
  rm -rf "$VENV"
fi
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# deepspeed is an sdist: build it without compiled ops (they JIT-build on first use).
DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install -q -r requirements.txt
"$VENV/bin/python" -c "import torch, transformers, peft, accelerate; print('installed: torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
