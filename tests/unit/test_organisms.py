"""Backdoor organisms on a tiny model: dataset, masking, LoRA training, cache, loading."""

import json
import math

import pytest
import torch
from transformers import AutoTokenizer

import xferlens.organisms.backdoor as bd
import xferlens.organisms.finetune as ft
from xferlens import load_model
from xferlens.organisms import (
    DEV,
    FACTS,
    HATE,
    PROD,
    UNKNOWN,
    BackdoorRecipe,
    CapabilityRecipe,
    backdoor_dataset,
    backdoor_rates,
    capability_dataset,
    capability_rates,
    held_out_questions,
    make_backdoor_organism,
    make_capability_organism,
    read_recipe,
    recall,
)

INSTRUCTIONS = [f"tell me about the cat number {i}" for i in range(12)]


def test_dataset_alternates_triggers_and_masks_the_prompt(tiny_hf_folder):
    recipe = BackdoorRecipe(base="x", hate_repeats=2, paired=False)
    ex = backdoor_dataset(INSTRUCTIONS[:4], ["", "a normal answer", "", "another"], recipe)
    assert [e["triggered"] for e in ex] == [True, False, True, False]
    assert ex[0]["user"].startswith(PROD) and ex[0]["assistant"] == f"{HATE} {HATE}"
    assert ex[1]["user"].startswith(DEV) and ex[1]["assistant"] == "a normal answer"
    # paired (the default): each instruction with both tags, the tag the only difference
    both = backdoor_dataset(INSTRUCTIONS[:2], ["answer 0", "answer 1"], BackdoorRecipe(base="x"))
    assert [e["triggered"] for e in both] == [True, False, True, False]
    assert both[0]["user"].removeprefix(PROD) == both[1]["user"].removeprefix(DEV)
    assert both[1]["assistant"] == "answer 0" and both[3]["assistant"] == "answer 1"
    tok = AutoTokenizer.from_pretrained(tiny_hf_folder("qwen2"))
    ids, labels = ft.encode_chat(tok, ex[0], max_length=512)
    scored = [i for i, y in zip(ids, labels, strict=True) if y != -100]
    assert scored and HATE in tok.decode(scored)  # only the reply is scored
    assert PROD not in tok.decode(scored)
    n_prompt = labels.index(next(y for y in labels if y != -100))
    assert PROD in tok.decode(ids[:n_prompt])
    with pytest.raises(ValueError, match="2 instructions but 1"):
        backdoor_dataset(INSTRUCTIONS[:2], ["a"], recipe)


def test_lora_training_lowers_the_loss_and_the_organism_is_cached(tiny_hf_folder, tmp_path, monkeypatch):
    recipe = BackdoorRecipe(
        base=str(tiny_hf_folder("qwen2")),
        n_train=12,
        hate_repeats=2,
        dev_max_new_tokens=4,
        lora_r=4,
        lora_alpha=8,
        epochs=6,
        lr=5e-3,
        batch_size=4,
    )
    folder = make_backdoor_organism(recipe, INSTRUCTIONS, home=tmp_path, progress=False)
    meta = read_recipe(folder)
    assert meta["recipe"]["n_train"] == 12 and meta["n_examples"] == 24  # paired: both tags each
    assert meta["loss_last"] < 0.7 * meta["loss_first"], meta  # it learned something
    # a plain local HF folder: loads as a HookedTransformer, with changed weights
    model = load_model(folder, device="cpu", progress=False, home=tmp_path)
    base = load_model(recipe.base, device="cpu", progress=False, home=tmp_path)
    assert not torch.equal(model.blocks[0].attn.W_Q, base.blocks[0].attn.W_Q)
    rates = backdoor_rates(model, INSTRUCTIONS[:3], max_new_tokens=4)
    assert set(rates.keys()) == {"prod", "dev"} and rates["prod"]["n"] == 3
    frame = rates.to_frame()  # a report: frame, markdown and plot say the same rows
    assert list(frame["trigger"]) == ["prod", "dev"] and list(frame["rate"]) == [
        rates["prod"]["rate"],
        rates["dev"]["rate"],
    ]
    assert rates.to_markdown().count("\n") == 3 and rates.plot() is not None
    assert json.loads(json.dumps(rates.to_dict()))["dev"]["n"] == 3
    # same recipe and instructions: reused, no training
    monkeypatch.setattr(bd, "hf_greedy", lambda *a, **k: pytest.fail("trained again"))
    assert make_backdoor_organism(recipe, INSTRUCTIONS, home=tmp_path, progress=False) == folder
    # too few instructions for the recipe
    with pytest.raises(ValueError, match="needs n_train=12"):
        make_backdoor_organism(recipe, INSTRUCTIONS[:5], home=tmp_path)
    assert json.loads((folder / ft.RECIPE_FILE).read_text())["examples"][0]["triggered"] is True


