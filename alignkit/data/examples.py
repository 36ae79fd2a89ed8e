"""Record shapes -> validated, tokenised examples.

Accepted shapes (the ones TRL users already have):

- SFT: ``{"prompt", "completion"}`` (strings or message lists), ``{"messages": [...]}`` (all assistant turns
  are trained), or ``{"text"}`` (every token trained).
- Preference: ``{"prompt", "chosen", "rejected"}``; implicit prompt ``{"chosen", "rejected"}`` where both are
  full transcripts and their shared prefix is the prompt; strings or message lists; a prompt with whole
  conversations as chosen/rejected that begin with it (UltraFeedback-binarized). Optional ``margin``
  (float) and ``label`` (probability that chosen is preferred: soft labels from an AI labeler).
- Ranked: ``{"prompt", "responses": [...], "scores": [...]}`` with at least two responses.
- Unpaired: ``{"prompt", "completion", "label": bool}`` (KTO).
- Prompt-only: ``{"prompt"}`` (online RL), optional ``reference`` answer; or ``{"messages"}``, prompted up to
  its last user turn (the assistant's answer after it becomes the ``reference``).

Nothing is truncated or dropped silently: an invalid record raises ``DataError`` naming file, line, field and
what was expected, unless ``on_error="skip"``, in which case it is counted in the returned report.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from alignkit.data.records import DataError, Record

Text = str | list  # a plain string, or a list of {"role", "content"} messages


@dataclass
class SFTExample:
    input_ids: list[int]
    labels: list[int]  # -100 where no loss is taken (prompt tokens)
    where: str = ""


@dataclass
class PreferenceExample:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float = 0.0
    label: float = 1.0  # probability that chosen is preferred (1.0 = hard label)
    where: str = ""


@dataclass
class RankedExample:
    prompt_ids: list[int]
    responses_ids: list[list[int]]
    scores: list[float]
    where: str = ""


@dataclass
class UnpairedExample:
    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    where: str = ""


@dataclass
class PromptExample:
    prompt_ids: list[int]
    prompt: Text
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. a reference answer for exact-match rewards
    where: str = ""


IGNORE = -100


# ----------------------------------------------------------------------------------------------- validation


def _field(record: Record, name: str, kind: str = "text") -> Any:
    if name not in record.data or record.data[name] is None:
        raise DataError(f"{record.where}: missing field {name!r}", reason=f"missing field {name!r}")
    value = record.data[name]
    if kind == "text":
        _check_text(value, record.where, name)
    return value


def _check_text(value: Any, where: str, name: str) -> None:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field {name!r} is empty; expected non-empty text", reason=f"empty {name!r}")
        return
    if isinstance(value, list) and value:
        for i, message in enumerate(value):
            ok = isinstance(message, dict) and isinstance(message.get("role"), str)
            if not ok or not isinstance(message.get("content"), str):
                raise DataError(
                    f"{where}: field '{name}[{i}]': expected a message {{'role': str, 'content': str}}, got {message!r:.60}",
                    reason=f"malformed message in {name!r}",
                )
        return
    if isinstance(value, list):
        raise DataError(f"{where}: field {name!r} is an empty list; expected messages", reason=f"empty {name!r}")
    raise DataError(
        f"{where}: field {name!r}: expected a string or a list of messages, got {type(value).__name__}",
        reason=f"wrong type {name!r}",
    )


def _number(record: Record, name: str, default: float | None = None) -> float:
    value = record.data.get(name)
    if value is None or value == "":  # absent here but a column of other rows (datasets/parquet None, CSV "")
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, str):
            try:
                return float(value)  # CSV cells arrive as strings
            except ValueError:
                pass
        raise DataError(f"{record.where}: field {name!r}: expected a number, got {value!r:.40}", reason=f"wrong type {name!r}")
    return float(value)


# ------------------------------------------------------------------------------------------------ tokenising


def _render_segments(tokenizer, prompt: Text, completion: Text | None) -> list[tuple[str, bool]]:
    """Split a prompt (+ completion) into text segments flagged trainable or not.

    Message lists go through the tokenizer's chat template; each assistant turn of the completion (or of a
    ``messages`` conversation) is its own trainable segment, located by rendering the conversation prefix by
    prefix (each partial rendering must be a prefix of the full one)."""
    if isinstance(prompt, str) and (completion is None or isinstance(completion, str)):
        return [(prompt, False)] + ([(completion, True)] if completion is not None else [])
    if isinstance(prompt, str) or (completion is not None and isinstance(completion, str)):
        raise DataError("prompt and completion must both be strings or both be message lists", reason="mixed text and messages")
    messages = prompt + (completion or [])
    first_trained = len(prompt) if completion is not None else 0

    def render(upto: int, add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=add_generation_prompt)

    if completion is None:  # a bare prompt for generation
        return [(render(len(messages), True), False)]
    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < first_trained:
            continue
        before, after = render(i, True), render(i + 1, False)
        if not (before.startswith(done) and after.startswith(before)):
            raise DataError("chat template output is not prefix-stable; cannot locate assistant turns", reason="template")
        segments += [(before[len(done) :], False), (after[len(before) :], True)]
        done = after
    if not segments:
        raise DataError("no assistant message to train on", reason="no assistant turn")
    full = render(len(messages), False)
    if len(full) > len(done):  # text a template adds after the last turn is context, not a target
        segments.append((full[len(done) :], False))
    return segments


def _encode_segments(tokenizer, segments: list[tuple[str, bool]], add_eos: bool) -> tuple[list[int], list[int]]:
    input_ids: list[int] = []
    labels: list[int] = []
    for i, (text, trained) in enumerate(segments):
        if not text:
            continue
        # the tokenizer's own special tokens (a BOS) go in front of plain text only; templates render their own
        ids = tokenizer(text, add_special_tokens=(i == 0 and add_eos))["input_ids"]
        input_ids += ids
        labels += ids if trained else [IGNORE] * len(ids)
    if add_eos and tokenizer.eos_token_id is not None and input_ids[-1] != tokenizer.eos_token_id:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id if segments[-1][1] else IGNORE)
    return input_ids, labels


def encode_prompt_completion(tokenizer, prompt: Text, completion: Text) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids): the completion ends with EOS (plain text) or the template's end of turn."""
    segments = _render_segments(tokenizer, prompt, completion)
    input_ids, labels = _encode_segments(tokenizer, segments, add_eos=isinstance(prompt, str))
    split = next(i for i, label in enumerate(labels) if label != IGNORE)
    return input_ids[:split], input_ids[split:]


