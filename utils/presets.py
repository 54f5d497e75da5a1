"""What run_experiment.py runs: presets (a grid of models × tasks × methods and each stage's arguments) and
``--set`` overrides. The smoke preset runs anywhere in a minute; ``paper-<model>`` has the paper's settings for each
foundation model of its code-task table (spec §10.5).
"""
from __future__ import annotations

import copy
import dataclasses
import functools

from utils.errors import UserError
from utils.registry import METHOD_FLAGS, METHODS, TASKS


@dataclasses.dataclass
class Preset:
    """A grid and the arguments of each stage. ``train``/``gen``/``eval`` map flag names to values (``True`` is
    a bare flag); ``per_method`` and ``per_task`` override ``train`` for one method or task."""

    name: str
    models: list[str]
    methods: list[str]
    tasks: list[str]
    encoder: str
    seed: int = 9876
    train: dict = dataclasses.field(default_factory=dict)
    per_method: dict = dataclasses.field(default_factory=dict)
    per_task: dict = dataclasses.field(default_factory=dict)
    gen: dict = dataclasses.field(default_factory=dict)
    eval: dict = dataclasses.field(default_factory=dict)
    data: dict = dataclasses.field(default_factory=dict)
    """task family (mbpp / cruxeval) -> JSONL path; missing means the public source."""


def smoke_preset() -> Preset:
    """Tiny models, a few real records (or the project's fixtures), CPU: all 18 cells in about a minute."""
    return Preset(
        name="smoke", models=["tiny-phi-2"], methods=list(METHODS), tasks=list(TASKS), encoder="tiny-roberta",
        train={"num_virtual_tokens": 4, "lp_rank": 1, "num_epochs": 1, "max_train_steps": 3,
               "per_gpu_train_batch_size": 2, "limit_train_examples": 6, "max_length": 384,
               "mixed_precision": "no"},
        per_method={"fft": {"lr": 1e-4}},
        gen={"limit": 4, "batch_size": 4, "max_new_tokens": 24, "no_progress": True},
        eval={"n_workers": 2, "timeout": 5, "k": "1", "no_progress": True},
    )


PAPER_MODELS = ("codegen-350M", "deepseek-coder-1.3b-base", "phi-2", "phi-3", "deepseek-coder-7b-base",
                "Meta-Llama-3-8B")
"""The foundation models of the paper's code-task table, in its column order; each has a ``paper-<model>`` preset."""
LOPA_RANK_4_ON_MBPP = ("deepseek-coder-7b-base", "Meta-Llama-3-8B")
"""The original's MBPP run script trains LOPA with r = 4 for these (DS-7B per a comment); r = 1 elsewhere (spec §10.5)."""


def paper_preset(model: str) -> Preset:
    """The paper's settings (spec §10.5) for one foundation model, for one GPU: effective batch 8 through gradient
    accumulation (the paper ran 4 GPUs × 2); m = 10, CodeSage-small, 10 epochs, lr 1e-3 (PT/IDPG/LOPA), 1e-4
    (LoRA), 1e-5 (FFT; 4 epochs on CRUXEval); LOPA r = 1, r = 4 on MBPP for DeepSeek-7B and Llama-3-8B; the
    paper's sampling at generation. One departure: bf16 mixed precision (fp32 master weights), where the paper
    trained PEFT methods in fp32 and FFT in fp16 (``--set mixed_precision=no``: fp32). The paper has FFT numbers
    for phi-2 only, so the other presets leave FFT out
    (``--methods ...,fft`` adds it; a 7B/8B model's full fine-tuning does not fit one GPU without DeepSpeed)."""
    per_task = {"cruxeval_input_prediction": {"fft": {"num_epochs": 4}},
                "cruxeval_output_prediction": {"fft": {"num_epochs": 4}}}
    if model in LOPA_RANK_4_ON_MBPP:
        per_task["mbpp"] = {"lopa": {"lp_rank": 4}}
    return Preset(
        name=f"paper-{model}", models=[model], tasks=list(TASKS), encoder="codesage-small",
        methods=[m for m in METHODS if model == "phi-2" or m != "fft"],
        train={"num_virtual_tokens": 10, "lp_rank": 1, "num_epochs": 10, "per_gpu_train_batch_size": 2,
               "gradient_accumulation_steps": 4, "mixed_precision": "bf16",
               "save_every": 1, "save_total_limit": 1,  # an interrupted cell resumes from its last epoch
               "keep_checkpoints": False},  # final/ replaces them (phi-2 FFT's is ~33 GB)
        per_task=per_task,
        gen={"paper_decoding": True, "batch_size": 16},  # progress bar on: generation takes minutes
        eval={"k": "1", "no_progress": True},
    )


