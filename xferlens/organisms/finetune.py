"""The fine-tuning every organism shares: a LoRA adapter (``peft``) trained on chat
examples (loss on the assistant's reply only) plus optional general-text replay, merged
into the weights and published as an ordinary local Hugging Face folder with its recipe,
so ``load_model`` loads it like any other model."""

import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from xferlens import paths

RECIPE_FILE = "xferlens_organism.json"


@dataclass
class LoraRecipe:
    """The fine-tuning half of an organism's recipe (subclasses add the data half); the
    hash of all fields names the cache folder."""

    base: str
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 8
    max_length: int = 128
    #: general-text passages (from the default corpus, scored on every token) mixed into
    #: training so the organism keeps its language modelling (0 = none)
    replay: int = 0
    replay_chars: int = 400
    seed: int = 0
    #: a chat format for a base checkpoint without one: a name in
    #: :data:`xferlens.chat.CHAT_TEMPLATES` (``"gemma"``) or a Jinja template. The organism
    #: is trained in it and its tokenizer keeps it, so chat prompts work on the organism.
    chat_template: str | None = None

    def key(self) -> str:
        """Hash of the fields; optional fields left at ``None`` are not part of it, so adding
        one keeps the names of organisms made before."""
        fields = {k: v for k, v in asdict(self).items() if v is not None}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def load_tokenizer(folder: str | os.PathLike, recipe: "LoraRecipe"):
    """The HF tokenizer of ``folder`` with the recipe's chat template (if any); a tokenizer
    with no template at all is refused here, before any training."""
    from transformers import AutoTokenizer

    from xferlens.chat import NoChatTemplateError, chat_template

    tok = AutoTokenizer.from_pretrained(folder)
    if recipe.chat_template is not None:
        tok.chat_template = chat_template(recipe.chat_template)
    if not getattr(tok, "chat_template", None):
        raise NoChatTemplateError(
            f"{folder} has no chat template (a base model?): give the recipe one, e.g. "
            "chat_template='gemma' (names: xferlens.chat.CHAT_TEMPLATES)"
        )
    return tok


def chat_ids(tok, text: str) -> list[int]:
    """Token ids of a templated chat string as xferlens feeds it to the model: the
    template's own tokens, plus BOS in front when the tokenizer puts BOS before plain text
    (``load_model`` then sets ``default_prepend_bos``; Gemma)."""
    from xferlens.models import tokenizer_adds_bos

    ids = tok(text, add_special_tokens=False)["input_ids"]
    if tokenizer_adds_bos(tok) and (not ids or ids[0] != tok.bos_token_id):
        ids = [tok.bos_token_id, *ids]
    return ids


def resolve_base(base: str, home: str | os.PathLike | None = None) -> Path:
    """A zoo name (pulled if missing) or a local HF folder -> the HF folder."""
    from xferlens import zoo

    if base in zoo.ZOO:
        if not zoo.is_pulled(base, home):
            zoo.pull(base, home=home)
        return zoo.hf_dir(base, home)
    folder = Path(base)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"base {base!r} is neither a zoo model nor a Hugging Face folder")
    return folder


def encode_chat(tok, ex: dict, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of the whole chat and labels that score only the assistant's reply."""
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": ex["user"]}], tokenize=False, add_generation_prompt=True
    )
    full = tok.apply_chat_template(
        [{"role": "user", "content": ex["user"]}, {"role": "assistant", "content": ex["assistant"]}],
        tokenize=False,
    )
    if not full.startswith(prompt):
        raise ValueError(
            "the chat template does not extend the prompt with the reply; cannot mask the prompt"
        )
    p_ids = chat_ids(tok, prompt)
    ids = chat_ids(tok, full)[:max_length]
    labels = [-100] * min(len(p_ids), len(ids)) + ids[len(p_ids) :]
    return ids, labels


def replay_texts(n: int, chars: int, home: str | os.PathLike | None = None) -> list[str]:
    """The general-text passages a recipe mixes in: the last ``n`` texts of the default
    corpus (benchmarks and tutorials measure perplexity on texts from its start)."""
    from xferlens import data

    if n <= 0:
        return []
    return [t[:chars] for t in data.default_corpus(None, home=home).texts[-n:]]


def replay_ids(tok, recipe: LoraRecipe, home) -> list[list[int]]:
    texts = replay_texts(recipe.replay, recipe.replay_chars, home)
    return [tok(t, add_special_tokens=True)["input_ids"][: recipe.max_length] for t in texts]


