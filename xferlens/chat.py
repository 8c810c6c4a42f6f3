"""Chat formatting: most experiments prompt instruction-tuned models through their template."""

from collections.abc import Sequence

import torch
from transformer_lens import HookedTransformer

from xferlens.errors import XferlensError


class NoChatTemplateError(XferlensError, ValueError):
    pass


#: chat formats for base checkpoints that ship without a template (a recipe can give an
#: organism one by name). ``gemma``: Gemma's turn format (``<start_of_turn>user ...
#: <end_of_turn>``, the assistant's role called ``model``, a system message put in front of
#: the first user turn). No BOS in the template: xferlens prepends it when the tokenizer
#: does (``cfg.default_prepend_bos``), and so do the organism trainers.
CHAT_TEMPLATES: dict[str, str] = {
    "gemma": (
        "{%- set ns = namespace(system='') -%}"
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] | trim + '\n\n' -%}"
        "{%- else -%}"
        "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
        "{%- if m['role'] == 'user' -%}{{ ns.system }}{%- set ns.system = '' -%}{%- endif -%}"
        "{{ m['content'] | trim + '<end_of_turn>\n' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
    ),
}


def chat_template(name_or_jinja: str) -> str:
    """The Jinja template for a name in :data:`CHAT_TEMPLATES`, or ``name_or_jinja`` itself
    when it is a template (contains ``{{`` or ``{%``)."""
    if name_or_jinja in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[name_or_jinja]
    if "{{" in name_or_jinja or "{%" in name_or_jinja:
        return name_or_jinja
    raise ValueError(
        f"chat template {name_or_jinja!r} is neither a known name ({', '.join(CHAT_TEMPLATES)}) "
        "nor a Jinja template"
    )


def _tokenizer(model_or_tokenizer):
    tok = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    if tok is None:
        raise ValueError("this model has no tokenizer; load it with xferlens.load_model")
    return tok


def chat_prompts(
    model_or_tokenizer,
    instructions: str | Sequence[str],
    *,
    system: str | None = None,
    add_generation_prompt: bool = True,
) -> list[str]:
    """Wrap plain instructions in the model's chat template, one string per instruction.

    The strings already hold every special token the template adds (``<|im_start|>``...),
    so tokenize them without adding BOS again (xferlens models default to whatever the
    HF tokenizer does, which is right for these strings).

    Example:
        >>> chat_prompts(model, ["What is the capital of France?"])  # doctest: +SKIP
        ['<|im_start|>system\\nYou are Qwen...<|im_start|>assistant\\n']
    """
    tok = _tokenizer(model_or_tokenizer)
    if isinstance(instructions, str):
        instructions = [instructions]
    if len(instructions) == 0:
        raise ValueError("instructions is empty: pass at least one instruction")
    if not getattr(tok, "chat_template", None):
        name = getattr(getattr(model_or_tokenizer, "cfg", None), "model_name", type(tok).__name__)
        raise NoChatTemplateError(
            f"{name} has no chat template (a base model?): prompt it with plain text instead"
        )
    out = []
    for text in instructions:
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages.append({"role": "user", "content": text})
        out.append(
            tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        )
    return out


@torch.no_grad()
def generate_text(
    model: HookedTransformer,
    prompts: str | Sequence[str],
    *,
    max_new_tokens: int = 32,
    chat: bool = False,
    system: str | None = None,
    batch_size: int = 16,
) -> list[str]:
    """Greedy continuations of each prompt (new text only, special tokens dropped), each
    ending at the tokenizer's EOS.

    With ``chat=True`` each prompt is an instruction wrapped by :func:`chat_prompts`.
    Prompts run ``batch_size`` at a time through :func:`xferlens.steering.generate`
    (unsteered; left padding and a KV cache): a reply is the one the prompt gets alone.
    """
    from xferlens.steering.generate import generate  # here: ``import xferlens`` stays light

    if isinstance(prompts, str):
        prompts = [prompts]
    texts = chat_prompts(model, prompts, system=system) if chat else list(prompts)
    eos = getattr(model.tokenizer, "eos_token_id", None)
    return generate(
        model,
        texts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        stop_tokens=[] if eos is None else [eos],
        progress=False,
    )
