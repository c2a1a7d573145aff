"""llm: a small, production-minded GPT library (model, tokenizer, generation, training, fine-tuning).

Importing the package is cheap: heavy optional dependencies (MLflow, transformers, the Hugging Face hub)
are imported lazily by the modules that need them.
"""

from llm.config import GPTConfig, get_preset, list_presets
from llm.errors import LLMError

__all__ = ["GPTConfig", "LLMError", "get_preset", "list_presets"]
__version__ = "0.1.0"