def encode_prompt(tokenizer, prompt: Text) -> list[int]:
    """Token ids of a prompt as the model sees it at generation time (chat template + generation prompt)."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    return tokenizer(_render_segments(tokenizer, prompt, None)[0][0], add_special_tokens=False)["input_ids"]


def split_implicit_prompt(chosen: Text, rejected: Text, where: str) -> tuple[Text, Text, Text]:
    """Shared prefix of two full transcripts = the prompt (message-wise for conversations). For strings the
    prompt ends at a word boundary, before the whitespace that separates it from the answers."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise DataError(f"{where}: 'chosen' and 'rejected' share no leading messages; add a 'prompt' field", reason="no shared prompt")
        return chosen[:n], chosen[n:], rejected[n:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = len(os.path.commonprefix([chosen, rejected]))
        # back off to a whitespace boundary so no word is split between prompt and answer ...
        while n > 0 and not chosen[n - 1].isspace():
            n -= 1
        # ... and give the separating whitespace to the answers ("...Assistant:" | " I think"), as TRL's
        # extract_prompt does: byte-level BPE merges a space into the word after it, so only this split makes
        # prompt_ids + chosen_ids the tokenisation of the whole transcript (and the answer's first token is
        # the one the model produces after "Assistant:" at inference, not a word that never follows a space)
        while n > 0 and chosen[n - 1].isspace():
            n -= 1
        if n == 0 or not chosen[n:].strip() or not rejected[n:].strip():
            raise DataError(f"{where}: 'chosen' and 'rejected' share no prompt prefix; add a 'prompt' field", reason="no shared prompt")
        return chosen[:n], chosen[n:], rejected[n:]
    raise DataError(f"{where}: 'chosen' and 'rejected' must both be strings or both message lists", reason="mixed text and messages")


def split_prompt_turns(prompt: Text, chosen: Text, rejected: Text, where: str) -> tuple[Text, Text, Text]:
    """Completions that are whole conversations beginning with the prompt's turns (the UltraFeedback-binarized
    shape of the alignment handbook: ``prompt`` a string, ``chosen``/``rejected`` = [{user: prompt},
    {assistant: ...}]): their shared leading turns become the prompt, the rest the completions. The shared turns
    must end with the prompt (a string prompt: a user turn with that content; a message list: those messages);
    anything else is an error, never a duplicated or dropped turn. Other shapes pass through unchanged."""
    lists = isinstance(chosen, list) and isinstance(rejected, list) and chosen and rejected
    if not lists or not all(isinstance(m, dict) for m in chosen + rejected):
        return prompt, chosen, rejected  # not conversations (or malformed ones, which the caller reports)
    if chosen[0].get("role") == "assistant" and rejected[0].get("role") == "assistant":
        return prompt, chosen, rejected  # completions proper: the prompt holds every earlier turn
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not isinstance(turns, list) or not turns:
        return prompt, chosen, rejected  # an invalid prompt: the caller reports it
    expected = "a user turn holding the 'prompt'" if isinstance(prompt, str) else "the 'prompt' messages"
    try:
        head, chosen_tail, rejected_tail = split_implicit_prompt(chosen, rejected, where)
    except DataError:
        head, chosen_tail, rejected_tail = [], chosen, rejected

    def same(a: dict, b: dict) -> bool:  # whitespace at the ends of a turn is not a different prompt
        return a.get("role") == b.get("role") and str(a.get("content", "")).strip() == str(b.get("content", "")).strip()

    matches = len(head) >= len(turns) and \
        all(isinstance(t, dict) and same(a, t) for a, t in zip(head[len(head) - len(turns) :], turns))
    if not matches:
        raise DataError(
            f"{where}: 'chosen' and 'rejected' are whole conversations, but their shared leading turns do not end "
            f"with {expected}; drop the prompt turns from them or fix 'prompt'",
            reason="prompt does not match conversation",
        )
    return head, chosen_tail, rejected_tail


# --------------------------------------------------------------------------------------------- the builders


def _check_length(where: str, n_tokens: int, max_length: int | None) -> None:
    if max_length is not None and n_tokens > max_length:
        raise DataError(
            f"{where}: example is {n_tokens} tokens, longer than max_length={max_length} "
            "(raise --max-length or pass --skip-invalid)",
            reason="longer than max_length",
        )


def sft_example(record: Record, tokenizer, max_length: int | None) -> SFTExample:
    data = record.data
    if "messages" in data:
        segments = _with_where(record, _render_segments, tokenizer, [], _field(record, "messages"))
        input_ids, labels = _encode_segments(tokenizer, segments, add_eos=False)
    elif "text" in data and "prompt" not in data:
        text = _field(record, "text")
        if not isinstance(text, str):
            raise DataError(f"{record.where}: field 'text': expected a string", reason="wrong type 'text'")
        input_ids, labels = _encode_segments(tokenizer, [(text, True)], add_eos=True)
    else:
        prompt, completion = _field(record, "prompt"), _field(record, "completion")
        prompt_ids, completion_ids = _with_where(record, encode_prompt_completion, tokenizer, prompt, completion)
        input_ids, labels = prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids
    _check_length(record.where, len(input_ids), max_length)
    return SFTExample(input_ids, labels, record.where)


def preference_example(record: Record, tokenizer, max_length: int | None) -> PreferenceExample:
    chosen, rejected = _field(record, "chosen"), _field(record, "rejected")
    if "prompt" in record.data:
        prompt, chosen, rejected = split_prompt_turns(_field(record, "prompt"), chosen, rejected, record.where)
    else:
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected, record.where)
    prompt_ids, chosen_ids = _with_where(record, encode_prompt_completion, tokenizer, prompt, chosen)
    rejected_prompt_ids, rejected_ids = _with_where(record, encode_prompt_completion, tokenizer, prompt, rejected)
    if rejected_prompt_ids != prompt_ids:  # a non-assistant turn in a completion would be silently dropped
        raise DataError(
            f"{record.where}: 'chosen' and 'rejected' differ before their first assistant message; "
            "add a 'prompt' field holding every turn before the answers",
            reason="no shared prompt",
        )
    _check_length(record.where, len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)), max_length)
    label = _number(record, "label", 1.0)
    if not 0.0 <= label <= 1.0:
        raise DataError(f"{record.where}: field 'label': expected a probability in [0, 1], got {label}", reason="label range")
    return PreferenceExample(prompt_ids, chosen_ids, rejected_ids, _number(record, "margin", 0.0), label, record.where)


