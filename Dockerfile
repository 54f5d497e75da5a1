# CUDA PyTorch image for training, generation and evaluation on GPUs.
#   docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) -t lopa-peft .
#   docker run --rm lopa-peft                                # runs the test suite on the CPU (the default command)
#   docker run --gpus all --rm -e HF_TOKEN -v $PWD/logging:/workspace/lopa-peft/logging lopa-peft \
#       python tune_foundation_model.py --peft_method lopa --task_name mbpp --model_type phi-2
# The base image carries torch 2.13.0 built for CUDA; requirements.txt pins the same version, so pip keeps it.
# Override with --build-arg BASE_IMAGE=... for another CUDA release of the same torch version.
# -devel, not -runtime: with a GPU visible, DeepSpeed JIT-builds its CPU Adam (the optimizer of ZeRO-3 CPU offload,
# config_files/zero_stage3_config.json) against the CUDA toolkit (CUDA_HOME, curand), which -runtime images lack.
# Without CPU offload, BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime is smaller and enough.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-devel
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TOKENIZERS_PARALLELISM=false \
    DS_BUILD_OPS=0

# util-linux gives `unshare` (the evaluator's namespaces); build tools let DeepSpeed JIT-build its ops.
RUN apt-get update && apt-get install -y --no-install-recommends util-linux build-essential git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace/lopa-peft
COPY requirements.txt .
RUN python -m pip install -r requirements.txt
COPY . .
# After the pip layer, so a new commit does not reinstall the stack. .git is not copied (.dockerignore);
# results.md records this commit for each cell instead.
ARG GIT_COMMIT=unknown
ENV LOPA_GIT_COMMIT=${GIT_COMMIT}

# The default command runs the tests, offline with tiny models (../shared/data is not in the image, so the data
# tests use the project's fixtures). Other commands keep hub access: pass -e HF_TOKEN for gated models.
CMD ["env", "HF_HUB_OFFLINE=1", "HF_DATASETS_OFFLINE=1", "WANDB_MODE=offline", "python", "-m", "pytest", "-q", "tests"]
