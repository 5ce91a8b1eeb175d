"""Task metrics: BLEU / ROUGE-L and exact match against hand-checked cases; references; batched generation."""

from __future__ import annotations

import pytest
import torch
from models_helpers import tiny

from fedtune.config import load_config
from fedtune.core.errors import ConfigError
from fedtune.data.references import reference_sets
from fedtune.metrics.task import normalize_answer, resolve_metric, score
from fedtune.models.generation import generate_answer, generate_answers


def test_bleu_rouge_perfect_and_disjoint():
    refs = [["the cat sat on the mat today"], ["a dog ran in the big park"]]
    perfect = score("bleu_rouge", ["the cat sat on the mat today", "a dog ran in the big park"], refs)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["rougeL"] == pytest.approx(100.0)
    disjoint = score("bleu_rouge", ["xyz qrs", "uvw"], refs)
    assert disjoint["bleu"] == pytest.approx(0.0) and disjoint["rougeL"] == pytest.approx(0.0)


def test_bleu_uses_every_reference_and_rouge_the_best():
    pred = ["the cat sat on the mat today"]
    one = score("bleu_rouge", pred, [["a dog ran in the big park"]])
    both = score("bleu_rouge", pred, [["a dog ran in the big park", "the cat sat on the mat today"]])
    assert both["bleu"] == pytest.approx(100.0) and one["bleu"] < 10.0
    assert both["rougeL"] == pytest.approx(100.0)


def test_rouge_l_partial_overlap_matches_hand_computation():
    # LCS("the cat sat", "the cat ran") = 2 tokens: P = R = 2/3, F1 = 2/3.
    assert score("bleu_rouge", ["the cat sat"], [["the cat ran"]])["rougeL"] == pytest.approx(200 / 3)


def test_exact_match_normalises_and_takes_the_first_line():
    assert normalize_answer("  The Answer, is: 42! ") == "answer is 42"
    result = score("exact_match", ["Paris.\nand more text", "london", "Rome"], [["paris"], ["Berlin"], ["rome", "roma"]])
    assert result == {"exact_match": pytest.approx(200 / 3)}


def test_metric_choice_auto_and_errors():
    assert resolve_metric("auto", "e2e") == "bleu_rouge" and resolve_metric("auto", "chatterbot") == "exact_match"
    assert resolve_metric("auto", "local") == "bleu_rouge" and resolve_metric("exact_match", "e2e") == "exact_match"
    from conftest import TINY

    with pytest.raises(ConfigError, match="eval.metric.*valid choices: auto, none, bleu_rouge, exact_match"):
        load_config(TINY, ["eval.metric=bleu"])
    with pytest.raises(ValueError, match="one reference list per prediction"):
        score("exact_match", ["a"], [])


def test_reference_sets_group_all_references_of_a_prompt():
    pairs = [("p1", "a"), ("p2", "b"), ("p1", "c"), ("p3", "d"), ("p2", "e")]
    prompts = [p for p, _ in pairs]
    assert reference_sets(prompts, pairs, 2) == [("p1", ["a", "c"]), ("p2", ["b", "e"])]
    assert reference_sets(prompts, pairs, 10)[-1] == ("p3", ["d"])


def test_reference_sets_gather_references_the_cap_left_out():
    source = [("p1", "a"), ("p2", "b"), ("p1", "c"), ("p3", "d"), ("p1", "f")]
    capped = ["p3", "p1"]  # what max_eval_samples kept: one row of each
    assert reference_sets(capped, source, 16) == [("p3", ["d"]), ("p1", ["a", "c", "f"])]


def test_batched_generation_equals_one_prompt_at_a_time():
    model, tokenizer = tiny("llama")
    torch.manual_seed(0)
    prompts = ["name : The Eagle", "a much longer prompt about a restaurant near the river", "x"]
    batched = generate_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    assert batched == [generate_answer(model, tokenizer, p, max_new_tokens=6) for p in prompts]
    assert tokenizer.padding_side == "right"  # restored after generation
