"""xferlens: transfer activation-space interventions between language models.

The flow: ``load_model`` -> cache activations -> fit a mapper -> build a steering vector
-> transfer it -> evaluate. This release holds the foundation: the offline model zoo and
loading any model as a TransformerLens ``HookedTransformer``.
"""

from xferlens.chat import chat_prompts, generate_text
from xferlens.models import Processing, load_model
from xferlens.zoo import ZOO, pull

__version__ = "0.1.0"

__all__ = ["ZOO", "Processing", "chat_prompts", "generate_text", "load_model", "pull"]