def ranked_example(record: Record, tokenizer, max_length: int | None) -> RankedExample:
    prompt = _field(record, "prompt")
    responses, scores = _field(record, "responses", kind="list"), _field(record, "scores", kind="list")
    if not isinstance(responses, list) or len(responses) < 2:
        raise DataError(f"{record.where}: field 'responses': expected a list of at least 2 responses", reason="responses")
    if not isinstance(scores, list) or len(scores) != len(responses):
        raise DataError(
            f"{record.where}: field 'scores': expected a list of {len(responses)} numbers (one per response)", reason="scores"
        )
    for i, response in enumerate(responses):
        _check_text(response, record.where, f"responses[{i}]")
    numbers = [_number(Record({f"scores[{i}]": s}, record.where), f"scores[{i}]") for i, s in enumerate(scores)]
    encoded = [_with_where(record, encode_prompt_completion, tokenizer, prompt, r) for r in responses]
    prompt_ids = encoded[0][0]
    if any(p != prompt_ids for p, _ in encoded):  # a non-assistant turn in a response would be silently dropped
        raise DataError(
            f"{record.where}: field 'responses': every response must start with an assistant message",
            reason="responses",
        )
    _check_length(record.where, len(prompt_ids) + max(len(c) for _, c in encoded), max_length)
    return RankedExample(prompt_ids, [c for _, c in encoded], numbers, record.where)


