"""Presets and --set overrides (utils/presets.py): the commands each cell gets, checked without running a stage."""
import pytest


def _train_config(cell):
    from utils.train_args import build_parser, config_from_namespace

    script, argv = cell.commands[0]
    kind = "fft" if script == "tune_fft_baseline.py" else "peft"
    return config_from_namespace(build_parser(kind).parse_args(argv), kind)


def test_paper_preset_trains_and_decodes_with_the_papers_settings(tmp_path):
    """spec §10.5: m=10, r=1, CodeSage-small, 10 epochs (FFT 4 on CRUXEval), effective batch 8, seed 9876, lr 1e-3
    (PT/IDPG/LOPA), 1e-4 (LoRA r=16 α=32 p=0.1), 1e-5 (FFT, wd 0.05, 10 % warmup), no warmup otherwise."""
    from utils.experiment_plan import plan_cells
    from utils.presets import PRESETS
    from utils.generation import resolve_gen_config
    from utils.tasks import get_task

    cells = plan_cells(PRESETS["paper-phi-2"](), tmp_path)
    assert len(cells) == 18
    lrs = {"fft": 1e-5, "lora": 1e-4, "pt": 1e-3, "idpg": 1e-3, "lopa": 1e-3}
    for cell in cells:
        gen_argv = dict(cell.commands)["generate_preds.py"]
        assert "--paper_decoding" in gen_argv and "--temperature" not in gen_argv and "--top_p" not in gen_argv
        if cell.method == "none":
            continue
        config = _train_config(cell)
        model, train = config.model, config.train
        assert model.model_type == "phi-2" and model.seed == 9876
        assert train.lr == lrs[cell.method]
        assert train.per_gpu_train_batch_size * train.gradient_accumulation_steps == 8
        assert train.num_epochs == (4 if cell.method == "fft" and cell.task != "mbpp" else 10)
        assert train.num_warmup_steps == 0 and train.warmup_ratio == (0.1 if cell.method == "fft" else 0.0)
        assert train.weight_decay == (0.05 if cell.method == "fft" else 0.0)
        if cell.method in ("pt", "idpg", "lopa"):
            assert model.num_virtual_tokens == 10
        if cell.method in ("idpg", "lopa"):
            assert model.enc_model_type == "codesage-small"
        if cell.method == "lopa":
            assert model.lp_rank == 1
        if cell.method == "lora":
            assert (model.lora_dim, model.lora_alpha, model.lora_dropout) == (16, 32, 0.1)
    mbpp = resolve_gen_config(get_task("mbpp"), paper_decoding=True)
    crux = resolve_gen_config(get_task("cruxeval_output_prediction"), paper_decoding=True)
    assert (mbpp.do_sample, mbpp.temperature, mbpp.top_p, mbpp.max_new_tokens, mbpp.num_return_sequences) == \
        (True, 0.6, 0.95, 256, 1)
    assert (crux.do_sample, crux.temperature, crux.top_p, crux.max_total_tokens) == (True, 0.2, 0.95, 512)


def test_set_enc_model_type_reaches_the_encoder_methods(tmp_path):
    from utils.experiment_plan import plan_cells
    from utils.presets import PRESETS, apply_overrides

    preset = apply_overrides(PRESETS["paper-phi-2"](), ["enc_model_type=codebert-base"])
    encoders = {c.method: _train_config(c).model.enc_model_type for c in plan_cells(preset, tmp_path)
                if c.task == "mbpp" and c.method not in ("none", "fft")}
    assert encoders == {"lora": None, "pt": None, "idpg": "codebert-base", "lopa": "codebert-base"}


def test_paper_preset_checkpoints_can_be_turned_off_per_method(tmp_path):
    from utils.experiment_plan import check_commands, plan_cells
    from utils.presets import apply_overrides, paper_preset

    preset = apply_overrides(paper_preset("phi-2"), ["fft.save_every=0"])
    cells = plan_cells(preset, tmp_path)
    check_commands(cells)  # save_total_limit without checkpoints is accepted
    fft = _train_config(next(c for c in cells if c.method == "fft"))
    lopa = _train_config(next(c for c in cells if c.method == "lopa"))
    assert (fft.output.save_every.every, lopa.output.save_every.every) == (0, 1)


