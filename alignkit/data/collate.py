"""Batches: right-padded tensors, or packed rows of several short examples.

Packed rows carry ``position_ids`` that restart at 0 for every example and no ``attention_mask``; transformers
then builds a block-diagonal causal mask, so packed examples never attend to each other.
"""

from __future__ import annotations

import torch

from alignkit.data.examples import IGNORE, SFTExample


def pad_sft(examples: list[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """(B, L) input_ids / attention_mask / labels, right-padded to the longest example."""
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack_sft(examples: list[SFTExample], max_length: int) -> list[list[SFTExample]]:
    """Group examples into rows of at most ``max_length`` tokens (first-fit decreasing; order is deterministic)."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        if n > max_length:
            raise ValueError(f"{examples[i].where}: example of {n} tokens does not fit a packed row of {max_length}")
        slot = next((r for r, free in enumerate(room) if free >= n), None)
        if slot is None:
            rows.append([i])
            room.append(max_length - n)
        else:
            rows[slot].append(i)
            room[slot] -= n
    return [[examples[i] for i in sorted(row)] for row in rows]


def collate_packed(rows: list[list[SFTExample]], pad_id: int) -> dict[str, torch.Tensor]:
    """(B, L) input_ids / position_ids / labels for packed rows; no attention_mask (see module docstring)."""
    length = max(sum(len(e.input_ids) for e in row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for e in row:
            n = len(e.input_ids)
            input_ids[r, start : start + n] = torch.tensor(e.input_ids)
            labels[r, start : start + n] = torch.tensor(e.labels)
            labels[r, start] = IGNORE  # nothing predicts the first token of an example from the previous one
            position_ids[r, start : start + n] = torch.arange(n)
            start += n
        # trailing padding is its own "sequence" (positions restart), so it attends only to itself
        position_ids[r, start:] = torch.arange(length - start)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def pad_prompt_completions(
    rows: list[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt ids, completion ids) rows -> right-padded (N, L) input_ids, attention_mask, and target_mask
    (True on completion tokens): the batch layout of every preference-style trainer."""
    length = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    target_mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, (prompt, completion) in enumerate(rows):
        n = len(prompt) + len(completion)
        input_ids[i, :n] = torch.tensor(prompt + completion)
        attention_mask[i, :n] = 1
        target_mask[i, len(prompt) : n] = True
    return input_ids, attention_mask, target_mask
