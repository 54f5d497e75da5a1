"""Shared test setup: offline hub, the real data under ../shared/data when present, tiny models."""
from __future__ import annotations

import os
import pathlib
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite compares runs on the CPU, in fp32, to 1e-6 or bitwise: on a GPU machine (a researcher's node, the Docker
# image run with --gpus all) a run would otherwise pick the GPU and bf16 where its reference, forced to the CPU, does
# not. Hidden from this process and every process it launches.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

from utils import fixtures  # noqa: E402
from utils.data import default_data_path  # noqa: E402


@pytest.fixture(scope="session")
def data_paths(tmp_path_factory) -> dict:
    """task family -> JSONL path: ../shared/data when it exists, else small fixture files the project writes."""
    mbpp, crux = default_data_path("mbpp"), default_data_path("cruxeval_input_prediction")
    if mbpp and crux:
        return {"mbpp": mbpp, "cruxeval": crux, "real": True}
    out = tmp_path_factory.mktemp("fixture_data")
    return {**fixtures.write_fixture_data(out), "real": False}


def require_real_data(data_paths):
    if not data_paths["real"]:
        pytest.skip("../shared/data is absent: this test needs the real MBPP and CRUXEval files")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run as fast on one thread, and do not crawl when other processes load the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
