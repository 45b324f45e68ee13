from .config import MIXERS, ModelConfig, ModelConfigError
from .titans import ModelState, TitansLM

__all__ = ["ModelConfig", "ModelConfigError", "ModelState", "TitansLM", "MIXERS"]
