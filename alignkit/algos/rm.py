"""Reward model: a scalar head on any Hugging Face backbone, trained on human or AI preferences.

    pairs:     loss = −log σ(r(x, y_w) − r(x, y_l) − margin)                     (Bradley–Terry)
    soft p:    loss = −p·log σ(Δ) − (1 − p)·log σ(−Δ)                            (RLAIF labels)
    rankings:  loss(x) = −1/C(K,2) · Σ_{s_i > s_j} log σ(r(x, y_i) − r(x, y_j))  (InstructGPT, all pairs of a
               prompt in one batch element)

Stiennon et al. 2020 (https://arxiv.org/abs/2009.01325, eq. 1), Ouyang et al. 2022 (https://arxiv.org/abs/2203.02155,
eq. 1), Lee et al. 2023 (RLAIF, https://arxiv.org/abs/2309.00267); the losses live in ``alignkit.losses``.

The model is ``AutoModelForSequenceClassification(num_labels=1)`` over a causal LM (SmolLM2 ->
LlamaForSequenceClassification, the score read at the last real token) or an encoder (MiniLM ->
BertForSequenceClassification, the [CLS] pooler). Chosen and rejected (or all K responses) go through one forward.

Inputs are rendered as the scorer sees them at RL time (``alignkit.rewards.model.RewardModelSource``): a causal-LM
reward model can share the policy's tokenizer, so it reads exactly the policy's ``prompt_ids + completion_ids``
(the data layer's rendering, EOS included); an encoder never shares ids with a policy and reads the text bridge's
rendering (chat template if it has one, else prompt text + completion).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignkit.config import DataConfig, ModelConfig, arg, at_least, checked, need_data
from alignkit.data import (
    DataError,
    PreferenceExample,
    RankedExample,
    preference_example,
    ranked_example,
    read_examples,
)
from alignkit.data.collate import PAIR_COST, attention_pair_cost, pack_prompt_groups
from alignkit.data.examples import split_implicit_prompt, split_prompt_turns
from alignkit.data.records import Record
from alignkit.engine import Engine, TrainConfig, default_threads, distributed_state, total_steps_for
from alignkit.losses import bradley_terry_loss, ranked_bradley_terry_loss, reward_centering_loss
from alignkit.models import LoraSettings, encoder_heads_in_fp32, load_sequence_classifier, scalar_head, unwrap
from alignkit.rewards.base import prompt_text
from alignkit.rewards.model import reward_input_ids


@dataclass
class RMConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-5))
    center_rewards_coefficient: float = arg(0.0, "weight of (r_w + r_l)^2, keeps rewards centred (0.01 suggested)",
                                            check=at_least(0))
    packing: bool = arg(True, "causal LMs (SDPA attention): each prompt once, then its answers, packed in rows")

    def check(self) -> None:
        need_data(self.data)


# ------------------------------------------------------------------------------------------------------ model


def load_reward_model(name_or_path: str, lora: LoraSettings | None = None, trust_remote_code: bool = False):
    """``AutoModelForSequenceClassification(num_labels=1)`` and its tokenizer (``models.load_sequence_classifier``):
    a causal-LM checkpoint or LoRA adapter (e.g. the SFT stage's output, merged) gets a fresh score head (HF's init,
    N(0, 0.02)); a saved LoRA reward model loads with its adapter, trainable."""
    model, tokenizer = load_sequence_classifier(name_or_path, trust_remote_code=trust_remote_code, trainable=True)
    _distinct_pad(unwrap(model), tokenizer)
    if lora is not None and not hasattr(model, "peft_config"):
        model = _add_lora(model, lora)
    return model.eval(), tokenizer  # dropout off (as TRL's disable_dropout): the same pair gets the same reward


def _add_lora(model, lora: LoraSettings):
    from peft import LoraConfig, get_peft_model

    head = "score" if is_decoder(model) else "classifier"
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules),
        task_type="SEQ_CLS",
        modules_to_save=[head],  # the fresh head is trained in full
    )
    return get_peft_model(model, config)


def _distinct_pad(model, tokenizer) -> None:
    """Pad with a token that never ends an input, in the tokenizer and the config.

    HF's decoder classifiers read the score at the last token that is not ``pad_token_id``. With pad == EOS
    (SmolLM2 and many chat models) an input ending in EOS would be read one token early once the saved model is
    loaded with ``AutoModelForSequenceClassification``. Training reads scores through the attention mask either
    way; this makes the saved model agree with it."""
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == eos:
        candidates = [tokenizer.unk_token_id, *tokenizer.all_special_ids]
        spare = next((i for i in candidates if i is not None and i not in (eos, bos)), None)
        if spare is None:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
            model.resize_token_embeddings(len(tokenizer))
        else:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(spare)
    model.config.pad_token_id = tokenizer.pad_token_id


def is_decoder(model) -> bool:
    """A decoder classifier has a ``score`` head applied at every position (Llama, Qwen, GPT-2, ...)."""
    return hasattr(unwrap(model), "score")


def can_pack(model) -> bool:
    """Packed batches need a decoder (encoders attend both ways) whose attention takes a custom boolean mask:
    SDPA does; eager attention adds the mask as a float, flash-attention takes none."""
    return is_decoder(model) and unwrap(model).config._attn_implementation == "sdpa"


class ScoreModel(nn.Module):
    """Scalar reward of each sequence. Decoders: backbone hidden states -> score head at the last real token
    (flat indices ``last`` into the (R·L) positions, else the rightmost position of a 2-D attention mask);
    encoders: their own pooled head. Shapes: input_ids, position_ids (R, L), attention_mask (R, L) or
    (R, 1, L, L) (see ``_layout``), last (N,) -> rewards (N,) fp32."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.decoder = is_decoder(model)
        if not self.decoder:  # its head in fp32 under autocast, as the decoders' score head (scalar_head)
            encoder_heads_in_fp32(model)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        last: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not self.decoder:  # one sequence per row (padded layout); ``last`` picks the rows in reward order
            scores = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
            return scores if last is None else scores[last // input_ids.shape[1]]
        base = unwrap(self.model)  # under peft: the transformers model with the LoRA layers injected
        backbone = getattr(base, base.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (R, L, H)
        if last is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            last = torch.arange(len(input_ids), device=input_ids.device) * input_ids.shape[1]
            last = last + (positions * mask).argmax(-1)
        # the head runs on N vectors, not on every position
        return scalar_head(base.score, hidden.flatten(0, 1)[last])[:, 0].float()


# ------------------------------------------------------------------------------------------------------- data


def rm_example(record: Record, tokenizer, max_length: int | None) -> PreferenceExample | RankedExample:
    """A causal-LM reward model reads what the policy reads: the data layer's prompt_ids + completion_ids, ended
    by the rule every scorer shares (``rewards.model.reward_input_ids``: read at the EOS closing the completion)."""
    if "responses" in record.data:
        example = ranked_example(record, tokenizer, max_length)
        example.responses_ids = [_ended(example.prompt_ids, r, tokenizer) for r in example.responses_ids]
        return example
    example = preference_example(record, tokenizer, max_length)
    example.chosen_ids = _ended(example.prompt_ids, example.chosen_ids, tokenizer)
    example.rejected_ids = _ended(example.prompt_ids, example.rejected_ids, tokenizer)
    return example


def _ended(prompt_ids: list[int], completion_ids: list[int], tokenizer) -> list[int]:
    return reward_input_ids(prompt_ids + completion_ids, tokenizer)[len(prompt_ids):]


def text_rm_example(record: Record, tokenizer, max_length: int | None) -> PreferenceExample | RankedExample:
    """An encoder reward model reads the text bridge's rendering (``RewardModelSource.score_texts``): the chat
    template when the prompt is a message list and the tokenizer has one, else prompt text + completion text with
    the tokenizer's own special tokens ([CLS] ... [SEP]). The whole input goes in the completion ids."""
    data = dict(record.data)
    implicit = "responses" not in data and "prompt" not in data
    if implicit and all(isinstance(data.get(k), (str, list)) for k in ("chosen", "rejected")):
        data["prompt"], data["chosen"], data["rejected"] = split_implicit_prompt(
            data["chosen"], data["rejected"], record.where
        )
    elif "responses" not in data and all(isinstance(data.get(k), (str, list)) for k in ("prompt", "chosen", "rejected")):
        data["prompt"], data["chosen"], data["rejected"] = split_prompt_turns(
            data["prompt"], data["chosen"], data["rejected"], record.where
        )
    prompt = data.get("prompt")
    # the data layer validates fields, margins, labels and scores on a plain-text copy
    plain = {k: _plain(v) if k in ("prompt", "chosen", "rejected") else v for k, v in data.items()}
    if "responses" in data and isinstance(data["responses"], list):
        plain["responses"] = [_plain(r) for r in data["responses"]]
    example = rm_example(Record(plain, record.where), tokenizer, None)

    def encode(completion) -> list[int]:
        if isinstance(prompt, list) and getattr(tokenizer, "chat_template", None):
            messages = [*prompt, {"role": "assistant", "content": _plain(completion)}]
            return tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
        return tokenizer(prompt_text(prompt) + _plain(completion))["input_ids"]

    if isinstance(example, RankedExample):
        example.prompt_ids, example.responses_ids = [], [encode(r) for r in data["responses"]]
        longest = max(map(len, example.responses_ids))
    else:
        example.prompt_ids, example.chosen_ids, example.rejected_ids = [], encode(data["chosen"]), encode(data["rejected"])
        longest = max(len(example.chosen_ids), len(example.rejected_ids))
    if max_length is not None and longest > max_length:
        raise DataError(
            f"{record.where}: example is {longest} tokens, longer than max_length={max_length} "
            "(raise --max-length or pass --skip-invalid)",
            reason="longer than max_length",
        )
    return example


def _plain(value: Any) -> Any:
    """Message lists as text (as the text bridge renders them); anything else unchanged for the data layer to check."""
    if isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value):
        return prompt_text(value) if value else value
    return value


def _layout(groups: list[tuple[list[int], list[list[int]]]], pad_id: int, pack: bool,
            pair_cost: float = PAIR_COST) -> dict[str, torch.Tensor]:
    """Rows of tokens for ``groups`` of (prompt, responses), and ``last``: the flat index, in the (R·L) positions,
    of each response's last token, group by group.

    Padded: one prompt + response per row, right-padded, with a (R, L) attention mask: what any model accepts.
    Packed (``alignkit.data.collate.pack_prompt_groups``): a prompt appears once, followed by all its responses,
    and several such groups share a row (as many rows as the model's ``pair_cost`` makes cheapest); a (R, 1, L, L)
    boolean block mask keeps every response exactly as if it were alone after its prompt, while the prompt is
    computed once instead of K times and there is little padding: the pairs of issue #3's benchmark need 0.53x the
    positions of padded rows."""
    if not pack:
        sequences = [prompt + response for prompt, responses in groups for response in responses]
        width = max(map(len, sequences))
        input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for r, sequence in enumerate(sequences):
            input_ids[r, : len(sequence)] = torch.tensor(sequence)
            attention_mask[r, : len(sequence)] = 1
        last = torch.arange(len(sequences)) * width + attention_mask.sum(-1) - 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "last": last}

    packed = pack_prompt_groups(groups, pad_id, pair_cost=pair_cost)
    return {k: packed[k] for k in ("input_ids", "position_ids", "attention_mask", "last")}


