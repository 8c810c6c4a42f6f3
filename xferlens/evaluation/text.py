"""Text similarity between completions (ROUGE-L F1 via Google's ``rouge-score``)."""

from functools import lru_cache


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(reference: str, candidate: str) -> float:
    """ROUGE-L F1 of ``candidate`` against ``reference`` (1.0: same word sequence)."""
    if not reference.strip() and not candidate.strip():
        return 1.0
    return float(_scorer().score(reference, candidate)["rougeL"].fmeasure)