def test_paper_preset_removes_checkpoints_once_final_exists_without_changing_its_cells_hashes(tmp_path):
    """Its per-epoch checkpoints protect a cell against a crash; kept beside final/, phi-2 FFT's is ~33 GB. What
    happens to them does not change a result, so --keep_checkpoints stays out of the hashes of stored cells (which
    were made before the preset set it), whichever value it has."""
    import dataclasses

    from utils.experiment_plan import plan_cells
    from utils.presets import apply_overrides, paper_preset

    preset = paper_preset("phi-2")
    before = dataclasses.replace(preset, train={k: v for k, v in preset.train.items() if k != "keep_checkpoints"})
    kept = apply_overrides(preset, ["keep_checkpoints=true"])
    hashes = [[(c.config_hash(), c.training_hash()) for c in plan_cells(p, tmp_path)] for p in (preset, before, kept)]
    assert hashes[0] == hashes[1] == hashes[2]
    cells = plan_cells(preset, tmp_path)
    for method in ("fft", "lopa"):
        assert _train_config(next(c for c in cells if c.method == method)).output.keep_checkpoints is False
    assert _train_config(next(c for c in plan_cells(kept, tmp_path) if c.method == "fft")).output.keep_checkpoints
    def fft_hash(p):
        return next(c.training_hash() for c in plan_cells(p, tmp_path) if c.method == "fft")

    assert fft_hash(apply_overrides(preset, ["fft.save_every=2"])) != fft_hash(preset)  # other flags still count


def test_set_model_path_reaches_every_stage_the_untuned_cells_too(tmp_path):
    """--set model_path=DIR used to reach the training commands only: the none cells' generation (and every cell's)
    loaded the hub's model, so the table compared tunings of a local model with the hub's baseline."""
    from utils.experiment_plan import plan_cells
    from utils.presets import apply_overrides, paper_preset

    local = str(tmp_path / "phi-2-earlier")
    for overrides, where in ((["model_path=" + local], {"train", "gen"}), (["train.model_path=" + local], {"train"}),
                             (["gen.model_path=" + local], {"gen"})):
        for cell in plan_cells(apply_overrides(paper_preset("phi-2"), overrides), tmp_path):
            stages = {"gen" if script == "generate_preds.py" else "train" for script, argv in cell.commands
                      if script != "evaluate_preds.py" and local in argv}
            expected = where & ({"gen"} if cell.method == "none" else {"train", "gen"})
            assert stages == expected, (overrides, cell.key, stages)