def collate_pairs(examples: list[PreferenceExample], pad_id: int, pack: bool = False,
                  pair_cost: float = PAIR_COST) -> dict[str, torch.Tensor]:
    """Chosen and rejected of B pairs in one forward; rewards come out as the B chosen then the B rejected.
    margin/label (B,) are present only when some pair uses them."""
    batch = _layout([(e.prompt_ids, [e.chosen_ids, e.rejected_ids]) for e in examples], pad_id, pack, pair_cost)
    batch["last"] = batch["last"].view(-1, 2).t().reshape(-1)  # (c0, r0, c1, r1, ...) -> (c0, c1, ..., r0, r1, ...)
    if any(e.margin for e in examples):
        batch["margin"] = torch.tensor([e.margin for e in examples], dtype=torch.float32)
    if any(e.label != 1.0 for e in examples):
        batch["label"] = torch.tensor([e.label for e in examples], dtype=torch.float32)
    batch["n_pairs"] = torch.tensor(len(examples))
    return batch


def collate_rankings(examples: list[RankedExample], pad_id: int, pack: bool = False,
                     pair_cost: float = PAIR_COST) -> dict[str, torch.Tensor]:
    """All responses of B prompts in one forward; ``index`` (B, K) points each prompt's responses into the
    rewards (-1 where a prompt has fewer than K), ``scores`` (B, K) ranks them (higher = better)."""
    k = max(len(e.responses_ids) for e in examples)
    index = torch.full((len(examples), k), -1, dtype=torch.long)
    scores = torch.zeros((len(examples), k), dtype=torch.float32)
    start = 0
    for b, e in enumerate(examples):
        index[b, : len(e.responses_ids)] = torch.arange(start, start + len(e.responses_ids))
        scores[b, : len(e.scores)] = torch.tensor(e.scores)
        start += len(e.responses_ids)
    batch = _layout([(e.prompt_ids, e.responses_ids) for e in examples], pad_id, pack, pair_cost)
    present = index >= 0
    pairs = (scores[:, :, None] > scores[:, None, :]) & present[:, :, None] & present[:, None, :]
    return {**batch, "index": index, "scores": scores, "n_pairs": pairs.sum()}