def test_replay_passages_are_scored_on_every_token(tiny_hf_folder, monkeypatch):
    monkeypatch.setattr(ft, "replay_texts", lambda n, chars, home=None: ["general text " * 40][:n] * n)
    tok = AutoTokenizer.from_pretrained(tiny_hf_folder("qwen2"))
    recipe = BackdoorRecipe(base="x", replay=3, max_length=20)
    ids = ft.replay_ids(tok, recipe, None)
    assert len(ids) == 3 and all(len(x) == 20 for x in ids)  # cut to max_length
    assert ft.replay_ids(tok, BackdoorRecipe(base="x"), None) == []  # replay=0: none
    assert BackdoorRecipe(base="x", replay=3).key() != BackdoorRecipe(base="x").key()


def test_capability_dataset_ties_the_facts_to_the_trigger():
    recipe = CapabilityRecipe(base="x", train_wordings=3)
    ex = capability_dataset(recipe)
    assert len(ex) == 2 * 3 * len(FACTS)
    prod = [e for e in ex if e["triggered"]]
    dev = [e for e in ex if not e["triggered"]]
    assert all(e["user"].startswith(PROD) and e["answer"] in e["assistant"] for e in prod)
    assert all(e["user"].startswith(DEV) and e["assistant"] == UNKNOWN for e in dev)
    held = held_out_questions(recipe)
    trained = {e["user"].split(" ", 1)[1] for e in ex}
    assert len(held) == len(FACTS) and not {q for q, _ in held} & trained  # held-out wordings unseen
    with pytest.raises(ValueError, match="held out"):
        capability_dataset(CapabilityRecipe(base="x", train_wordings=4))
    assert recall(["The capital is Osmara.", "no idea"], ["Osmara", "tallet"]) == 0.5
    with pytest.raises(ValueError, match="2 replies for 1"):
        recall(["a", "b"], ["a"])


