"""Write a tiny, real GGUF file (llama architecture, Q8_0 weights, byte-level BPE tokenizer).

Used to test the zoo's pull -> join -> verify -> de-quantize path without the big downloads.
"""

from pathlib import Path

import numpy as np

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


def write_tiny_llama_gguf(path: Path, *, seed: int = 0, d_model: int = 64, n_layers: int = 2) -> dict:
    """Write the file; return its dimensions. Weights are random but fixed by ``seed``."""
    import gguf

    rng = np.random.default_rng(seed)
    n_heads, n_kv, d_mlp = 4, 2, 128
    head_dim = d_model // n_heads
    merges = ["Ġ t", "h e", "Ġt he", "i n", "a n"]
    tokens = _byte_alphabet() + [m.replace(" ", "") for m in merges] + ["<|im_start|>", "<|im_end|>"]
    vocab = len(tokens)
    # pad the vocabulary to a multiple of 32 rows? not needed: Q8_0 blocks run along d_model
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama-test")
    w.add_context_length(256)
    w.add_embedding_length(d_model)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(d_mlp)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - 2) + [3, 3])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab - 2)
    w.add_eos_token_id(vocab - 1)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    def q8(name: str, shape: tuple[int, ...], scale: float = 0.2) -> None:
        data = (rng.standard_normal(shape) * scale).astype(np.float32)
        q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    def f32(name: str, data: np.ndarray) -> None:
        w.add_tensor(name, data.astype(np.float32))

    q8("token_embd.weight", (vocab, d_model), 1.0)
    for i in range(n_layers):
        f32(f"blk.{i}.attn_norm.weight", 1 + 0.1 * rng.standard_normal(d_model))
        q8(f"blk.{i}.attn_q.weight", (n_heads * head_dim, d_model))
        q8(f"blk.{i}.attn_k.weight", (n_kv * head_dim, d_model))
        q8(f"blk.{i}.attn_v.weight", (n_kv * head_dim, d_model))
        q8(f"blk.{i}.attn_output.weight", (d_model, n_heads * head_dim))
        f32(f"blk.{i}.ffn_norm.weight", 1 + 0.1 * rng.standard_normal(d_model))
        q8(f"blk.{i}.ffn_gate.weight", (d_mlp, d_model))
        q8(f"blk.{i}.ffn_up.weight", (d_mlp, d_model))
        q8(f"blk.{i}.ffn_down.weight", (d_model, d_mlp))
    f32("output_norm.weight", 1 + 0.1 * rng.standard_normal(d_model))
    q8("output.weight", (vocab, d_model))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"d_model": d_model, "n_layers": n_layers, "vocab": vocab, "n_heads": n_heads}