PRESETS = {"smoke": smoke_preset, **{f"paper-{m}": functools.partial(paper_preset, m) for m in PAPER_MODELS}}
PRESET_GROUPS = {"paper": [f"paper-{m}" for m in PAPER_MODELS]}
"""Names that run several presets into one experiment directory and one results.md: ``paper`` is the paper's
whole code-task table. Their cells are the member presets' own, so a group and its members share stored results."""


CELL_FLAGS = {"task_name": "--tasks", "model_type": "--models", "peft_method": "--methods",
              "data_path": "--mbpp_data / --cruxeval_data", "path_to_data": "--mbpp_data / --cruxeval_data",
              "log_dir": "--out", "load_adapter_from": None, "load_base_from_path": None, "resume_from": None,
              "path": None}
"""Stage flags the runner sets for each cell (what --set should use instead, where there is something), aliases
included. A --set of one would come after the cell's own value and win, so that, for example, the MBPP cell
trained on CRUXEval. Their abbreviations are refused here too, naming the flag (the stages' parsers refuse any)."""


def apply_overrides(preset: Preset, overrides: list[str]) -> Preset:
    """``section.flag=value`` (section: train, gen, eval, or a method name for its training) or ``flag=value``
    (training, every method). A training override also replaces the preset's per-task values of that flag.
    ``seed=N`` sets the experiment's seed (training and generation), ``model_path=DIR`` the base model of both
    (``train.model_path`` / ``gen.model_path``: one stage's), and ``mbpp_split=NAME`` the MBPP split of both (never
    one stage's); ``CELL_FLAGS`` are refused."""
    preset = copy.deepcopy(preset)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. lopa.lp_rank=2 or train.lr=1e-3")
        section, _, flag = key.rpartition(".")
        cell_flag = next((name for name in CELL_FLAGS if flag and name.startswith(flag)), None)
        if cell_flag:
            instead = CELL_FLAGS[cell_flag]
            raise UserError(f"--set {item!r}: run_experiment sets --{cell_flag} for each cell itself"
                            + (f"; choose with run_experiment's {instead}" if instead else ""))
        if flag and "seed".startswith(flag):
            if section or flag != "seed" or not value.isdecimal():
                raise UserError(f"--set {item!r}: the seed is the experiment's, for training and generation "
                                f"alike: --set seed=N, N a whole number")
            preset.seed = int(value)
            continue
        if flag.startswith("mbpp") and "mbpp_split".startswith(flag):
            from utils.data import MBPP_SPLITS

            if section or flag != "mbpp_split" or value not in MBPP_SPLITS:
                raise UserError(f"--set {item!r}: the MBPP split is the experiment's, for training and generation "
                                f"alike (each split's train tasks overlap the other's test tasks): --set "
                                f"mbpp_split=NAME, NAME one of: {', '.join(MBPP_SPLITS)}")
        parsed: object = {"true": True, "false": False}.get(value.lower(), value)
        if section in ("", "train"):
            preset.train[flag] = parsed
            _drop_per_task(preset, flag, METHODS)
            if section == "" and flag in ("model_path", "mbpp_split"):  # every stage's: the untuned cells' too
                preset.gen[flag] = parsed
        elif section in ("gen", "eval"):
            getattr(preset, section)[flag] = parsed
        elif section in METHODS:
            if section not in METHOD_FLAGS.get(flag, (section,)):
                readers = "/".join(METHOD_FLAGS[flag])
                raise UserError(f"--set {item!r}: {section} does not read --{flag} (only {readers} do)")
            preset.per_method.setdefault(section, {})[flag] = parsed
            _drop_per_task(preset, flag, (section,))
        else:
            raise UserError(f"--set {item!r}: unknown section {section!r}; use train, gen, eval or a method "
                            f"({', '.join(METHODS)})")
    return preset


def _drop_per_task(preset: Preset, flag: str, methods) -> None:
    """--set has no per-task section, so it must win over the preset's per-task values (else CRUXEval's FFT epochs
    and LOPA's MBPP rank could not be changed at all)."""
    for by_method in preset.per_task.values():
        for method in methods:
            by_method.get(method, {}).pop(flag, None)
