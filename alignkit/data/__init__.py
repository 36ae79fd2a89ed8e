"""Data: read records, validate and tokenise them into examples, collate them into batches."""

from alignkit.data.collate import pack_sft, pad_sft
from alignkit.data.examples import (
    IGNORE,
    PreferenceExample,
    PromptExample,
    RankedExample,
    SFTExample,
    UnpairedExample,
    build_examples,
    encode_prompt,
    encode_prompt_completion,
    preference_example,
    prompt_example,
    ranked_example,
    read_examples,
    sft_example,
    split_conversation,
    unpaired_example,
)
from alignkit.data.records import DataError, Record, load_records

__all__ = [
    "IGNORE", "DataError", "PreferenceExample", "PromptExample", "RankedExample", "Record", "SFTExample",
    "UnpairedExample", "build_examples", "encode_prompt", "encode_prompt_completion", "load_records", "pack_sft",
    "pad_sft", "preference_example", "prompt_example", "ranked_example", "read_examples", "sft_example", "split_conversation",
    "unpaired_example",
]
