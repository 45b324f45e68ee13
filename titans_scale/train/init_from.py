"""train.init_from: a new run that starts from another run's model weights (e.g. to go on
training a recall model on longer rows). Any checkpoint titans_scale.convert reads can be the
source: a run folder, one step_N folder, a consolidated or a tensor/pipeline-parallel checkpoint.
Only the model's weights are taken; the step, optimizer, scheduler and data start fresh."""

from __future__ import annotations

import dataclasses
import logging
import os

import torch

from titans_scale.config import RunConfig
from titans_scale.convert import open_checkpoint
from titans_scale.errors import CheckpointError, ConvertError
from titans_scale.model import TitansLM

log = logging.getLogger("titans_scale.train")
MODEL = "model."


def init_weights(model: TitansLM, source: str) -> list[str]:
    """Copy the source's model weights into `model` in place. The two must hold the same weights
    with the same shapes (else one line names the first that differs); model fields that differ
    without changing a shape (max_lr, options such as model.mem_residual) are allowed and returned."""
    try:
        reader = open_checkpoint(source)
        saved = {t.name[len(MODEL):]: t for t in reader.tensors() if t.name.startswith(MODEL)}
        saved_cfg = reader.model_config()
    except ConvertError as e:
        raise CheckpointError(f"train.init_from='{source}': {e}") from None
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    missing = sorted(set(own) - set(saved))
    unused = sorted(k for k in set(saved) - set(own) if not k.endswith("_extra_state"))
    wrong = [k for k in own if k in saved and tuple(saved[k].shape) != tuple(own[k].shape)]
    differ = [f.name for f in dataclasses.fields(saved_cfg) if getattr(saved_cfg, f.name) != getattr(model.cfg, f.name)]
    if missing or unused or wrong:
        what = (f"has no weight '{missing[0]}'" if missing else
                f"holds '{unused[0]}', which this model has not" if unused else
                f"holds '{wrong[0]}' as {tuple(saved[wrong[0]].shape)}, this model as {tuple(own[wrong[0]].shape)}")
        raise CheckpointError(f"train.init_from='{source}' {what}: its model differs in "
                              f"{', '.join('model.' + f for f in differ) or 'its layers'}; "
                              "use the same model sizes and layers as the run it comes from")
    with torch.no_grad():
        for key, value in reader.read_many([MODEL + k for k in own]).items():
            own[key[len(MODEL):]].copy_(value)
    return differ


def initial_model(cfg: RunConfig, source: str) -> TitansLM:
    """The whole model with the source's weights, built on every rank (each engine then keeps what
    it holds: the whole model, or its stage's shard)."""
    torch.manual_seed(cfg.train.seed)
    model = TitansLM(cfg.model)
    differ = init_weights(model, source)
    if int(os.environ.get("RANK", "0")) == 0:
        log.info("weights from %s%s", source, f" (model fields that differ: {', '.join(differ)})" if differ else "")
    return model


__all__ = ["init_weights", "initial_model"]
