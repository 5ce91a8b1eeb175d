"""Tokenization with response-only labels, truncation, dropping and collation."""

from __future__ import annotations

import datasets
import pytest
import torch
from data_helpers import tiny_tokenizer

from fedtune.core.errors import DataError
from fedtune.data.formatting import IGNORE_INDEX, build_example, collate, format_prompt, tokenize_examples


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _ds(prompts, responses):
    return datasets.Dataset.from_dict({"prompt": prompts, "response": responses, "name": ["x"] * len(prompts)})


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_format_prompt_modes(tok):
    assert format_prompt(tok, "hi there", chat_template=True) == "<|user|>\nhi there\n<|assistant|>\n"
    assert format_prompt(tok, "hi there", chat_template=False) == "hi there\n"
    assert format_prompt(tok, "", chat_template=True) == ""
    assert format_prompt(tiny_tokenizer(chat=False), "hi", chat_template=True) == "hi\n"


@pytest.mark.parametrize("chat", [True, False])
def test_labels_mask_exactly_the_prompt(tok, chat):
    prompt, response = "name : The Eagle | area : riverside", "The Eagle is by the river ."
    out = tokenize_examples(_ds([prompt], [response]), tok, max_length=256, chat_template=chat)
    row = out[0]
    p_ids = _ids(tok, format_prompt(tok, prompt, chat))
    r_ids = _ids(tok, response) + [tok.eos_token_id]
    assert row["input_ids"] == p_ids + r_ids
    assert row["labels"] == [IGNORE_INDEX] * len(p_ids) + r_ids
    assert row["labels"][-1] == tok.eos_token_id
    assert row["length"] == len(row["input_ids"])
    assert out.column_names[:3] == ["prompt", "response", "name"]  # metadata kept
    assert out.num_dropped == 0


def test_plain_text_is_all_labelled(tok):
    row = tokenize_examples(_ds([""], ["The Mill is a pub ."]), tok, 64, chat_template=True)[0]
    assert IGNORE_INDEX not in row["labels"]
    assert row["labels"] == row["input_ids"]


def test_a_prompt_that_fills_the_window_drops_its_row_and_is_counted(tok):
    long_prompt = "name : The Eagle | " * 30
    ds = _ds([long_prompt, "name : X"], ["Nice place .", "Fine ."])
    out = tokenize_examples(ds, tok, max_length=16, chat_template=False)
    assert list(out["response"]) == ["Fine ."]  # the long prompt would lose its end: no response to learn after it
    assert out.truncation.as_dict() == {"max_length": 16, "rows": 2, "truncated": 0, "dropped_no_room": 1,
                                        "dropped_empty": 0}
    assert out.num_dropped == 1


def test_a_prompt_one_token_short_of_the_window_keeps_one_response_token(tok):
    prompt = "name : The Eagle | area : riverside"
    n_prompt = len(_ids(tok, prompt + "\n"))
    row = tokenize_examples(_ds([prompt], ["Nice place ."]), tok, max_length=n_prompt + 1, chat_template=False)[0]
    assert row["input_ids"][:n_prompt] == _ids(tok, prompt + "\n")  # the whole prompt
    assert row["labels"] == [IGNORE_INDEX] * n_prompt + _ids(tok, "Nice place .")[:1]


def test_truncation_counts_rows_cut_at_the_window(tok, caplog):
    response = "The Eagle is a family friendly coffee shop in the city centre near Burger King ."
    out = tokenize_examples(_ds(["name : X", "name : Y"], [response, "Ok ."]), tok, max_length=20,
                            chat_template=True, where="training split")
    assert out.truncation.truncated == 1 and out.truncation.dropped == 0
    assert "training split: 1 of 2 rows cut at max_length 20" in caplog.text


def test_truncation_cuts_the_response_tail(tok):
    response = "The Eagle is a family friendly coffee shop in the city centre near Burger King ."
    row = tokenize_examples(_ds(["name : X"], [response]), tok, max_length=20, chat_template=True)[0]
    n_prompt = len(_ids(tok, format_prompt(tok, "name : X", True)))
    assert len(row["input_ids"]) == 20
    assert row["labels"][n_prompt:] == _ids(tok, response)[: 20 - n_prompt]


def test_empty_responses_are_dropped_and_counted(tok):
    out = tokenize_examples(_ds(["a", "b", "c"], ["Yes .", "", "No ."]), tok, 32, chat_template=True)
    assert len(out) == 2 and out.num_dropped == 1
    assert list(out["response"]) == ["Yes .", "No ."]
    assert all(any(label != IGNORE_INDEX for label in row) for row in out["labels"])


def test_deterministic(tok):
    ds = _ds(["p1", "p2"], ["r one", "r two"])
    assert tokenize_examples(ds, tok, 32, True).to_dict() == tokenize_examples(ds, tok, 32, True).to_dict()


def test_missing_columns_error(tok):
    with pytest.raises(DataError, match="response"):
        tokenize_examples(datasets.Dataset.from_dict({"prompt": ["x"]}), tok, 32, True)


def test_build_example_without_response():
    assert build_example([1, 2], [], eos_id=0, max_length=8) is None


def test_collate_right_pads(tok):
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate(feats, pad_token_id=tok.pad_token_id)
    pad = tok.pad_token_id
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
