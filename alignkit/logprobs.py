"""Per-token log-probabilities of target tokens, without materialising the full (B, L, V) log-softmax.

Small models with big vocabularies spend most of their time in the LM head (SmolLM2: 576 x 49,152). Only the
positions that carry a target need logits, so hidden states are gathered at those positions first, then the
head runs in chunks with the logsumexp in fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from alignkit.models import unwrap

CHUNK_TOKENS = 1024


def _backbone_and_head(model) -> tuple[nn.Module, nn.Module]:
    lm = unwrap(model)
    return lm.base_model, lm.get_output_embeddings()


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    target_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(input_ids[:, t] | input_ids[:, :t]) at every t where ``target_mask[:, t]`` is set; 0 elsewhere.

    Shapes: input_ids, target_mask, attention_mask, position_ids (B, L) -> (B, L) fp32. Position 0 can never be
    a target. ``temperature`` divides the logits (PPO scores samples under the distribution they came from).
    With ``with_entropy`` also returns the entropy of the predictive distribution at the same positions.
    """
    backbone, head = _backbone_and_head(model)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state  # (B, L, H)
    return logprobs_from_hidden(hidden, head, input_ids, target_mask, temperature, with_entropy)


def logprobs_from_hidden(
    hidden: torch.Tensor,
    head: nn.Module,
    input_ids: torch.Tensor,
    target_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs`` from the backbone's last hidden states (B, L, H), for callers that also read them
    (a PPO value head shares the one backbone forward)."""
    target_mask = target_mask.bool().clone()
    target_mask[:, 0] = False
    # the hidden state at t - 1 predicts the token at t
    where_b, where_t = target_mask.nonzero(as_tuple=True)
    selected = hidden[where_b, where_t - 1]  # (N, H)
    targets = input_ids[where_b, where_t]  # (N,)
    picked, entropies = [], []
    for start in range(0, selected.shape[0], CHUNK_TOKENS):
        logits = head(selected[start : start + CHUNK_TOKENS]).float()  # (n, V)
        if temperature != 1.0:
            logits = logits / temperature
        logz = torch.logsumexp(logits, dim=-1)
        picked.append(logits.gather(1, targets[start : start + CHUNK_TOKENS, None]).squeeze(1) - logz)
        if with_entropy:
            probs = torch.softmax(logits, dim=-1)
            entropies.append(logz - (probs * logits).sum(-1))
    out = hidden.new_zeros(input_ids.shape, dtype=torch.float32)
    if picked:
        out = out.index_put((where_b, where_t), torch.cat(picked))
    if not with_entropy:
        return out
    entropy = hidden.new_zeros(input_ids.shape, dtype=torch.float32)
    if entropies:
        entropy = entropy.index_put((where_b, where_t), torch.cat(entropies).detach())
    return out, entropy


class LogprobModel(nn.Module):
    """A causal LM whose forward returns target-token log-probs; this is the module DDP/FSDP wrap for training,
    so gradient synchronisation sees every parameter used."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, target_mask, attention_mask=None, position_ids=None, temperature: float = 1.0):
        return token_logprobs(self.lm, input_ids, target_mask, attention_mask, position_ids, temperature)
