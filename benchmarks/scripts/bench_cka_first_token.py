"""Linear CKA between SmolLM2 and Qwen-0.5B layers with and without each text's first token.

    python benchmarks/scripts/bench_cka_first_token.py   # -> benchmarks/results/cka_first_token_cross.json

The first token is an attention sink with a huge activation norm; this shows what it does
to the layer-pair search (benchmarks/RESULTS.md, "CKA and the first token").
"""

import json
import time

from xferlens import data, load_model
from xferlens.evaluation import layer_pair_scores

SRC_LAYERS, TGT_LAYERS = [3, 8, 11, 15, 20, 26, 29], [4, 8, 12, 16, 20]


def main() -> None:
    src = load_model("smollm2-135m-instruct", device="cpu", progress=False)
    tgt = load_model("qwen2.5-coder-0.5b-instruct", device="cpu", progress=False)
    texts = data.default_corpus(None).texts[:16]
    out = {"src_layers": SRC_LAYERS, "tgt_layers": TGT_LAYERS}
    for name, pos in [("all", "all"), ("from_token(1)", None)]:
        t0 = time.perf_counter()
        ls = layer_pair_scores(
            src, tgt, texts, src_layers=SRC_LAYERS, tgt_layers=TGT_LAYERS, positions=pos, progress=False
        )
        out[name] = ls.scores.round(3).tolist()
        print(name, f"{time.perf_counter() - t0:.1f} s\n", ls.scores.round(3))
    with open("benchmarks/results/cka_first_token_cross.json", "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