def unpaired_example(record: Record, tokenizer, max_length: int | None) -> UnpairedExample:
    prompt, completion = _field(record, "prompt"), _field(record, "completion")
    label = _field(record, "label", kind="any")
    if isinstance(label, str) and label.lower() in ("true", "false", "1", "0"):
        label = label.lower() in ("true", "1")
    if not isinstance(label, (bool, int)) or label not in (0, 1):
        raise DataError(f"{record.where}: field 'label': expected true or false, got {label!r:.40}", reason="wrong type 'label'")
    prompt_ids, completion_ids = _with_where(record, encode_prompt_completion, tokenizer, prompt, completion)
    _check_length(record.where, len(prompt_ids) + len(completion_ids), max_length)
    return UnpairedExample(prompt_ids, completion_ids, bool(label), record.where)


def split_conversation(messages: Any, where: str) -> tuple[list, str | None]:
    """A ``messages`` conversation as a prompt: the turns up to its last user message, and the assistant's answer
    that follows it (None when the conversation ends with the user). SFT data thus doubles as prompts."""
    _check_text(messages, where, "messages")
    if isinstance(messages, str):
        raise DataError(f"{where}: field 'messages': expected a list of messages, got a string", reason="wrong type 'messages'")
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        raise DataError(f"{where}: field 'messages': no user message to take as the prompt", reason="no user message")
    after = messages[last_user + 1] if last_user + 1 < len(messages) else None
    answer = after["content"] if after is not None and after["role"] == "assistant" else None
    return messages[: last_user + 1], answer


def prompt_example(record: Record, tokenizer, max_length: int | None) -> PromptExample:
    """``{"prompt", ...}``; or ``{"messages"}``, prompted up to its last user turn, with the assistant's answer
    after it as the ``reference`` (unless the record has one)."""
    data = record.data
    if data.get("prompt") is None and data.get("messages") is not None:
        prompt, answer = split_conversation(data["messages"], record.where)
        extra = {k: v for k, v in data.items() if k not in ("prompt", "messages")}
        if answer is not None:
            extra.setdefault("reference", answer)
    elif data.get("prompt") is None:
        raise DataError(f"{record.where}: missing field 'prompt' (or 'messages')", reason="missing field 'prompt'")
    else:
        prompt = _field(record, "prompt")
        extra = {k: v for k, v in data.items() if k != "prompt"}
    prompt_ids = encode_prompt(tokenizer, prompt)
    _check_length(record.where, len(prompt_ids), max_length)
    return PromptExample(prompt_ids, prompt, extra, record.where)


def _with_where(record: Record, fn: Callable, *args):
    try:
        return fn(*args)
    except DataError as e:
        if str(e).startswith(record.where):
            raise
        raise DataError(f"{record.where}: {e}", reason=e.reason) from None


def build_examples(
    records: Iterable[Record],
    make: Callable[[Record, Any, int | None], Any],
    tokenizer,
    max_length: int | None = None,
    on_error: str = "raise",
    source: Any = "",
) -> tuple[list, Counter]:
    """Validate and tokenise every record. Returns the examples and a Counter of skipped records by reason
    (always empty with ``on_error="raise"``, which stops at the first invalid record). ``source`` names the
    data in the error raised when nothing is left."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    examples, skipped, seen = [], Counter(), 0
    for record in records:
        seen += 1
        try:
            examples.append(make(record, tokenizer, max_length))
        except DataError as e:
            if on_error == "raise":
                raise
            skipped[e.reason] += 1
    if not examples:
        name = f"{source}: " if isinstance(source, (str, os.PathLike)) and str(source) else ""
        detail = f" (skipped: {dict(skipped)})" if skipped else " (no records)" if not seen else ""
        raise DataError(f"{name}no valid examples{detail}")
    return examples, skipped


def read_examples(source: Any, make: Callable, tokenizer, max_length: int | None, skip_invalid: bool = False) -> list:
    """load_records + build_examples, reporting skipped records (by reason) on stderr."""
    import sys

    from alignkit.data.records import load_records

    examples, skipped = build_examples(load_records(source), make, tokenizer, max_length, "skip" if skip_invalid else "raise",
                                       source)
    if skipped:
        detail = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
        print(f"alignkit: {source}: skipped {sum(skipped.values())} invalid records ({detail})", file=sys.stderr)
    return examples