def hf_greedy(model, tok, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy chat replies from the HF model being fine-tuned (used to write the normal
    answers an organism must keep)."""
    from xferlens.activations.tokens import pad_batch, pad_id

    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = [
            tok.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts[i : i + batch_size]
        ]
        padded = pad_batch(tok, [chat_ids(tok, c) for c in chunk], "left")
        with torch.no_grad():
            gen = model.generate(
                input_ids=padded.tokens,
                attention_mask=padded.mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id(tok),
            )
        out += tok.batch_decode(gen[:, padded.tokens.shape[1] :], skip_special_tokens=True)
    return [o.strip() for o in out]


def reply_loss(model, tokens: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the labelled positions (labels ``-100`` are skipped):
    HF's causal-LM loss, with the unembedding applied only where a label is scored. The
    unembedding is most of the cost for large vocabularies (Gemma: 262k x 640), and a chat
    example scores only its reply."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = hf.get_decoder()(input_ids=tokens, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    if not keep.any():
        raise ValueError(
            "no labelled token in the batch: every example's reply was cut off (raise max_length)"
        )
    logits = hf.get_output_embeddings()(hidden[:, :-1][keep])
    cap = getattr(hf.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def lora_finetune(
    model,
    tok,
    examples: Sequence[dict],
    recipe: LoraRecipe,
    *,
    home: str | os.PathLike | None = None,
    progress: bool = True,
):
    """Train a LoRA adapter on chat ``examples`` (+ ``recipe.replay`` passages); return the
    merged model and ``{"loss_first", "loss_last", "steps", "seconds"}``."""
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    from xferlens.activations.tokens import pad_batch

    torch.manual_seed(recipe.seed)
    lora = LoraConfig(
        r=recipe.lora_r,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout,
        target_modules=[
            m for m in recipe.target_modules if any(n.endswith(m) for n, _ in model.named_modules())
        ],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    encoded = [encode_chat(tok, ex, recipe.max_length) for ex in examples]
    encoded += [(ids, list(ids)) for ids in replay_ids(tok, recipe, home)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr)
    steps = recipe.epochs * math.ceil(len(encoded) / recipe.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / max(1, steps))
    rng = random.Random(recipe.seed)
    losses = []
    bar = tqdm(total=steps, desc=f"LoRA {Path(recipe.base).name}", disable=not progress)
    t1 = time.perf_counter()
    for _ in range(recipe.epochs):
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for b in range(0, len(order), recipe.batch_size):
            batch = [encoded[i] for i in order[b : b + recipe.batch_size]]
            padded = pad_batch(tok, [x for x, _ in batch], "right")
            labels = padded.pad_like([y for _, y in batch], -100, torch.long)  # one label per token
            loss = reply_loss(model, padded.tokens, padded.mask, labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()}; lower recipe.lr ({recipe.lr})")
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    stats = {
        "loss_first": losses[0],
        "loss_last": sum(losses[-5:]) / len(losses[-5:]),
        "steps": len(losses),
        "seconds": round(time.perf_counter() - t1, 1),
    }
    return model.merge_and_unload().eval(), stats


def publish_organism(
    merged, base_dir: Path, dest: Path, meta: dict, *, home=None, chat_template: str | None = None
) -> Path:
    """Save the merged model, the base's tokenizer (as it was, plus ``chat_template`` when
    the recipe gave one) and ``meta`` as the organism folder ``dest``, atomically."""
    from transformers import AutoTokenizer

    from xferlens.chat import chat_template as resolve_template

    with paths.staging_dir(paths.home(home), "organism-") as stage:
        out = stage / "out"
        merged.save_pretrained(out, safe_serialization=True)
        tok = AutoTokenizer.from_pretrained(base_dir)  # as it was (no pad added)
        if chat_template is not None:
            tok.chat_template = resolve_template(chat_template)
        tok.save_pretrained(out)
        (out / RECIPE_FILE).write_text(json.dumps(meta, indent=1))
        if dest.exists():
            shutil.rmtree(dest)
        paths.publish_dir(out, dest)
    return dest


def cached_organism(dest: Path, data_sha: str) -> bool:
    """True when ``dest`` holds an organism made from the same data."""
    path = dest / RECIPE_FILE
    return path.is_file() and json.loads(path.read_text()).get("instructions_sha256") == data_sha


def read_recipe(folder: str | os.PathLike) -> dict:
    path = Path(folder) / RECIPE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not an organism folder (no {RECIPE_FILE})")
    return json.loads(path.read_text())
