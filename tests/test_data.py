"""The data layer: reading records in every format, turning each accepted shape into token ids, rejecting bad
records with a message that says where and which field, and collating (padding, packing) without letting
packed examples see each other.

Token ids are checked against the real SmolLM2 tokenizer and its chat template (ChatML: ``<|im_start|>role\\n
content<|im_end|>\\n``, EOS = ``<|im_end|>``, no BOS); log-probs against a tiny random llama in fp32.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

import alignkit.logprobs
from alignkit.data import (
    IGNORE,
    DataError,
    Record,
    SFTExample,
    build_examples,
    encode_prompt,
    load_records,
    pack_sft,
    pad_sft,
    preference_example,
    prompt_example,
    ranked_example,
    read_examples,
    sft_example,
    unpaired_example,
)
from alignkit.data.collate import collate_packed
from alignkit.logprobs import token_logprobs
from alignkit.models import load_tokenizer, tiny_causal_lm

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
ROWS = [
    {"prompt": "What is 2+2?", "completion": "4"},
    {"prompt": "Name a colour.", "completion": 'Blue, like the "sky".'},  # comma and quotes stress CSV quoting
    {"prompt": "Write two lines.", "completion": "one\ntwo"},  # a quoted CSV cell spanning two lines
]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core machine: two OpenMP threads contend and run ~50x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def tiny():
    model, _ = tiny_causal_lm()
    return model.float().eval()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def runs(tok, input_ids: list[int], labels: list[int]) -> list[tuple[bool, str]]:
    """The example as consecutive (trained?, decoded text) runs."""
    pairs = zip(input_ids, labels, strict=True)
    return [
        (trained, tok.decode([t for t, _ in group]))
        for trained, group in itertools.groupby(pairs, key=lambda p: p[1] != IGNORE)
    ]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def rec(data: dict) -> Record:
    return Record(data, "t.jsonl:1")


def test_tokenizer_facts(tok):
    """The facts the exact assertions below rely on."""
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok("Hello world")["input_ids"] == ids(tok, "Hello world")  # no BOS is added to plain text


# --------------------------------------------------------------------------------------------------- formats


def test_every_format_gives_the_same_records(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    # a blank line in JSONL is skipped but still counted, so the third record sits on line 4
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in ROWS[:2]) + "\n\n" + json.dumps(ROWS[2]) + "\n", encoding="utf-8")
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(ROWS), encoding="utf-8")
    as_data = tmp_path / "data.json"
    as_data.write_text(json.dumps({"data": ROWS}), encoding="utf-8")
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), parquet)
    csv_path = write_csv(tmp_path / "d.csv", ROWS)
    dataset = datasets.Dataset.from_list(ROWS)
    saved = tmp_path / "saved"
    dataset.save_to_disk(str(saved))

    expected_where = {
        jsonl: [f"{jsonl}:1", f"{jsonl}:2", f"{jsonl}:4"],
        as_list: [f"{as_list}:item {i}" for i in (1, 2, 3)],
        as_data: [f"{as_data}:item {i}" for i in (1, 2, 3)],
        parquet: [f"{parquet}:row {i}" for i in (1, 2, 3)],
        csv_path: [f"{csv_path}:line 2", f"{csv_path}:line 3", f"{csv_path}:line 4"],  # header is line 1
        saved: [f"{saved}:row {i}" for i in (1, 2, 3)],
    }
    for source, where in expected_where.items():
        for given in (source, str(source)):
            records = load_records(given)
            assert [r.data for r in records] == ROWS, source
            assert [r.where for r in records] == where, source
    # the last CSV record spans lines 4-5 (multi-line cell); a record after it starts on line 6
    longer = write_csv(tmp_path / "longer.csv", ROWS + ROWS[:1])
    assert [r.where for r in load_records(longer)][-1] == f"{longer}:line 6"

    records = load_records(dataset)
    assert [r.data for r in records] == ROWS
    assert [r.where for r in records] == ["Dataset:row 1", "Dataset:row 2", "Dataset:row 3"]
    records = load_records(ROWS)
    assert [r.data for r in records] == ROWS
    assert [r.where for r in records] == ["<list>:row 0", "<list>:row 1", "<list>:row 2"]


def test_dataset_dict_split_selection(tmp_path):
    import datasets

    dd = datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS), test=datasets.Dataset.from_list(ROWS[:1]))
    assert [r.data for r in load_records(dd)] == ROWS  # "train" by default
    test = load_records(dd, split="test")
    assert [r.data for r in test] == ROWS[:1] and test[0].where == "DatasetDict:row 1"
    with pytest.raises(DataError) as e:
        load_records(dd, split="validation")
    assert str(e.value) == "DatasetDict: no split 'validation'; available: train, test"

    saved = tmp_path / "dd"
    dd.save_to_disk(str(saved))
    assert [r.data for r in load_records(saved, split="test")] == ROWS[:1]
    assert load_records(saved, split="test")[0].where == f"{saved}:row 1"
    with pytest.raises(DataError, match=r"no split 'dev'; available: train, test$"):
        load_records(saved, split="dev")


def test_nested_messages_survive_parquet_and_datasets(tmp_path, tok):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"messages": [user("Capital of France?"), assistant("Paris.")]},
        {"messages": [user("2+2?"), assistant("4"), user("Times 3?"), assistant("12")]},
    ]
    parquet = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    reference, _ = build_examples(load_records(rows), sft_example, tok)
    for source in (write_jsonl(tmp_path / "m.jsonl", rows), parquet, datasets.Dataset.from_list(rows)):
        examples, skipped = build_examples(load_records(source), sft_example, tok)
        assert [(e.input_ids, e.labels) for e in examples] == [(e.input_ids, e.labels) for e in reference]
        assert skipped == Counter()


def test_bundled_dataset(tok):
    records = load_records("bundled:instructions_train")
    path = Path(alignkit.logprobs.__file__).parent / "bundled" / "instructions_train.jsonl"
    assert len(records) == len(path.read_text(encoding="utf-8").splitlines()) == 318
    assert records[0].where == f"{path}:1" and records[-1].where == f"{path}:318"
    assert records[0].data["messages"][0] == user("How many minutes and seconds are in 7 hours?")
    examples, skipped = build_examples(records, sft_example, tok, max_length=1024)
    assert len(examples) == 318 and skipped == Counter()  # the shipped data is all valid


# ---------------------------------------------------------------------------------------------------- shapes


def test_sft_prompt_completion_strings(tok):
    prompt, completion = "Question: What is the capital of France?\nAnswer:", " Paris, of course."
    e = sft_example(rec({"prompt": prompt, "completion": completion}), tok, None)
    p, c = ids(tok, prompt), ids(tok, completion) + [2]
    assert len(p) > 5 and len(c) > 3
    assert e.input_ids == p + c
    assert e.labels == [IGNORE] * len(p) + c  # -100 exactly on the prompt, the completion (and EOS) trained
    assert e.where == "t.jsonl:1"


def test_sft_conversational_prompt_completion(tok):
    prompt, completion = [user("What is the capital of France?")], [assistant("Paris.")]
    e = sft_example(rec({"prompt": prompt, "completion": completion}), tok, None)
    rendered = tok.apply_chat_template(prompt + completion, tokenize=False)
    assert rendered == SYSTEM + "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" \
        "<|im_start|>assistant\nParis.<|im_end|>\n"
    assert e.input_ids == ids(tok, rendered)
    assert runs(tok, e.input_ids, e.labels) == [
        (False, SYSTEM + "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"),
        (True, "Paris.<|im_end|>\n"),
    ]
    # a conversation ending in the assistant turn is the same example
    assert sft_example(rec({"messages": prompt + completion}), tok, None) == e


def test_sft_multi_turn_messages_train_every_assistant_turn(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        user("Hi"),
        assistant("Hello."),
        user("Capital of France?"),
        assistant("Paris."),
    ]
    e = sft_example(rec({"messages": messages}), tok, None)
    assert e.input_ids == ids(tok, tok.apply_chat_template(messages, tokenize=False))
    assert runs(tok, e.input_ids, e.labels) == [
        (False, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
        (True, "Hello.<|im_end|>\n"),
        (False, "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"),
        (True, "Paris.<|im_end|>\n"),
    ]
    trained = [t for t, label in zip(e.input_ids, e.labels, strict=True) if label != IGNORE]
    assert trained == [label for label in e.labels if label != IGNORE]  # labels are the token ids themselves


def test_sft_text(tok):
    text = "The quick brown fox jumps over the lazy dog."
    e = sft_example(rec({"text": text}), tok, None)
    assert e.input_ids == ids(tok, text) + [2]
    assert e.labels == e.input_ids  # every token trained, EOS included


def test_preference_explicit_prompt(tok):
    e = preference_example(rec({"prompt": "2+2 =", "chosen": " 4", "rejected": " 5"}), tok, None)
    assert (e.prompt_ids, e.chosen_ids, e.rejected_ids) == (ids(tok, "2+2 ="), ids(tok, " 4") + [2], ids(tok, " 5") + [2])
    assert (e.margin, e.label, e.where) == (0.0, 1.0, "t.jsonl:1")


def test_preference_implicit_prompt_strings(tok):
    implicit = preference_example(rec({"chosen": "Q: 2+2? A: four", "rejected": "Q: 2+2? A: five"}), tok, None)
    explicit = preference_example(rec({"prompt": "Q: 2+2? A:", "chosen": " four", "rejected": " five"}), tok, None)
    assert implicit == explicit
    assert implicit.chosen_ids == ids(tok, " four") + [2]
    # the shared prefix "The answer is fo" backs off to the word boundary: no word is split, and the space
    # before the answer goes with the answer (tests/test_inputs.py checks the token ids on HH-RLHF text)
    split = preference_example(rec({"chosen": "The answer is forty", "rejected": "The answer is four"}), tok, None)
    assert tok.decode(split.prompt_ids) == "The answer is"
    assert (tok.decode(split.chosen_ids), tok.decode(split.rejected_ids)) == (" forty<|im_end|>", " four<|im_end|>")


def test_preference_implicit_prompt_messages(tok):
    system = {"role": "system", "content": "Answer with a number."}
    for head in ([user("2+2?")], [system, user("2+2?")], [user("1+1?"), assistant("2"), user("2+2?")]):
        implicit = {"chosen": head + [assistant("4")], "rejected": head + [assistant("5")]}
        explicit = {"prompt": head, "chosen": [assistant("4")], "rejected": [assistant("5")]}
        assert preference_example(rec(implicit), tok, None) == preference_example(rec(explicit), tok, None)


def test_preference_conversational(tok):
    prompt = [user("2+2?")]
    e = preference_example(rec({"prompt": prompt, "chosen": [assistant("4")], "rejected": [assistant("five")]}), tok, None)
    assert tok.decode(e.prompt_ids) == tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert tok.decode(e.prompt_ids) == SYSTEM + "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(e.chosen_ids) == "4<|im_end|>\n"
    assert tok.decode(e.rejected_ids) == "five<|im_end|>\n"
    full = tok.apply_chat_template(prompt + [assistant("4")], tokenize=False)
    assert e.prompt_ids + e.chosen_ids == ids(tok, full)


def test_preference_margin_and_soft_label(tmp_path, tok):
    import datasets

    data = {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2.5, "label": 0.8}
    e = preference_example(rec(data), tok, None)
    assert (e.margin, e.label) == (2.5, 0.8)
    # CSV cells are strings; they are parsed as numbers
    (from_csv,) = load_records(write_csv(tmp_path / "p.csv", [data]))
    assert from_csv.data["margin"] == "2.5"
    e = preference_example(from_csv, tok, None)
    assert (e.margin, e.label) == (2.5, 0.8)
    # a row without margin/label in a dataset where other rows have them reads None (datasets, parquet) or ""
    # (CSV): that means "absent", so the defaults apply
    rows = [data, {"prompt": "p", "chosen": "a", "rejected": "b"}]
    for source in (datasets.Dataset.from_list(rows), write_csv(tmp_path / "q.csv", [data, {**rows[1], "margin": "", "label": ""}])):
        records = load_records(source)
        assert records[1].data["margin"] in (None, "")
        examples, _ = build_examples(records, preference_example, tok)
        assert [(x.margin, x.label) for x in examples] == [(2.5, 0.8), (0.0, 1.0)]


def test_ranked(tok):
    data = {"prompt": "Best fruit?", "responses": [" Apple.", " Pear.", " Plum."], "scores": [1, 0.5, -2]}
    e = ranked_example(rec(data), tok, None)
    assert e.prompt_ids == ids(tok, "Best fruit?")
    assert e.responses_ids == [ids(tok, r) + [2] for r in data["responses"]]
    assert e.scores == [1.0, 0.5, -2.0] and all(isinstance(s, float) for s in e.scores)


def test_unpaired_with_csv_booleans(tmp_path, tok):
    labels = ["true", "false", "True", "FALSE", "1", "0"]
    rows = [{"prompt": "Q?", "completion": f" answer {i}", "label": label} for i, label in enumerate(labels)]
    examples, _ = build_examples(load_records(write_csv(tmp_path / "u.csv", rows)), unpaired_example, tok)
    assert [e.desirable for e in examples] == [True, False, True, False, True, False]
    assert examples[3].prompt_ids == ids(tok, "Q?")
    assert examples[3].completion_ids == ids(tok, " answer 3") + [2]
    json_rows = [{"prompt": "Q?", "completion": "A", "label": flag} for flag in (True, False)]
    assert [e.desirable for e in build_examples(load_records(json_rows), unpaired_example, tok)[0]] == [True, False]


def test_prompt_only(tok):
    e = prompt_example(rec({"prompt": "Once upon a time", "reference": "42"}), tok, None)
    assert e.prompt_ids == ids(tok, "Once upon a time")
    assert (e.prompt, e.extra) == ("Once upon a time", {"reference": "42"})
    messages = [user("Tell me a story.")]
    e = prompt_example(rec({"prompt": messages}), tok, None)
    expected = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert e.prompt_ids == expected == encode_prompt(tok, messages)
    assert tok.decode(e.prompt_ids) == SYSTEM + "<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\n"


def test_conversation_as_prompt(tok):
    """SFT-shaped ``messages`` data serves as prompts: the turns up to the last user message are the prompt, the
    assistant answer after it the reference (a record's own ``reference`` wins)."""
    turns = [user("Hi."), assistant("Hello!"), user("Name a colour."), assistant("Blue.")]
    e = prompt_example(rec({"messages": turns, "id": 7}), tok, None)
    assert e.prompt == turns[:3] and e.prompt_ids == encode_prompt(tok, turns[:3])
    assert e.extra == {"id": 7, "reference": "Blue."}
    e = prompt_example(rec({"messages": turns[:3], "reference": "Red."}), tok, None)
    assert e.prompt == turns[:3] and e.extra == {"reference": "Red."}


# ------------------------------------------------------------------------------------------------ validation

_TWO_TURNS = [user("a"), assistant("b")]
INVALID = [  # (builder, record, message after "file:line: ", reason counted when skipped)
    (sft_example, {"completion": "x"}, "missing field 'prompt'", "missing field 'prompt'"),
    (sft_example, {"prompt": None, "completion": "x"}, "missing field 'prompt'", "missing field 'prompt'"),
    (sft_example, {"prompt": " \n", "completion": "x"}, "field 'prompt' is empty; expected non-empty text", "empty 'prompt'"),
    (sft_example, {"prompt": "a", "completion": []}, "field 'completion' is an empty list; expected messages",
     "empty 'completion'"),
    (sft_example, {"prompt": 3, "completion": "x"},
     "field 'prompt': expected a string or a list of messages, got int", "wrong type 'prompt'"),
    (sft_example, {"messages": [user("a"), {"role": "assistant"}]},
     "field 'messages[1]': expected a message {'role': str, 'content': str}, got {'role': 'assistant'}",
     "malformed message in 'messages'"),
    (sft_example, {"messages": [user("a"), {"role": "assistant", "content": 7}]},
     "field 'messages[1]': expected a message {'role': str, 'content': str}, got {'role': 'assistant', 'content': 7}",
     "malformed message in 'messages'"),
    (sft_example, {"messages": [user("a")]}, "no assistant message to train on", "no assistant turn"),
    (sft_example, {"text": _TWO_TURNS}, "field 'text': expected a string", "wrong type 'text'"),
    (preference_example, {"prompt": "p", "chosen": "a"}, "missing field 'rejected'", "missing field 'rejected'"),
    (preference_example, {"prompt": "p", "chosen": "a", "rejected": "b", "label": 1.5},
     "field 'label': expected a probability in [0, 1], got 1.5", "label range"),
    (preference_example, {"prompt": "p", "chosen": "a", "rejected": "b", "label": -0.1},
     "field 'label': expected a probability in [0, 1], got -0.1", "label range"),
    (preference_example, {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"},
     "field 'margin': expected a number, got 'big'", "wrong type 'margin'"),
    (preference_example, {"chosen": "yes", "rejected": "no"},
     "'chosen' and 'rejected' share no prompt prefix; add a 'prompt' field", "no shared prompt"),
    (preference_example, {"chosen": "Answer: ", "rejected": "Answer: yes"},  # chosen is all prefix
     "'chosen' and 'rejected' share no prompt prefix; add a 'prompt' field", "no shared prompt"),
    (preference_example, {"chosen": [user("a"), assistant("b")], "rejected": [user("c"), assistant("b")]},
     "'chosen' and 'rejected' share no leading messages; add a 'prompt' field", "no shared prompt"),
    # sharing only the system turn would leave each user turn in its completion, where it would be lost
    (preference_example,
     {"chosen": [{"role": "system", "content": "s"}, user("a"), assistant("b")],
      "rejected": [{"role": "system", "content": "s"}, user("c"), assistant("d")]},
     "'chosen' and 'rejected' differ before their first assistant message; add a 'prompt' field holding every "
     "turn before the answers", "no shared prompt"),
    (preference_example, {"prompt": "p", "chosen": _TWO_TURNS, "rejected": _TWO_TURNS},
     "'chosen' and 'rejected' are whole conversations, but their shared leading turns do not end with a user turn "
     "holding the 'prompt'; drop the prompt turns from them or fix 'prompt'", "prompt does not match conversation"),
    (preference_example, {"prompt": "p", "chosen": [assistant("b")], "rejected": [assistant("c")]},
     "prompt and completion must both be strings or both be message lists", "mixed text and messages"),
    (ranked_example, {"prompt": "p", "responses": ["a", "b"], "scores": [1]},
     "field 'scores': expected a list of 2 numbers (one per response)", "scores"),
    (ranked_example, {"prompt": "p", "responses": ["a"], "scores": [1]},
     "field 'responses': expected a list of at least 2 responses", "responses"),
    (ranked_example, {"prompt": "p", "responses": ["a", "b"], "scores": [1, "x"]},
     "field 'scores[1]': expected a number, got 'x'", "wrong type 'scores[1]'"),
    (ranked_example, {"prompt": "p", "responses": ["a", ""], "scores": [1, 2]},
     "field 'responses[1]' is empty; expected non-empty text", "empty 'responses[1]'"),
    (unpaired_example, {"prompt": "p", "completion": "c", "label": "maybe"},
     "field 'label': expected true or false, got 'maybe'", "wrong type 'label'"),
    (unpaired_example, {"prompt": "p", "completion": "c", "label": 2},
     "field 'label': expected true or false, got 2", "wrong type 'label'"),
    (unpaired_example, {"prompt": "p", "completion": "c"}, "missing field 'label'", "missing field 'label'"),
    (prompt_example, {"prompt": ""}, "field 'prompt' is empty; expected non-empty text", "empty 'prompt'"),
    (prompt_example, {"completion": "x"}, "missing field 'prompt' (or 'messages')", "missing field 'prompt'"),
    (prompt_example, {"messages": [assistant("b")]}, "field 'messages': no user message to take as the prompt",
     "no user message"),
    (prompt_example, {"prompt": [{"content": "hi"}]},
     "field 'prompt[0]': expected a message {'role': str, 'content': str}, got {'content': 'hi'}",
     "malformed message in 'prompt'"),
]


@pytest.mark.parametrize(("make", "data", "message", "reason"), INVALID, ids=[f"{m.__name__}-{r}" for m, _, _, r in INVALID])
def test_invalid_record_names_location_and_field(tmp_path, tok, make, data, message, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine", "completion": "fine"}, data])
    record = load_records(path)[1]
    with pytest.raises(DataError) as e:
        make(record, tok, None)
    assert str(e.value) == f"{path}:2: {message}"
    assert e.value.reason == reason


@pytest.mark.parametrize(
    ("make", "data"),
    [
        (sft_example, {"prompt": "one two three four", "completion": " five six"}),
        (sft_example, {"messages": [user("one two three"), assistant("four")]}),
        (preference_example, {"prompt": "one two three four", "chosen": " five", "rejected": " six seven eight"}),
        (ranked_example, {"prompt": "one two three", "responses": [" four", " five six seven"], "scores": [0, 1]}),
        (unpaired_example, {"prompt": "one two three four", "completion": " five six", "label": True}),
        (prompt_example, {"prompt": "one two three four five six seven"}),
    ],
)
def test_too_long_names_token_count_and_limit(tok, make, data):
    example = make(rec(data), tok, None)
    n = {
        sft_example: lambda e: len(e.input_ids),
        preference_example: lambda e: len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)),
        ranked_example: lambda e: len(e.prompt_ids) + max(map(len, e.responses_ids)),
        unpaired_example: lambda e: len(e.prompt_ids) + len(e.completion_ids),
        prompt_example: lambda e: len(e.prompt_ids),
    }[make](example)
    assert make(rec(data), tok, n) == example  # exactly max_length tokens is allowed
    with pytest.raises(DataError) as e:
        make(rec(data), tok, n - 1)
    assert str(e.value) == (
        f"t.jsonl:1: example is {n} tokens, longer than max_length={n - 1} (raise --max-length or pass --skip-invalid)"
    )
    assert e.value.reason == "longer than max_length"


def test_file_level_errors(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"^" + str(path) + r":2: malformed JSON \(.+ at column \d+\)$"):
        load_records(path)
    broken_json = tmp_path / "broken.json"
    broken_json.write_text('[\n{"prompt": "a"},\n{"prompt" "b"}\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"^" + str(broken_json) + r":3: malformed JSON \("):
        load_records(broken_json)
    not_objects = write_jsonl(tmp_path / "lists.jsonl", [{"prompt": "a"}, ["a", "b"]])
    with pytest.raises(DataError) as e:
        load_records(not_objects)
    assert str(e.value) == f"{not_objects}:2: expected a JSON object, got list"
    scalar = tmp_path / "scalar.json"
    scalar.write_text('{"rows": []}', encoding="utf-8")
    with pytest.raises(DataError, match=r"^" + str(scalar) + r": expected a JSON list of objects"):
        load_records(scalar)
    text = tmp_path / "d.txt"
    text.write_text("hello", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_records(text)
    assert str(e.value) == f"{text}: unsupported file type '.txt'; expected .jsonl, .json, .parquet, .csv or a directory"
    with pytest.raises(DataError) as e:
        load_records(tmp_path / "missing.jsonl")
    assert str(e.value) == f"{tmp_path / 'missing.jsonl'}: no such file or directory"
    with pytest.raises(ValueError, match="unknown bundled dataset 'nope'"):
        load_records("bundled:nope")


def test_skip_counts_reasons_and_keeps_the_good_examples(tmp_path, tok, capsys):
    rows = [
        {"prompt": "good one", "completion": " yes"},
        {"prompt": "", "completion": "x"},
        {"completion": "x"},
        {"prompt": "good two", "completion": " yes"},
        {"prompt": "x", "completion": 5},
        {"prompt": "", "completion": "y"},
        {"prompt": "far too long " * 20, "completion": " x"},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataError, match=r":2: field 'prompt' is empty"):  # raise stops at the first bad record
        build_examples(load_records(path), sft_example, tok, max_length=32)
    examples, skipped = build_examples(load_records(path), sft_example, tok, max_length=32, on_error="skip")
    assert [e.where for e in examples] == [f"{path}:1", f"{path}:4"]
    prompt, completion = ids(tok, "good one"), ids(tok, " yes") + [2]
    assert examples[0] == SFTExample(prompt + completion, [IGNORE] * len(prompt) + completion, f"{path}:1")
    assert skipped == Counter(
        {"empty 'prompt'": 2, "missing field 'prompt'": 1, "wrong type 'completion'": 1, "longer than max_length": 1}
    )
    # the CLI-facing wrapper reports the same counts on stderr
    assert len(read_examples(path, sft_example, tok, 32, skip_invalid=True)) == 2
    assert capsys.readouterr().err == (
        f"alignkit: {path}: skipped 5 invalid records (2 empty 'prompt', 1 missing field 'prompt', "
        "1 wrong type 'completion', 1 longer than max_length)\n"
    )


def test_no_valid_examples_raises(tmp_path, tok):
    bad = load_records([{"prompt": ""}, {"completion": "x"}])
    with pytest.raises(DataError) as e:
        build_examples(bad, sft_example, tok, on_error="skip")
    assert str(e.value) == "no valid examples (skipped: {\"empty 'prompt'\": 1, \"missing field 'prompt'\": 1})"
    with pytest.raises(DataError) as e:
        build_examples([], sft_example, tok)
    assert str(e.value) == "no valid examples (no records)"
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip'"):
        build_examples(bad, sft_example, tok, on_error="ignore")


# ------------------------------------------------------------------------------------------------- collation


def test_pad_sft():
    batch = pad_sft([SFTExample([5, 6, 7], [IGNORE, 6, 7]), SFTExample([8, 9], [IGNORE, 9])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, 9, IGNORE]]
    assert all(t.dtype == torch.long for t in batch.values())


def _example(n: int, start: int) -> SFTExample:
    tokens = list(range(start, start + n))
    return SFTExample(tokens, [IGNORE] + tokens[1:], where=f"x:{start}")


def test_pack_sft_first_fit_decreasing():
    """Lengths 5,3,4,2,6,1 into rows of 8, longest first: 6 -> new row A (room 2); 5 -> new row B (3);
    4 -> new row C (4); 3 -> B (0); 2 -> A (0); 1 -> C (3). Each row lists its examples in input order."""
    examples = [_example(n, 100 * i) for i, n in enumerate([5, 3, 4, 2, 6, 1])]
    rows = pack_sft(examples, max_length=8)
    assert [[examples.index(e) for e in row] for row in rows] == [[3, 4], [0, 1], [2, 5]]
    with pytest.raises(ValueError, match=r"^x:400: example of 6 tokens does not fit a packed row of 4$"):
        pack_sft(examples, max_length=4)


def test_pack_sft_never_overflows_and_keeps_every_example_once():
    generator = torch.Generator().manual_seed(0)
    for max_length in (16, 37, 64):
        lengths = torch.randint(1, max_length + 1, (60,), generator=generator).tolist()
        examples = [_example(n, 1000 * i) for i, n in enumerate(lengths)]
        rows = pack_sft(examples, max_length)
        assert all(sum(len(e.input_ids) for e in row) <= max_length for row in rows)
        packed = [id(e) for row in rows for e in row]
        assert sorted(packed) == sorted(id(e) for e in examples)  # every example exactly once
        assert len(rows) < len(examples)  # packing did pack


def test_collate_packed_positions_and_labels():
    a = SFTExample([11, 12, 13], [IGNORE, 12, 13])
    b = SFTExample([21, 22], [21, 22])  # a fully trained example: its first label still has to go
    c = SFTExample([31, 32, 33, 34], [31, IGNORE, 33, 34])
    batch = collate_packed([[a, b], [c]], pad_id=0)
    assert set(batch) == {"input_ids", "position_ids", "labels"}  # no attention_mask: see collate.py
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22], [31, 32, 33, 34, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 12, 13, IGNORE, 22], [IGNORE, IGNORE, 33, 34, IGNORE]]


def _sft_examples(tok) -> list[SFTExample]:
    records = load_records("bundled:instructions_train")[:5] + load_records(
        [
            {"prompt": "Say hi.", "completion": " Hi!"},
            {"text": "A short plain text example for packing."},
            {"prompt": [user("2+2?")], "completion": [assistant("4")]},
        ]
    )
    return build_examples(records, sft_example, tok)[0]


def _alone(model, example: SFTExample) -> torch.Tensor:
    input_ids = torch.tensor([example.input_ids])
    return token_logprobs(model, input_ids, torch.ones_like(input_ids))[0]


@torch.no_grad()
def test_packed_rows_do_not_cross_contaminate(tok, tiny):
    """Every token of every packed example gets the log-prob it gets alone, unpadded; only the first token of
    each example differs (alone it has no context), and collate_packed never trains on it."""
    examples = _sft_examples(tok)
    rows = pack_sft(examples, max_length=160)
    batch = collate_packed(rows, pad_id=tok.pad_token_id)
    lengths = [sum(len(e.input_ids) for e in row) for row in rows]
    assert len(rows) >= 2 and min(lengths) < batch["input_ids"].shape[1]  # several rows, one with trailing pad
    assert any(len(row) >= 3 for row in rows)
    everything = torch.ones_like(batch["input_ids"])
    packed = token_logprobs(tiny, batch["input_ids"], everything, position_ids=batch["position_ids"])
    by_labels = token_logprobs(tiny, batch["input_ids"], batch["labels"] != IGNORE, position_ids=batch["position_ids"])
    for r, row in enumerate(rows):
        start = 0
        for e in row:
            n = len(e.input_ids)
            alone = _alone(tiny, e)
            torch.testing.assert_close(packed[r, start + 1 : start + n], alone[1:], atol=1e-5, rtol=0)
            trained = torch.tensor(e.labels[1:]) != IGNORE
            expected = torch.where(trained, alone[1:], torch.zeros(()))
            torch.testing.assert_close(by_labels[r, start + 1 : start + n], expected, atol=1e-5, rtol=0)
            assert by_labels[r, start] == 0.0
            start += n


@torch.no_grad()
def test_packed_row_with_trailing_padding_and_the_control(tok, tiny):
    a, b = _sft_examples(tok)[5:7]
    batch = collate_packed([[a, b]], pad_id=tok.pad_token_id)
    padded = collate_packed([[a, b], [a, b, a]], pad_id=tok.pad_token_id)  # row 0 now ends in padding
    n, m = len(a.input_ids), len(b.input_ids)
    assert padded["input_ids"].shape[1] == 2 * n + m and padded["position_ids"][0, n + m :].tolist() == list(range(n))
    for inputs in (batch, padded):
        everything = torch.ones_like(inputs["input_ids"])
        lp = token_logprobs(tiny, inputs["input_ids"], everything, position_ids=inputs["position_ids"])
        torch.testing.assert_close(lp[0, 1:n], _alone(tiny, a)[1:], atol=1e-5, rtol=0)
        torch.testing.assert_close(lp[0, n + 1 : n + m], _alone(tiny, b)[1:], atol=1e-5, rtol=0)
    # control: without the restarting position_ids the model sees one long sequence, and b's log-probs move,
    # so the equalities above are not vacuous
    ids_ = batch["input_ids"]
    plain = token_logprobs(tiny, ids_, torch.ones_like(ids_))
    assert (plain[0, n + 1 : n + m] - _alone(tiny, b)[1:]).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------- log-probs


def _reference(model, input_ids, mask, attention_mask=None, temperature=1.0):
    """log_softmax over the full vocabulary, gathered at the next token: the definition, computed naively."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float() / temperature  # (B, L, V)
    logp = torch.log_softmax(logits, dim=-1)
    expected = torch.zeros(input_ids.shape)
    entropy = torch.zeros(input_ids.shape)
    for b, t in zip(*torch.nonzero(mask, as_tuple=True), strict=True):
        if t == 0:
            continue  # nothing predicts the first token
        expected[b, t] = logp[b, t - 1, input_ids[b, t]]
        entropy[b, t] = -(logp[b, t - 1].exp() * logp[b, t - 1]).sum()
    return expected, entropy


@torch.no_grad()
def test_token_logprobs_matches_full_log_softmax(tiny, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 49152, (2, 12), generator=generator)
    mask = torch.rand(2, 12, generator=generator) < 0.6
    mask[:, 0] = True  # asked for, but position 0 is never a target
    assert mask.sum() >= 10 and (~mask).sum() >= 3
    expected, entropy = _reference(tiny, input_ids, mask)
    got = token_logprobs(tiny, input_ids, mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got[~mask] == 0).all() and (got[:, 0] == 0).all() and (got[mask & (torch.arange(12) > 0)] < 0).all()

    expected_t, entropy_t = _reference(tiny, input_ids, mask, temperature=0.7)
    got_t, got_entropy = token_logprobs(tiny, input_ids, mask, temperature=0.7, with_entropy=True)
    torch.testing.assert_close(got_t, expected_t, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_entropy, entropy_t, atol=1e-4, rtol=0)
    assert (got_t - got).abs().max() > 1e-2  # temperature changed the answer
    _, got_entropy_1 = token_logprobs(tiny, input_ids, mask, with_entropy=True)
    torch.testing.assert_close(got_entropy_1, entropy, atol=1e-4, rtol=0)

    # the head runs in chunks; tiny chunks (3 tokens, with a remainder) give the same numbers
    monkeypatch.setattr(alignkit.logprobs, "CHUNK_TOKENS", 3)
    torch.testing.assert_close(token_logprobs(tiny, input_ids, mask), got, atol=1e-6, rtol=0)


@torch.no_grad()
def test_token_logprobs_with_right_padding_and_no_targets(tiny):
    input_ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 2, 2]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    mask = attention_mask.bool()
    expected, _ = _reference(tiny, input_ids, mask, attention_mask)
    got = token_logprobs(tiny, input_ids, mask, attention_mask=attention_mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # row 1 alone, unpadded, agrees with its padded version
    torch.testing.assert_close(got[1, :3], _alone(tiny, SFTExample([10, 11, 12], [10, 11, 12])), atol=1e-5, rtol=0)
    none = token_logprobs(tiny, input_ids, torch.zeros_like(mask), with_entropy=True)
    assert all((t == 0).all() and t.shape == (2, 5) for t in none)
