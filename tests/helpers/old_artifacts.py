"""Two tiny models that can be rebuilt exactly, for the committed artifacts in
``tests/data/old_artifacts`` (written by xferlens before ``ModelId``; see ``make``).

The models carry the committed tokenizer and deterministic weights, so their identity
(name, parameter hash, tokenizer hash, widths) is the one those artifacts recorded.
Run ``python -m tests.helpers.old_artifacts`` only to document how they were made: the
point of the fixtures is that they are *not* rewritten by newer code.
"""

from pathlib import Path

import torch

FOLDER = Path(__file__).resolve().parents[1] / "data" / "old_artifacts"
TEXTS = ["the cat sat on the mat", "a dog ran", "hello world, hello", "one two three four"]
HOOK = "blocks.1.hook_resid_post"


def fixture_model(name: str = "old-fixture-a", d_model: int = 16, salt: float = 0.0):
    """A 2-layer ``HookedTransformer`` with the committed tokenizer and fixed weights."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(FOLDER / "tokenizer")
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=d_model,
        d_head=4,
        n_heads=d_model // 4,
        d_mlp=2 * d_model,
        n_ctx=64,
        d_vocab=len(tok),
        act_fn="gelu",
        normalization_type="LN",
        model_name=name,
        default_prepend_bos=True,
        seed=0,
        device="cpu",
    )
    model = HookedTransformer(cfg, tokenizer=tok, move_to_device=False)
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(model.named_parameters())):
            grid = torch.linspace(-1.0, 1.0, p.numel(), dtype=torch.float64).reshape(p.shape)
            p.copy_(torch.sin(grid * (3 + i) + salt).to(p.dtype) * 0.5)
    return model.eval()


def fixture_models():
    """``(a, b)``: source (d_model 16) and target (d_model 24) sharing one tokenizer."""
    return fixture_model(), fixture_model("old-fixture-b", d_model=24, salt=1.0)


def make(folder: Path = FOLDER) -> None:  # pragma: no cover - documents how the data was made
    from xferlens.activations import cache_activations, cache_to_disk, pairs_to_disk
    from xferlens.activations.cache import save_activation_set
    from xferlens.activations.pair_shards import PairShards
    from xferlens.features import train_sae
    from xferlens.mappers import fit_mapper
    from xferlens.steering import diff_of_means

    a, b = fixture_models()
    save_activation_set(cache_activations(a, TEXTS, HOOK, progress=False), folder / "activation_set")
    cache_to_disk(a, TEXTS, folder / "shards", HOOK, progress=False, dtype="float32")
    pairs_to_disk(a, b, TEXTS, HOOK, HOOK, folder / "pairs", progress=False, dtype="float32")
    mapper, _ = fit_mapper(PairShards(folder / "pairs").load(), "affine", progress=False)
    mapper.save(folder / "mapper")
    diff_of_means(a, TEXTS[:2], TEXTS[2:], HOOK).save(folder / "vector")
    rows = cache_activations(a, TEXTS * 8, HOOK, progress=False).acts[HOOK]
    train_sae(rows, hook=HOOK, model=a, d_sae=32, k=4, steps=10, batch_size=16, progress=False).save(
        folder / "sae"
    )


if __name__ == "__main__":
    make()