def test_set_model_path_is_refused_when_several_models_are_selected(tmp_path, capsys):
    """One directory cannot be the weights of several models: --preset paper --set model_path=DIR (a local copy of
    one of them, say the gated Llama-3) planned every model's cells on DIR, and the DeepSeek-7B cells (the same
    architecture and width, so not even a warning at load) would have tuned Llama-3 under the paper's DeepSeek-7B
    numbers. Narrowed to one model it runs, as a single preset with one model does."""
    import run_experiment

    local = tmp_path / "llama-3-copy"
    local.mkdir()
    (local / "config.json").write_text('{"model_type": "llama", "hidden_size": 4096}')
    out = str(tmp_path / "out")
    for argv in (["--preset", "paper", "--models", "deepseek-coder-1.3b-base,Meta-Llama-3-8B"], ["--preset", "paper"],
                 ["--preset", "paper-phi-2", "--models", "phi-2,tiny-phi-2"]):
        for item in (f"model_path={local}", f"gen.model_path={local}"):
            with pytest.raises(SystemExit) as exc:
                run_experiment.main(argv + ["--out", out, "--set", item, "--plan", "--tasks", "mbpp"])
            assert exc.value.code == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: --set {item!r}: every selected model (") and "--models" in err, err
    plan = run_experiment.main(["--preset", "paper", "--models", "Meta-Llama-3-8B", "--out", out, "--set",
                                f"model_path={local}", "--set", "enc_model_type=tiny-roberta", "--plan"])
    assert len(plan["planned"]) == 15 and all(k.startswith("Meta-Llama-3-8B/") for k in plan["planned"])


def test_set_mbpp_split_reaches_both_stages_of_the_mbpp_cells_only(tmp_path):
    """--set mbpp_split=standard used to reach the training only: the cells trained on the standard split's train
    tasks and were scored on the paper split's test tasks, 374 of which they had been tuned on. A CRUXEval cell's
    commands carry no --mbpp_split (its scripts refuse one other than the default), so its hash stays as it was
    without the --set: its stored training is kept (it used to be redone for the same result)."""
    from utils.errors import UserError
    from utils.experiment_plan import plan_cells
    from utils.presets import PRESETS, apply_overrides

    for cell in plan_cells(apply_overrides(PRESETS["smoke"](), ["mbpp_split=standard"]), tmp_path):
        stages = {script for script, argv in cell.commands if "--mbpp_split" in argv
                  and argv[argv.index("--mbpp_split") + 1] == "standard"}
        trainer = {"tune_fft_baseline.py" if cell.method == "fft" else "tune_foundation_model.py"}
        trainer = trainer if cell.method != "none" else set()
        assert stages == (trainer | {"generate_preds.py"} if cell.task == "mbpp" else set()), cell.key
    for item in ("train.mbpp_split=standard", "gen.mbpp_split=standard", "lopa.mbpp_split=standard", "mbpp_s=standard",
                 "mbpp_split=bogus"):
        with pytest.raises(UserError, match="the MBPP split is the experiment's"):
            apply_overrides(PRESETS["smoke"](), [item])


def test_set_false_turns_off_a_training_switch_that_defaults_on(tmp_path):
    """--set train.packing=false (or selective_logits / fused_adamw, also on by default) must reach the trainer:
    left out, the flag keeps its default True, and the cell's hash does not change either."""
    from utils.experiment_plan import plan_cells
    from utils.presets import PRESETS, apply_overrides

    def lopa(overrides):
        return next(c for c in plan_cells(apply_overrides(PRESETS["smoke"](), overrides), tmp_path)
                    if c.method == "lopa" and c.task == "mbpp")

    default, off = lopa([]), lopa(["train.packing=false", "lopa.fused_adamw=false"])
    assert (_train_config(default).train.packing, _train_config(default).train.fused_adamw) == (True, True)
    assert (_train_config(off).train.packing, _train_config(off).train.fused_adamw) == (False, False)
    assert off.training_hash() != default.training_hash()
    assert "False" not in dict(off.commands)["generate_preds.py"]  # gen/eval store_true flags: False stays absent


def test_set_gen_do_sample_false_makes_the_paper_presets_generation_greedy(tmp_path):
    """generate_preds' --do_sample takes a value and its absence means "not given" (--paper_decoding then samples):
    --set gen.do_sample=false must reach it as --do_sample False, and --set gen.paper_decoding=false stays absent."""
    import generate_preds
    from utils.experiment_plan import plan_cells
    from utils.generation import resolve_gen_config
    from utils.presets import PRESETS, apply_overrides
    from utils.tasks import get_task

    def decoding(overrides):
        cell = next(c for c in plan_cells(apply_overrides(PRESETS["paper-phi-2"](), overrides), tmp_path)
                    if c.method == "none" and c.task == "mbpp")
        argv = dict(cell.commands)["generate_preds.py"]
        args = generate_preds.build_parser().parse_args(argv)
        return resolve_gen_config(get_task("mbpp"), paper_decoding=args.paper_decoding, do_sample=args.do_sample), argv

    assert decoding([])[0].do_sample is True and decoding([])[0].temperature == 0.6
    greedy, argv = decoding(["gen.do_sample=false"])
    assert greedy.do_sample is False and argv[argv.index("--do_sample") + 1] == "False"
    greedy, argv = decoding(["gen.paper_decoding=false"])
    assert greedy.do_sample is False and "--paper_decoding" not in argv and "False" not in argv


def test_set_gen_encoder_flags_reach_only_the_methods_that_read_them(tmp_path):
    """--set gen.enc_model_path=DIR (a local encoder for lopa/idpg generation) goes to every cell's gen section;
    generate_preds.py rejects a flag the method does not read, so the other cells must not get it."""
    import pathlib

    import generate_preds
    from utils import tuned_models
    from utils.experiment_plan import plan_cells
    from utils.presets import PRESETS, apply_overrides

    encoder = str(tmp_path / "encoder")
    preset = apply_overrides(PRESETS["smoke"](), [f"gen.enc_model_path={encoder}", "gen.lp_rank=1"])
    seen = {}
    for cell in plan_cells(preset, tmp_path):
        argv = dict(cell.commands)["generate_preds.py"]
        for flag in ("--load_adapter_from", "--load_base_from_path"):  # what training would have written
            if flag in argv:
                pathlib.Path(argv[argv.index(flag) + 1]).mkdir(parents=True, exist_ok=True)
        args = generate_preds.build_parser().parse_args(argv)
        tuned_models.resolve_method(args)  # a UserError for a flag this method does not read
        seen[cell.method] = (args.enc_model_path, args.lp_rank)
    assert seen == {"none": (None, None), "fft": (None, None), "lora": (None, None), "pt": (None, None),
                    "idpg": (encoder, None), "lopa": (encoder, 1)}


def test_every_model_of_the_papers_table_has_a_preset_with_its_settings():
    from utils.experiment_plan import plan_cells
    from utils.presets import PAPER_MODELS, PRESETS

    for model in PAPER_MODELS:
        preset = PRESETS[f"paper-{model}"]()
        assert preset.models == [model] and preset.encoder == "codesage-small"
        assert ("fft" in preset.methods) == (model == "phi-2")  # the paper has FFT numbers for phi-2 only
        ranks = {}
        for cell in plan_cells(preset, __import__("pathlib").Path("/nonexistent")):
            if cell.method == "lopa":
                argv = dict(cell.commands)["tune_foundation_model.py"]
                ranks[cell.task] = argv[argv.index("--lp_rank") + 1]
        big = model in ("deepseek-coder-7b-base", "Meta-Llama-3-8B")
        assert ranks == {"cruxeval_input_prediction": "1", "cruxeval_output_prediction": "1",
                         "mbpp": "4" if big else "1"}


def test_set_wins_over_the_presets_per_task_values(tmp_path):
    """--set has no per-task section: the README's dry run (--set fft.num_epochs=2) must reach CRUXEval's FFT cells,
    and lopa.lp_rank the r = 4 MBPP cell of Llama-3, as lp_rank alone does every LOPA cell."""
    from utils.errors import UserError
    from utils.experiment_plan import plan_cells
    from utils.presets import PRESETS, apply_overrides

    def values(name, overrides, method, flag):
        cells = plan_cells(apply_overrides(PRESETS[name](), overrides), tmp_path)
        argvs = {c.task: c.commands[0][1] for c in cells if c.method == method}
        return {task: argv[argv.index(flag) + 1] for task, argv in argvs.items()}

    crux = ("cruxeval_input_prediction", "cruxeval_output_prediction")
    assert values("paper-phi-2", [], "fft", "--num_epochs") == {"mbpp": "10", **dict.fromkeys(crux, "4")}
    for overrides in (["fft.num_epochs=1"], ["num_epochs=1"]):
        assert set(values("paper-phi-2", overrides, "fft", "--num_epochs").values()) == {"1"}
    for overrides in (["lopa.lp_rank=2"], ["lp_rank=2"]):
        assert set(values("paper-Meta-Llama-3-8B", overrides, "lopa", "--lp_rank").values()) == {"2"}
    with pytest.raises(UserError, match="pt does not read --lp_rank"):  # not another method's value either
        values("paper-Meta-Llama-3-8B", ["pt.lp_rank=2"], "lopa", "--lp_rank")


def test_set_refuses_the_flags_each_cell_gets_and_sets_the_experiments_seed(tmp_path):
    """--set train.task_name=... came after the cell's own --task_name and won: the MBPP cells trained on
    CRUXEval. The flags the runner sets per cell are refused, naming the option to use; seed=N is the experiment's
    seed, for training and generation alike."""
    import pytest

    from utils.errors import UserError
    from utils.experiment_plan import plan_cells
    from utils.presets import PRESETS, apply_overrides

    for item, hint in (("train.task_name=cruxeval_output_prediction", "--tasks"), ("model_type=tiny-llama", "--models"),
                       ("gen.data_path=x.jsonl", "--mbpp_data"), ("lopa.peft_method=pt", "--methods"),
                       ("gen.load_adapter_from=elsewhere", ""), ("gen.path_to_data=x.jsonl", "--mbpp_data"),
                       ("train.task=mbpp", "--tasks")):  # an alias, and an abbreviation argparse would take
        flag = item.split("=")[0].split(".")[-1]
        with pytest.raises(UserError, match=f"sets --{flag}[a-z_]* for each cell itself.*{hint}"):
            apply_overrides(PRESETS["smoke"](), [item])
    for item in ("train.seed=3", "gen.seed=3", "seed=three", "see=3", "seed=²"):
        with pytest.raises(UserError, match="the seed is the experiment's"):
            apply_overrides(PRESETS["smoke"](), [item])
    preset = apply_overrides(PRESETS["smoke"](), ["seed=3"])
    assert preset.seed == 3 and PRESETS["smoke"]().seed == 9876
    for cell in plan_cells(preset, tmp_path):
        for script, argv in cell.commands:
            if script in ("tune_foundation_model.py", "tune_fft_baseline.py", "generate_preds.py"):
                assert argv.count("--seed") == 1 and argv[argv.index("--seed") + 1] == "3", (cell.key, script)
                assert argv.count("--task_name") == 1, (cell.key, script)


def test_an_out_that_is_a_file_is_named_not_blamed_on_the_preset(tmp_path, capsys):
    import run_experiment

    (tmp_path / "notes.md").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        run_experiment.main(["--preset", "smoke", "--out", str(tmp_path / "notes.md"), "--plan"])
    assert exit_info.value.code == 2
    notes = tmp_path / "notes.md"
    assert capsys.readouterr().err == f"error: --out {notes}: a file, not a directory; pass a directory\n"


def test_offline_runs_are_told_up_front_which_hub_models_are_not_cached(tmp_path, monkeypatch):
    """Offline without a cached copy, every cell of the model failed in turn, each with the same error."""
    import huggingface_hub

    from utils.experiment_plan import plan_cells, uncached_hub_models
    from utils.presets import apply_overrides, paper_preset

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cached = {}
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: cached.get(repo))
    cells = plan_cells(paper_preset("phi-2"), tmp_path)
    assert uncached_hub_models(cells) == [
        "phi-2 (microsoft/phi-2) is not in the local cache and HF_HUB_OFFLINE is set: its cells will fail; --set "
        "model_path=DIR gives a local copy",
        "codesage-small (codesage/codesage-small) is not in the local cache and HF_HUB_OFFLINE is set: its cells "
        "will fail; --set enc_model_path=DIR gives a local copy"]
    cached["codesage/codesage-small"] = "/cache/config.json"
    local = plan_cells(apply_overrides(paper_preset("phi-2"), [f"model_path={tmp_path}"]), tmp_path)
    assert uncached_hub_models(local) == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert uncached_hub_models(cells) == []  # online: they download


def test_a_set_of_a_flag_the_method_does_not_read_is_refused_at_once(tmp_path):
    """--set lora.lp_rank=2 passed the plan's checks and failed in the lora cells, one after another."""
    from utils.errors import UserError
    from utils.presets import apply_overrides, paper_preset

    with pytest.raises(UserError, match=r"--set 'lora.lp_rank=2': lora does not read --lp_rank \(only lopa do\)"):
        apply_overrides(paper_preset("phi-2"), ["lora.lp_rank=2"])
    assert apply_overrides(paper_preset("phi-2"), ["lopa.lp_rank=2"]).per_method["lopa"]["lp_rank"] == "2"
    # an abbreviation is caught by the plan's checks, for lopa too (argparse used to read --lp_r as --lp_rank)
    from utils.experiment_plan import check_commands, plan_cells

    for method in ("lora", "lopa"):
        with pytest.raises(UserError, match=rf"phi-2/\w+/{method}: tune_foundation_model.py rejects its arguments "
                                            r"\(unrecognized arguments: --lp_r 2; flags are not abbreviated: "
                                            r"spell out --lp_rank\)"):
            check_commands(plan_cells(apply_overrides(paper_preset("phi-2"), [f"{method}.lp_r=2"]), tmp_path))