# ----------------------------------------------------------------------------------------------------- losses


def _rewards(module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return module(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"), batch["last"])


def pairwise_loss(module, batch: dict[str, torch.Tensor], center: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Bradley–Terry (optional margin, soft labels) summed over the batch's pairs, plus optional centering."""
    chosen, rejected = _rewards(module, batch).chunk(2)  # (B,), (B,)
    losses, metrics = bradley_terry_loss(chosen, rejected, batch.get("margin"), batch.get("label"))
    if center:
        losses = losses + reward_centering_loss(chosen, rejected, center)
    logs = {
        "loss": losses.mean().item(),
        "accuracy": metrics["accuracy"].item(),
        "reward/chosen": metrics["rewards/chosen"].item(),
        "reward/rejected": metrics["rewards/rejected"].item(),
        "margin": metrics["margin"].item(),
    }
    return losses.sum(), logs


def ranking_loss(module, batch: dict[str, torch.Tensor], center: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """InstructGPT's K-way loss summed over prompts (each prompt: the mean over its C(K,2) pairs), plus optional
    centering averaged over the same pairs."""
    index = batch["index"]
    present = index >= 0
    rewards = _rewards(module, batch)[index.clamp(min=0)]  # (B, K); absent slots are masked below
    losses, metrics = ranked_bradley_terry_loss(rewards, batch["scores"], present)
    scores = batch["scores"]
    pairs = (scores[:, :, None] > scores[:, None, :]) & present[:, :, None] & present[:, None, :]  # (B, K, K)
    b, i, j = pairs.nonzero(as_tuple=True)  # every (better i, worse j) pair of prompt b
    better, worse = rewards[b, i], rewards[b, j]
    if center:
        per_pair = reward_centering_loss(better, worse, center)
        n_pairs = pairs.sum(dim=(1, 2)).clamp(min=1)
        losses = losses + torch.zeros_like(losses).index_add(0, b, per_pair) / n_pairs
    logs = {
        "loss": losses.mean().item(),
        "accuracy": metrics["accuracy"].item(),
        "reward/chosen": better.mean().item(),
        "reward/rejected": worse.mean().item(),
        "margin": (better - worse).mean().item(),
    }
    return losses.sum(), logs


def count_items(batch: dict[str, torch.Tensor]) -> int:
    """Pairs (pairwise data) or prompts (rankings): the unit the loss is averaged over."""
    return len(batch["index"]) if "index" in batch else len(batch["last"]) // 2


@torch.no_grad()
def evaluate(module, batches: list[dict[str, torch.Tensor]], loss_fn, autocast) -> dict[str, float]:
    """Held-out loss (mean per pair / per prompt) and pairwise accuracy (over every pair, C(K,2) per ranking)."""
    loss_sum, items, correct, pairs = 0.0, 0, 0.0, 0
    for batch in batches:
        with autocast():
            loss, metrics = loss_fn(module, batch)
        loss_sum += float(loss)
        items += count_items(batch)
        correct += metrics["accuracy"] * int(batch["n_pairs"])
        pairs += int(batch["n_pairs"])
    return {"eval/loss": loss_sum / max(1, items), "eval/accuracy": correct / max(1, pairs)}


# ------------------------------------------------------------------------------------------------------ train


def _kind(examples: list, source: str) -> str:
    kinds = {type(e) for e in examples}
    if len(kinds) > 1:
        raise DataError(f"{source}: mixes preference pairs and rankings; put them in separate files")
    return "rankings" if kinds == {RankedExample} else "pairs"


@checked
def train(cfg: RMConfig) -> Path:
    default_threads()
    torch.manual_seed(cfg.train.seed)  # the fresh score head's initialisation
    model, tokenizer = load_reward_model(
        cfg.model.model, lora=cfg.model.lora_settings(), trust_remote_code=cfg.model.trust_remote_code
    )
    decoder = is_decoder(model)
    make = partial(read_examples, make=rm_example if decoder else text_rm_example, tokenizer=tokenizer,
                   max_length=cfg.data.max_length, skip_invalid=cfg.data.skip_invalid)
    examples = make(cfg.data.data)
    eval_examples = make(cfg.data.eval_data) if cfg.data.eval_data else []
    collates = {"pairs": collate_pairs, "rankings": collate_rankings}
    losses = {"pairs": pairwise_loss, "rankings": ranking_loss}
    kind = _kind(examples, cfg.data.data)
    pack = cfg.packing and can_pack(model)
    pair_cost = attention_pair_cost(model.config)  # what attention costs the padding-free rows (plan_rows)
    collate = partial(collates[kind], pad_id=tokenizer.pad_token_id, pack=pack, pair_cost=pair_cost)
    loss_fn = partial(losses[kind], center=cfg.center_rewards_coefficient)

    score_model = ScoreModel(model)
    total = total_steps_for(cfg.train, len(examples), distributed_state().num_processes)
    engine = Engine(cfg.train, model, tokenizer, total, train_module=score_model, run_config={"algo": "rm", **asdict(cfg)})
    evaluate_fn = None
    if eval_examples:
        eval_kind = _kind(eval_examples, cfg.data.eval_data)
        eval_collate = partial(collates[eval_kind], pad_id=tokenizer.pad_token_id, pack=pack, pair_cost=pair_cost)
        eval_loss = partial(losses[eval_kind], center=cfg.center_rewards_coefficient)
        size = cfg.train.batch_size
        eval_batches = [engine.to_device(eval_collate(eval_examples[i : i + size]))
                        for i in range(0, len(eval_examples), size)]
        evaluate_fn = partial(evaluate, score_model, eval_batches, eval_loss, engine.autocast)
    engine.fit(examples, collate, loss_fn, count_items, evaluate_fn, shown=("eval/loss", "eval/accuracy"))
    return engine.finish("reward model")
