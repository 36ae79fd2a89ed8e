"""A trained reward model (a sequence classifier with one output) as a reward source.

The reward model's tokenizer may differ from the policy's (a MiniLM reward model scoring a SmolLM2
policy): completions then travel as text and are re-tokenised with the reward model's own tokenizer
and chat template (the "text bridge"). When both tokenizers are the same, the policy's token ids are
scored directly, with no decode/re-encode round trip.
"""

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from alignkit.models import encoder_heads_in_fp32, scalar_head
from alignkit.rewards.base import Prompt, check_batch, prompt_text

# Encoding this probe catches tokenizers that share a vocabulary but normalise or split differently
# (cased vs uncased, another pre-tokenizer, BOS added or not).
_PROBE = "Hello World! 3.14 naïve  ünïcode\n\ttabs — 日本語 <|im_end|></s>[SEP]"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides token ids and sequence layout: vocabulary, special tokens, chat template
    and the encoding of a probe string. Equal fingerprints mean ids can be shared between models."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = [
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.unk_token_id,
        tokenizer.cls_token_id,
    ]
    h.update(json.dumps(specials).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(json.dumps(tokenizer(_PROBE)["input_ids"]).encode())
    return h.hexdigest()


def sequence_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar scores (B,) of a sequence classifier with one output, for (B, T) right-padded inputs.

    Decoder classifiers (a ``score`` head over every position: Llama, Qwen, GPT-2, ...) are read at the
    last token of ``attention_mask``. Hugging Face's own pooling takes the last token that differs from
    ``pad_token_id``, which is wrong when pad == EOS (SmolLM2, many others) and the text ends in EOS.
    Encoders (BERT-like) keep their [CLS]-pooled head, run in fp32 like the decoders' score. Reward-model
    training should read scores the same way, so it uses this function too.
    """
    head = getattr(model, "score", None)
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if isinstance(head, nn.Linear) and backbone is not None:
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (positions * attention_mask).argmax(-1)  # (B,) rightmost real token, any padding layout
        logits = scalar_head(head, hidden[torch.arange(len(last), device=last.device), last])  # (B, num_labels)
    else:  # an encoder: HF's pooling, its head in fp32 under autocast (as `scalar_head` for decoders)
        logits = encoder_heads_in_fp32(model)(input_ids=input_ids, attention_mask=attention_mask).logits
    if logits.shape[-1] != 1:
        raise ValueError(f"a reward model needs one output (num_labels=1), this one has {logits.shape[-1]}")
    return logits[:, 0].float()


def reward_input_ids(ids: list[int], tokenizer: Any) -> list[int]:
    """The one rule for where a reward model reads a (prompt, completion): at the end-of-sequence token that
    closes the completion. Used alike by reward-model training (``alignkit rm``), the same-tokenizer fast path
    (rollout ids) and the text bridge (re-tokenised text), so a completion gets one score whichever path it takes:

    - whitespace-only tokens after a final EOS are dropped (a chat template's newline after ``<|im_end|>``,
      which a rollout that stops at ``<|im_end|>`` never produces);
    - EOS is appended when the sequence does not end with one (plain-text rendering; a response cut at
      ``max_new_tokens``, scored as if it had ended there, as its decoded text would be).
    Tokenizers without an EOS token (BERT-style encoders, read at [CLS]) are left alone."""
    eos = tokenizer.eos_token_id
    if eos is None or not ids:
        return list(ids)
    end = len(ids)
    while end > 0 and ids[end - 1] != eos and not tokenizer.decode([ids[end - 1]]).strip():
        end -= 1
    if end > 0 and ids[end - 1] == eos:
        return list(ids[:end])
    return [*ids, eos]


class RewardModelSource:
    """Score (prompt, completion) pairs with a reward model.

    ``model`` is a path (a saved ``AutoModelForSequenceClassification`` with its tokenizer, or an
    alignkit run directory) or a loaded model, then with its ``tokenizer``. Text inputs are rendered
    with the reward model's chat template when the prompt is a message list and the tokenizer has a
    template; otherwise as prompt + completion. Sequences longer than ``max_length`` (capped by the
    tokenizer's ``model_max_length``) keep their end.
    ``bf16`` runs the forward under bf16 autocast: faster only where the CPU/GPU has native bf16
    (AVX512-BF16, AMX, CUDA); on an AVX2-only CPU it was ~10x slower than fp32. Scores move by ~1e-2.
    """

    def __init__(
        self,
        model: str | os.PathLike | nn.Module,
        tokenizer: Any = None,
        batch_size: int = 16,
        max_length: int = 1024,
        bf16: bool = False,
    ):
        if isinstance(model, str | os.PathLike):
            from alignkit.models import load_sequence_classifier

            model, own_tokenizer = load_sequence_classifier(str(model))  # a LoRA reward model comes merged
            tokenizer = tokenizer if tokenizer is not None else own_tokenizer
        if tokenizer is None:
            raise ValueError("a loaded reward model needs its tokenizer")
        self.model = model.eval()
        self.tokenizer = tokenizer
        # Any id will do for padding: scores are read through the attention mask.
        self.pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
        self.batch_size = batch_size
        self.max_length = min(max_length, tokenizer.model_max_length)
        self.bf16 = bf16
        self.name = "reward_model"
        self.fingerprint = tokenizer_fingerprint(tokenizer)
        self._seen: tuple[Any, bool] | None = None  # (last policy tokenizer, shares it?)

    def shares_tokenizer(self, tokenizer: Any) -> bool:
        """True when ``tokenizer`` produces the same ids as the reward model's own."""
        if tokenizer is self.tokenizer:
            return True
        if self._seen is None or self._seen[0] is not tokenizer:
            self._seen = (tokenizer, tokenizer_fingerprint(tokenizer) == self.fingerprint)
        return self._seen[1]

    def __call__(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[str],
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        tokenizer: Any = None,
        **kw: Any,
    ) -> torch.Tensor:
        n = check_batch(prompts, completions)
        if input_ids is not None and tokenizer is not None and self.shares_tokenizer(tokenizer):
            if len(input_ids) != n:
                raise ValueError(f"got {len(input_ids)} input_ids rows for {n} completions")
            return self.score_ids(input_ids, attention_mask)
        return self.score_texts(prompts, completions)

    def score_texts(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> torch.Tensor:
        """The text bridge: render and tokenise each pair with the reward model's tokenizer, then score."""
        check_batch(prompts, completions)
        tok = self.tokenizer
        # Too long: keep the end, where the completion is; the tokenizer keeps special tokens ([CLS], BOS).
        encode = dict(truncation=True, max_length=self.max_length)
        side, tok.truncation_side = tok.truncation_side, "left"
        try:
            ids = []
            for prompt, completion in zip(prompts, completions, strict=True):
                if not isinstance(prompt, str) and getattr(tok, "chat_template", None):
                    messages = [*prompt, {"role": "assistant", "content": completion}]
                    text = tok.apply_chat_template(messages, tokenize=False)
                    ids.append(tok(text, add_special_tokens=False, **encode)["input_ids"])  # template has BOS
                else:
                    ids.append(tok(prompt_text(prompt) + completion, **encode)["input_ids"])
        finally:
            tok.truncation_side = side
        return self._score(ids)

    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The fast path: score token sequences (B, T) in the reward model's own vocabulary, any padding.
        Sequences longer than ``max_length`` keep their last ``max_length`` tokens."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.bool().cpu()
        rows = [
            row[keep].tolist()[-self.max_length :] for row, keep in zip(input_ids.cpu(), mask, strict=True)
        ]
        return self._score(rows)

    @torch.no_grad()
    def _score(self, ids: list[list[int]]) -> torch.Tensor:
        ids = [reward_input_ids(row, self.tokenizer) for row in ids]
        # Sorting by length keeps padding small inside each batch; results go back in input order.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        scores = torch.empty(len(ids), dtype=torch.float32)
        device = next(self.model.parameters()).device
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        )
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            width = max(len(ids[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):  # right padding: positions 0..n-1 as in an unpadded forward
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                attention_mask[row, : len(ids[i])] = 1
            with autocast:
                batch_scores = sequence_scores(self.model, input_ids.to(device), attention_mask.to(device))
            scores[chunk] = batch_scores.cpu()
        return scores
