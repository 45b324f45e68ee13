"""TitansForCausalLM: TitansLM behind transformers' PreTrainedModel and GenerationMixin.

The generation cache is the model's own streaming state (model.titans.ModelState: each memory
layer's weights, momentum and conv cache, each attention layer's window tail), wrapped as a
transformers Cache: generate() feeds the prompt once, then one token per step with the state
passed on, so memory stays bounded by the window and the memory size, whatever the length.
Without a cache (use_cache=False) every step reruns the whole sequence; both give the same
tokens because a streamed state gives exactly the outputs of one call on the whole sequence.

Weights are TitansLM's state dict under "model." (the names convert's readers use too).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.utils._pytree as pytree
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from titans_scale.errors import CheckpointError
from titans_scale.model import ModelState, TitansLM

from .configuration import REMOTE_CODE_MODULE, TitansConfig

# The modeling file an exported folder carries for trust_remote_code: it only names this package's
# classes (the model's code is not restated; loading needs titans-scale installed).
REMOTE_CODE = '''"""TitansForCausalLM for transformers' trust_remote_code: needs titans-scale installed
(pip install "titans-scale[hf]"); the model's code lives in that package (titans_scale.hf)."""
from titans_scale.hf import TitansConfig, TitansForCausalLM

__all__ = ["TitansConfig", "TitansForCausalLM"]
'''


def write_remote_code(folder: str | Path) -> None:
    (Path(folder) / f"{REMOTE_CODE_MODULE}.py").write_text(REMOTE_CODE)


class TitansCache(Cache):
    """TitansLM's ModelState as a transformers Cache. It has no per-layer key/value tensors
    (`layers` is empty): generate() only reads its length and, for beam search or several
    sequences per prompt, reorders or repeats its batch rows."""

    def __init__(self, state: ModelState | None = None):
        super().__init__(layers=[])
        self.state = state

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.state is None else self.state.position

    @property
    def is_croppable(self) -> bool:
        return False              # a memory update cannot be undone (no assisted decoding)

    def _map_rows(self, fn) -> None:
        if self.state is not None:
            self.state = ModelState(self.state.position, pytree.tree_map(
                lambda t: fn(t) if torch.is_tensor(t) else t, self.state.layers))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_rows(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        self.state = None


class TitansForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TitansConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _is_stateful = True

    def __init__(self, config: TitansConfig):
        super().__init__(config)
        self.model = TitansLM(config.model_config())
        self.post_init()

    def _init_weights(self, module):
        """TitansLM initialises itself when built; from_pretrained refuses missing weights
        rather than inventing them, so there is nothing to initialise here."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' from_pretrained, refusing a folder that lacks some of the weights (it
        would fill them with uninitialised memory): one line naming the first missing tensor."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            raise CheckpointError(f"'{args[0] if args else kwargs.get('pretrained_model_name_or_path')}' lacks "
                                  f"weight '{missing[0]}' ({len(missing)} missing): the export is partial")
        # safetensors hands back buffers that are not 64-byte aligned; CPU kernels then take other
        # vector paths and the logits move in their last bits. Fresh (aligned) copies give exactly
        # the logits of the same weights loaded by titans-scale.
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.clone()
        return (model, info) if want_info else model

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False                 # generate() must not make a key/value cache: ours comes from forward

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.model.head       # None when tied: TitansLM reuses the embedding

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code(save_directory)

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                cache: TitansCache | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, return_dict: bool | None = None, **kwargs):
        """input_ids [B, L] continue the sequence `cache` holds (None: a fresh sequence).
        There is no padding: an attention_mask must be all ones."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("TitansForCausalLM takes no padding (attention_mask has zeros): the memory reads "
                             "every token; run sequences of equal length, or one at a time (batch_size=1)")
        if cache is not None and not isinstance(cache, TitansCache):
            raise ValueError(f"cache must be a TitansCache (the model's streaming state), got {type(cache).__name__}")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        logits, state = self.model(input_ids, cache.state if cache is not None else None)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if use_cache:                # updated in place, as transformers' caches are
            cache = cache if cache is not None else TitansCache()
            cache.state = state
        out = CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)
        return out if return_dict is not False else out.to_tuple()


__all__ = ["REMOTE_CODE", "TitansCache", "TitansForCausalLM", "write_remote_code"]
