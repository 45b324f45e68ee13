"""Parallelism for TitansLM, applied from outside the model (docs/design.md section 6).

layout (checks) -> state (process groups) -> build / tensor_parallel / stage / pipeline (model
chunks) -> megatron_engine | deepspeed_engine (data parallel, optimizer) -> runtime (a step)
-> checkpoint (resharding save/load). See docs/parallel.md.
"""

import logging
import warnings

# megatron-core warns at import, on every rank, that Transformer Engine / Apex fused kernels are
# absent and it uses torch's; on a CPU (or a plain torch install) that is expected, not news.
for _message in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                 "full scope is deprecated"):
    warnings.filterwarnings("ignore", message=_message)
# Its INFO lines (optimizer config, FSDP detection) repeat on every rank.
logging.getLogger("megatron").setLevel(logging.WARNING)
