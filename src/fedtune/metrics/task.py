"""Task metrics computed by generation on held-out prompts with references, by name.

``bleu_rouge`` suits E2E-style generation (corpus BLEU from sacrebleu, multi-reference; ROUGE-L F1 from
rouge-score, best over references); ``exact_match`` suits classification or short-answer data (the answer's
first line, normalised, equals one of the references). Scores are percentages (0-100).
"""

from __future__ import annotations

import re
import string
from typing import Callable

from fedtune.core.registry import Registry

Metric = Callable[[list[str], list[list[str]]], dict[str, float]]

TASK_METRICS: Registry[Metric] = Registry("task metric")

#: The metric ``auto`` picks per built-in dataset; other datasets get ``bleu_rouge``.
DATASET_DEFAULTS = {"e2e": "bleu_rouge", "chatterbot": "exact_match"}


def resolve_metric(name: str, dataset: str) -> str:
    """``auto`` → the dataset's default metric; any other name is returned as is."""
    return DATASET_DEFAULTS.get(dataset, "bleu_rouge") if name == "auto" else name


def _first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


@TASK_METRICS.register("bleu_rouge")
def bleu_rouge(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, all references of each prompt) and mean best ROUGE-L F1 (rouge-score)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    preds = [_first_line(p) for p in predictions]
    depth = max(len(r) for r in references)
    # sacrebleu wants one stream per reference slot; prompts with fewer references repeat their last one.
    streams = [[refs[min(j, len(refs) - 1)] for refs in references] for j in range(depth)]
    bleu = sacrebleu.corpus_bleu(preds, streams).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in refs) for pred, refs in zip(preds, references)]
    return {"bleu": bleu, "rougeL": 100.0 * sum(rouge) / len(rouge)}


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace (the SQuAD normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


@TASK_METRICS.register("exact_match")
def exact_match(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Share of answers whose normalised first line equals a normalised reference."""
    hits = [normalize_answer(_first_line(p)) in {normalize_answer(r) for r in refs}
            for p, refs in zip(predictions, references)]
    return {"exact_match": 100.0 * sum(hits) / len(hits)}


def score(name: str, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Run metric ``name`` (a :data:`TASK_METRICS` key) on aligned predictions and reference lists."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need one reference list per prediction, got {len(predictions)} and {len(references)}")
    return TASK_METRICS.get(name)(predictions, references)
