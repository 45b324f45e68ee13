"""TitansConfig: the model's hyper-parameters (model.ModelConfig) as a transformers config.

Every ModelConfig field is an attribute of the same name, written to config.json in full
(no field is left to a default, so a later titans-scale with other defaults reads the same
model); ModelConfig supplies the defaults and checks the values. Besides those:
  titans_run_config   the training run's config (a dict), when the export had one: converting
                      the folder back into a run (`convert --from hf`) restores it
  titans_step         the training step of the exported weights
  titans_tokenizer    "byte" (our byte tokenizer, as the tokenizer.json beside it) or "tokenizer.json"
"""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from titans_scale.config_io import config_from_dict
from titans_scale.model import ModelConfig

MODEL_TYPE = "titans_scale"
REMOTE_CODE_MODULE = "modeling_titans_scale"   # the modeling file beside an exported config.json
AUTO_MAP = {"AutoConfig": f"{REMOTE_CODE_MODULE}.TitansConfig",
            "AutoModelForCausalLM": f"{REMOTE_CODE_MODULE}.TitansForCausalLM"}
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


class TitansConfig(PretrainedConfig):
    model_type = MODEL_TYPE
    # the names other tools read (lm-evaluation-harness, pipelines) for ours
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "n_heads"}

    use_cache: bool = True
    # TitansLM ties its head to the embedding itself (model.tie_embeddings): transformers ties nothing
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    titans_run_config: dict | None = None
    titans_step: int | None = None
    titans_tokenizer: str | None = None

    def __post_init__(self, **kwargs):
        model = {k: kwargs.pop(k) for k in MODEL_FIELDS if k in kwargs}
        if isinstance(model.get("layers"), tuple):
            model["layers"] = list(model["layers"])
        cfg = config_from_dict(ModelConfig, model)          # defaults, types, ModelConfig.validate
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__post_init__(**kwargs)
        for k, v in dataclasses.asdict(cfg).items():
            setattr(self, k, v)

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers)

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs) -> "TitansConfig":
        return cls(**dataclasses.asdict(cfg), **kwargs)

    def model_config(self) -> ModelConfig:
        return config_from_dict(ModelConfig, {k: getattr(self, k) for k in MODEL_FIELDS})


__all__ = ["AUTO_MAP", "MODEL_FIELDS", "MODEL_TYPE", "REMOTE_CODE_MODULE", "TitansConfig"]
