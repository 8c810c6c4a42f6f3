"""The whole flow on every available device, and CUDA against CPU where a GPU exists.

On a CPU-only machine this runs the CPU path (the other tests do too); on a machine with
CUDA it runs the same steps there and checks the results agree with the CPU's.
"""

import pytest
import torch

from xferlens import load_model
from xferlens.activations import cache_activations, paired_activations, positions, resid_post
from xferlens.evaluation import evaluate_mapper, evaluate_steering, perplexity, substring
from xferlens.mappers import fit_mapper
from xferlens.steering import diff_of_means, generate, steer, transfer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TEXTS = [f"text number {i}: the {['cat', 'dog', 'bird'][i % 3]} saw {i * 13} stars" for i in range(40)]
POS = ["the cat sat on the mat", "a dog ran", "birds sing in the morning", "hello there world"]
NEG = ["numbers 1 2 3", "x y z", "the sky is blue today", "one more prompt here ok"]


def flow(device: str, folder_a, folder_b, home) -> dict:
    src = load_model(folder_a, device=device, progress=False, home=home)
    tgt = load_model(folder_b, device=device, progress=False, home=home)
    out = {}
    acts = cache_activations(src, TEXTS[:6], [0, 2], progress=False)
    out["acts"] = acts.rows(resid_post(2))
    assert out["acts"].device.type == "cpu"  # cached rows always come back to the CPU
    pairs = paired_activations(src, tgt, TEXTS, 1, 1, positions=positions.from_token(1), progress=False)
    affine, _ = fit_mapper(pairs, "affine", progress=False)
    ae, _ = fit_mapper(pairs, "autoencoder", {"max_epochs": 2}, progress=False)
    out["affine_w"] = affine.linear.weight.detach().cpu()
    assert next(ae.parameters()).device.type == "cpu"
    report = evaluate_mapper(
        affine.to(device), src, tgt, TEXTS[:3] + ["a held out text about fish"], controls=True
    )
    out["kl"] = report.patching["mapped"]["kl"]
    v = diff_of_means(src, POS, NEG, hooks=1)
    out["v"] = v.direction().cpu()
    t = transfer(v, affine, recalibrate=True)
    t_ae = transfer(v, ae.to(device), source_rows=pairs.src[:64])
    out["t"] = t.direction().cpu()
    assert torch.isfinite(t_ae.direction()).all()
    tokens = tgt.to_tokens(POS[0])
    with steer(tgt, t, alpha=2.0):
        out["steered_logits"] = tgt(tokens).cpu()
    with steer(tgt, t, mode="ablate", layers="all"):
        out["ablated_logits"] = tgt(tokens).cpu()
    out["gen"] = generate(tgt, POS, max_new_tokens=5, vector=t, alpha=2.0, progress=False)
    out["ppl"] = perplexity(tgt, TEXTS[:4], vector=t, alpha=1.0)
    rep = evaluate_steering(
        tgt, POS, {"t": t}, alphas=[2.0], judge=substring("a"), max_new_tokens=4, progress=False
    )
    out["rates"] = [r["rate"] for r in rep.rows]
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_the_whole_flow_runs_on(device, tiny_hf_folder, tmp_path):
    out = flow(device, tiny_hf_folder("llama"), tiny_hf_folder("qwen2"), tmp_path)
    for k in ("acts", "affine_w", "v", "t", "steered_logits", "ablated_logits"):
        assert torch.isfinite(out[k]).all(), k
    assert out["kl"] >= 0 and out["ppl"] > 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the CPU path runs above)")
def test_cuda_agrees_with_cpu(tiny_hf_folder, tmp_path):
    # TF32 would make CUDA matmuls differ from the CPU's at the 1e-3 level
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    a, b = tiny_hf_folder("llama"), tiny_hf_folder("qwen2")
    cpu = flow("cpu", a, b, tmp_path / "cpu")
    gpu = flow("cuda", a, b, tmp_path / "cuda")
    for k in ("acts", "v", "affine_w", "t", "steered_logits", "ablated_logits"):
        torch.testing.assert_close(gpu[k], cpu[k], atol=2e-3, rtol=2e-3, msg=k)
    assert gpu["kl"] == pytest.approx(cpu["kl"], rel=1e-2, abs=1e-4)
    assert gpu["ppl"] == pytest.approx(cpu["ppl"], rel=1e-3)
