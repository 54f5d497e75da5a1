"""What peft lacks: instance-dependent soft prompts (LOPA, IDPG) and one model object for all six methods."""
from custom_peft.adapters import load_tuned_model, read_adapter_config, save_adapter, trainable_state_dict
from custom_peft.build import MethodConfig, build_model, count_trainable
from custom_peft.counts import expected_trainable_count
from custom_peft.instance_prompts import (IdpgPrompt, LopaPrompt, idpg_trainable_count, lopa_trainable_count,
                                          pt_trainable_count)
from custom_peft.tuned_model import TunedModel

__all__ = ["MethodConfig", "build_model", "count_trainable", "expected_trainable_count", "load_tuned_model",
           "read_adapter_config", "save_adapter", "trainable_state_dict", "IdpgPrompt", "LopaPrompt",
           "idpg_trainable_count", "lopa_trainable_count", "pt_trainable_count", "TunedModel"]
