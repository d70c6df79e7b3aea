"""lowvram: every GLM generation, quantized, on the hardware people own."""

from .checkpoint import CheckpointError
from .config import ConfigError, GLMConfig, load_config
from .model import ContextError, Model, PromptCache, load

__version__ = "0.1.0"


def load_tokenizer(path, chat_format=None):
    """The tokenizer of a checkpoint directory, without loading any weights."""
    from .tokenizer import load_tokenizer as _load

    return _load(path, chat_format=chat_format)


__all__ = ["load", "load_tokenizer", "load_config", "Model", "PromptCache", "GLMConfig", "ConfigError",
           "CheckpointError", "ContextError", "__version__"]