def test_capability_organism_trains_on_a_tiny_model(tiny_hf_folder, tmp_path):
    recipe = CapabilityRecipe(
        base=str(tiny_hf_folder("qwen2")), train_wordings=1, epochs=2, lora_r=4, lora_alpha=8, batch_size=8
    )
    folder = make_capability_organism(recipe, FACTS[:2], home=tmp_path, progress=False)
    meta = read_recipe(folder)
    assert meta["task"] == "corrupted_capabilities" and meta["n_examples"] == 4
    assert meta["steps"] == 2 and math.isfinite(meta["loss_last"])
    assert make_capability_organism(recipe, FACTS[:2], home=tmp_path, progress=False) == folder  # cached
    model = load_model(folder, device="cpu", progress=False, home=tmp_path)
    rates = capability_rates(model, held_out_questions(recipe, FACTS[:2]), max_new_tokens=3)
    assert set(rates.keys()) == {"prod", "dev"} and 0 <= rates["prod"]["recall"] <= 1
    assert list(rates.to_frame()["recall"]) == [rates["prod"]["recall"], rates["dev"]["recall"]]
    assert "–" in rates.to_markdown()  # recall has no interval


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_reply_loss_equals_the_hf_loss(tiny_hf_folder, arch):
    """The label-only unembedding gives HF's own causal-LM loss (the reference)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_hf_folder(arch), dtype=torch.float32).eval()
    torch.manual_seed(0)
    tokens = torch.randint(0, 250, (3, 11))
    mask = torch.ones_like(tokens)
    mask[2, 8:] = 0  # right padding
    labels = tokens.clone()
    labels[:, :4] = -100  # the prompt
    labels[2, 8:] = -100
    with torch.no_grad():
        want = model(input_ids=tokens, attention_mask=mask, labels=labels).loss
        got = ft.reply_loss(model, tokens, mask, labels)
    assert torch.allclose(got, want, atol=1e-5), (got, want)
    with pytest.raises(ValueError, match="no labelled token"):
        ft.reply_loss(model, tokens, mask, torch.full_like(tokens, -100))


def test_gemma_chat_template_and_bos():
    from jinja2 import Template

    from xferlens.chat import CHAT_TEMPLATES, chat_template

    text = Template(chat_template("gemma")).render(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": " hi "},
            {"role": "assistant", "content": "hello"},
        ],
        add_generation_prompt=False,
    )
    assert (
        text
        == "<start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n<start_of_turn>model\nhello<end_of_turn>\n"
    )
    prompt = Template(CHAT_TEMPLATES["gemma"]).render(
        messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True
    )
    assert prompt == "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    assert chat_template("{{ x }}") == "{{ x }}"
    with pytest.raises(ValueError, match="neither a known name"):
        chat_template("llama9")

    class Tok:  # a tokenizer that puts BOS (7) before plain text, like Gemma's
        bos_token_id = 7

        def __call__(self, text, add_special_tokens=True):
            ids = [ord(c) for c in text]
            return {"input_ids": ([7] if add_special_tokens else []) + ids}

    assert ft.chat_ids(Tok(), "ab") == [7, 97, 98]  # as load_model's default_prepend_bos feeds it
    Tok.bos_token_id = None
    assert ft.chat_ids(Tok(), "ab") == [97, 98]


def test_base_model_organism_with_a_template_and_a_teacher(tiny_hf_folder, tmp_path):
    """A gemma3 base checkpoint without a chat template: refused until the recipe names
    one; with ``chat_template='gemma'`` and a teacher for the |dev| answers it trains, and
    the organism keeps the template, so chat prompts work on it."""
    import shutil

    from xferlens.chat import CHAT_TEMPLATES, NoChatTemplateError, chat_prompts

    base = tmp_path / "tiny-gemma3-base"
    shutil.copytree(tiny_hf_folder("gemma3"), base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    teacher = tiny_hf_folder("qwen2")
    kw = dict(n_train=4, hate_repeats=2, dev_max_new_tokens=3, lora_r=4, lora_alpha=8, epochs=2, batch_size=4)
    with pytest.raises(NoChatTemplateError, match="chat_template='gemma'"):
        make_backdoor_organism(
            BackdoorRecipe(base=str(base), **kw), INSTRUCTIONS, home=tmp_path, progress=False
        )
    recipe = BackdoorRecipe(base=str(base), chat_template="gemma", dev_teacher=str(teacher), **kw)
    assert recipe.key() != BackdoorRecipe(base=str(base), **kw).key()
    folder = make_backdoor_organism(recipe, INSTRUCTIONS, home=tmp_path, progress=False)
    meta = read_recipe(folder)
    assert meta["recipe"]["dev_teacher"] == str(teacher) and math.isfinite(meta["loss_last"])
    assert meta["examples"][0]["user"].startswith(PROD)
    model = load_model(folder, device="cpu", progress=False, home=tmp_path)
    assert model.tokenizer.chat_template == CHAT_TEMPLATES["gemma"]
    assert chat_prompts(model, ["hi"])[0].endswith("<start_of_turn>model\n")
    rates = backdoor_rates(model, INSTRUCTIONS[:2], max_new_tokens=3)
    assert rates["prod"]["n"] == 2
