"""Batches: right-padded tensors, packed rows of several short examples, or padding-free prompt groups.

Packed rows carry ``position_ids`` that restart at 0 for every example and no ``attention_mask``; transformers
then builds a block-diagonal causal mask, so packed examples never attend to each other.
"""

from __future__ import annotations

import heapq

import torch

from alignkit.data.examples import IGNORE, SFTExample

# Attention over a block-masked packed row costs SDPA every (query, key) pair of the row, each pair ~2x its FLOPs
# in position-equivalents (SmolLM2-135M, 1 thread: 6.8e-4 positions per pair where the FLOP ratio gives 3.2e-4).
ATTENTION_EFFICIENCY = 2.1


def attention_pair_cost(config) -> float:
    """What block-masked attention costs per (query, key) pair of a packed row, in positions through the layers'
    projections: ATTENTION_EFFICIENCY x (4 x heads x head_dim) / the projections' 2 x weights per position, from a
    transformers config (a llama-style MLP of three matrices; GPT-2-style configs fall back to 4x hidden)."""
    width = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or width // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    inner = getattr(config, "intermediate_size", None) or 4 * width
    per_position = 2 * (2 * width * heads * head_dim + 2 * width * kv * head_dim + 3 * width * inner)
    return ATTENTION_EFFICIENCY * 4 * heads * head_dim / per_position


class _SmolLM2:  # the bundled model's shapes: the default for callers without a model at hand
    hidden_size, intermediate_size, num_attention_heads, num_key_value_heads = 576, 1536, 9, 3


PAIR_COST = attention_pair_cost(_SmolLM2)


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


def collate_padding_free(examples: list[SFTExample], pad_id: int, pair_cost: float = PAIR_COST) -> dict[str, torch.Tensor]:
    """A micro-batch's examples without padding: spread over the rows ``plan_rows`` finds cheapest, laid out as
    ``collate_packed`` (positions restart per example, so each attends only to itself); same examples, same targets
    as ``pad_sft``, fewer positions."""
    rows, _ = plan_rows([len(e.input_ids) for e in examples], pair_cost)
    return collate_packed([[examples[i] for i in sorted(row)] for row in rows], pad_id)


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


def plan_rows(sizes: list[int], pair_cost: float = PAIR_COST) -> tuple[list[list[int]], int]:
    """Units of ``sizes`` tokens spread over the number of rows k that minimises a pass's estimated cost,
    k·L·(1 + pair_cost·L): k·L positions through the projections, plus the L² (query, key) pairs of each row that
    block-masked attention computes (``attention_pair_cost``). For each k the units go largest first onto the
    least-filled row, so rows end nearly equal, and L is the longest row. Few long rows waste attention, many
    short ones padding. Returns each row's units (at least one each) and L."""
    if not sizes:
        return [[]], 0
    order = sorted(range(len(sizes)), key=lambda g: -sizes[g])
    longest = sizes[order[0]]
    best: tuple[float, list[list[int]], int] | None = None
    for k in range(1, len(sizes) + 1):
        if best is not None and k * longest * (1 + pair_cost * longest) >= best[0]:
            break  # no row is shorter than the longest unit: every larger k costs more
        fill = [(0, r) for r in range(k)]  # (tokens, row): the least-filled row first, ties to the lower row
        rows: list[list[int]] = [[] for _ in range(k)]
        for g in order:
            tokens, r = heapq.heappop(fill)
            rows[r].append(g)
            heapq.heappush(fill, (tokens + sizes[g], r))
        length = max(tokens for tokens, _ in fill)
        cost = k * length * (1 + pair_cost * length)
        if best is None or cost < best[0]:
            best = (cost, rows, length)
    return best[1], best[2]


def pack_prompt_groups(
    groups: list[tuple[list[int], list[list[int]]]], pad_id: int, share_prompt: bool = True,
    pair_cost: float = PAIR_COST,
) -> dict[str, torch.Tensor]:
    """Padding-free rows for ``groups`` of (prompt, responses); responses are numbered group by group.

    With ``share_prompt`` a prompt appears once, followed by all its responses; without, every response gets its own
    copy of the prompt (plain sequence packing). The groups fill the rows ``plan_rows`` finds cheapest for the model's
    ``pair_cost`` (``attention_pair_cost(config)``), so rows are nearly equal and padding is small. A (R, 1, L, L)
    boolean mask lets each token see the earlier tokens of its own response and of its prompt, nothing else, and
    each response's position ids continue from its prompt: every response is computed exactly as if it were alone
    after its prompt.

    Returns input_ids, position_ids (R, L); attention_mask (R, 1, L, L) bool; ``last`` (N,): the flat index into
    the (R·L) positions of each response's last token; for the LM head, per response token that has a predictor
    (T,): ``target_index`` (its flat position), ``source_index`` (the flat position whose hidden state predicts it:
    the previous token, or the prompt's last token for a response's first token) and ``response_index``; and
    ``lengths`` (N,): each response's length (as the padded layout's target mask counts it)."""
    if not share_prompt:  # one group per (prompt, response), numbered in the same order
        groups = [(prompt, [response]) for prompt, responses in groups for response in responses]
    sizes = [len(prompt) + sum(map(len, responses)) for prompt, responses in groups]
    rows, length = plan_rows(sizes, pair_cost)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    unit = torch.full((len(rows), length), -1, dtype=torch.long)  # group of each position; -1: padding
    segment = torch.zeros((len(rows), length), dtype=torch.long)  # 0: prompt, k + 1: response k
    first = [0] + torch.tensor([len(responses) for _, responses in groups]).cumsum(0).tolist()
    last = torch.empty(first[-1], dtype=torch.long)
    lengths = torch.zeros(first[-1], dtype=torch.long)
    target, source, response_of = [], [], []
    for r, row in enumerate(rows):
        start = 0
        for g in row:
            prompt, responses = groups[g]
            input_ids[r, start : start + len(prompt)] = torch.tensor(prompt, dtype=torch.long)
            position_ids[r, start : start + len(prompt)] = torch.arange(len(prompt))
            unit[r, start : start + sizes[g]] = g
            prompt_last = r * length + start + len(prompt) - 1  # flat; predicts each response's first token
            start += len(prompt)
            for k, response in enumerate(responses):
                n = len(response)
                input_ids[r, start : start + n] = torch.tensor(response, dtype=torch.long)
                position_ids[r, start : start + n] = torch.arange(len(prompt), len(prompt) + n)
                segment[r, start : start + n] = k + 1
                flat = r * length + start
                last[first[g] + k] = flat + n - 1
                # nothing predicts a response's first token when the prompt is empty (as position 0 when padded)
                skip = 0 if prompt else 1
                target.append(torch.arange(flat + skip, flat + n))
                source.append(torch.cat([torch.tensor([prompt_last]), torch.arange(flat, flat + n - 1)])[skip:n])
                response_of.append(torch.full((n - skip,), first[g] + k))
                lengths[first[g] + k] = n
                start += n
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same_unit = unit[:, :, None] == unit[:, None, :]  # (R, L, L): query i, key j
    visible = (segment[:, None, :] == 0) | (segment[:, :, None] == segment[:, None, :])
    attention_mask = (same_unit & visible & causal)[:, None]  # padding sees earlier padding: no empty row
    empty = torch.zeros(0, dtype=torch.long)
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask, "last": last,
            "target_index": torch.cat(target) if target else empty, "source_index": torch.cat(source) if source else empty,
            "response_index": torch.cat(response_of) if response_of else empty, "lengths": lengths}
