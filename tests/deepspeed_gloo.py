"""Run a project script under `accelerate launch` with the process group on gloo, for DeepSpeed with several CPU
processes: on a machine without a GPU, accelerate 1.15 otherwise sets up no backend of its own and reports one
process while DeepSpeed runs two (its batch-size check fails). A test harness only; GPUs need none of this.

    accelerate launch --config_file X.yaml --num_processes 2 tests/deepspeed_gloo.py tune_fft_baseline.py ...
"""
import pathlib
import runpy
import sys

import accelerate
from accelerate.utils import InitProcessGroupKwargs

_Accelerator = accelerate.Accelerator


class GlooAccelerator(_Accelerator):
    def __init__(self, *args, kwargs_handlers=None, **kwargs):
        handlers = [*(kwargs_handlers or []), InitProcessGroupKwargs(backend="gloo")]
        super().__init__(*args, kwargs_handlers=handlers, **kwargs)


if __name__ == "__main__":
    accelerate.Accelerator = GlooAccelerator  # the scripts import it from accelerate when they build it
    script = sys.argv.pop(1)
    sys.path.insert(0, str(pathlib.Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")
