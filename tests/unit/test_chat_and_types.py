"""Chat templating, and the run-time shape checks the suite turns on."""

import pytest
import torch

from xferlens import chat_prompts, load_model
from xferlens.chat import NoChatTemplateError, generate_text
from xferlens.verify import logprob_gap


@pytest.fixture(scope="module")
def tiny_chat_model(tiny_hf_folder, tmp_path_factory):
    # module scope runs before the per-test private cache is set: name the cache here
    home = tmp_path_factory.mktemp("home")
    return load_model(tiny_hf_folder("llama"), device="cpu", progress=False, home=home)


def test_chat_prompts_apply_the_template(tiny_chat_model):
    out = chat_prompts(tiny_chat_model, ["hi there", "and you?"], system="be brief")
    assert out[0] == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi there<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert len(out) == 2 and "and you?" in out[1]
    # special tokens of the template become single tokens, not spelled-out bytes
    tokens = tiny_chat_model.to_tokens(out[0])[0].tolist()
    assert tokens[0] == tiny_chat_model.tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_chat_prompts_bad_input(tiny_chat_model):
    with pytest.raises(ValueError, match="empty"):
        chat_prompts(tiny_chat_model, [])
    tok = tiny_chat_model.tokenizer
    saved, tok.chat_template = tok.chat_template, None
    try:
        with pytest.raises(NoChatTemplateError, match="plain text"):
            chat_prompts(tiny_chat_model, "hi")
    finally:
        tok.chat_template = saved


def test_generate_text_returns_only_new_text(tiny_chat_model):
    (reply,) = generate_text(tiny_chat_model, "the cat", max_new_tokens=5)
    assert isinstance(reply, str) and not reply.startswith("the cat")


def test_shape_annotations_are_checked_at_run_time(tiny_chat_model, tiny_hf_folder):
    """The suite runs with jaxtyping+beartype: a 1-D token tensor must be rejected."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_hf_folder("llama"))
    from jaxtyping import TypeCheckError

    with pytest.raises(TypeCheckError, match="xferlens.verify.logprob_gap"):
        logprob_gap(tiny_chat_model, hf, torch.tensor([1, 2, 3]))
