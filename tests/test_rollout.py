"""alignkit.rollout: the sampling rule by hand; both decoders against Hugging Face on tiny random models."""

import gc
import math
import weakref

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from alignkit import packing
from alignkit import rollout as rollout_module
from alignkit.rollout import (
    Rollout,
    SamplingConfig,
    _fast_path_unsupported,
    filter_logits,
    next_token,
    sample,
)

PAD, VOCAB = 0, 128
FP32 = dict(dtype="fp32")
GREEDY10 = SamplingConfig(max_new_tokens=10, greedy=True, dtype="fp32")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    # initializer_range 0.2 makes the next-token distributions peaked, so greedy ties are implausible
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def chat_like_prompts() -> list[list[int]]:
    """Several lengths, a shared 5-token prefix (a system turn), one prompt repeated (a GRPO group)."""
    g = torch.Generator().manual_seed(3)
    prefix = [5, 6, 7, 8, 9]
    prompts = [prefix + torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (4, 9, 1, 6, 2)]
    return prompts + [prompts[1]]


def hf_greedy(model, rollout: Rollout, new_tokens: int, eos) -> list[list[int]]:
    """HF generate(do_sample=False) on the same left-padded prompts, cut after the first EOS."""
    eos_list = [eos] if isinstance(eos, int) else eos
    with torch.no_grad():
        out = model.generate(
            input_ids=rollout.prompt_ids, attention_mask=rollout.prompt_mask, do_sample=False,
            max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=PAD,
        )
    cut = []
    for row in out[:, rollout.prompt_ids.shape[1]:].tolist():
        ends = [i for i, t in enumerate(row) if t in eos_list]
        cut.append(row[: ends[0] + 1] if ends else row)
    return cut


def responses(rollout: Rollout) -> list[list[int]]:
    return [r[m.bool()].tolist() for r, m in zip(rollout.response_ids, rollout.response_mask)]


def forward_logprobs(model, rollout: Rollout, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Log-probs of the response tokens from one forward over prompt + response, under the filtered
    distribution log softmax(filter(logits / temperature))."""
    ids, mask = rollout.input_ids, rollout.attention_mask
    position = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position).logits.float()
    width = rollout.prompt_ids.shape[1]
    logp = filter_logits(logits[:, width - 1 : -1], temperature, top_k, top_p).log_softmax(-1)
    return logp.gather(-1, rollout.response_ids[..., None]).squeeze(-1) * rollout.response_mask


# -- the sampling rule ---------------------------------------------------------------------------------------


def test_filter_logits_temperature_top_p_top_k_by_hand():
    """p = (.5, .3, .15, .05). Temperature 2: p' ∝ sqrt(p) = (.7071, .5477, .3873, .2236) / 1.8657
    = (.3790, .2936, .2076, .1199). Top-p .6: the mass before each sorted token is (0, .379, .673, .880),
    so tokens 0 and 1 stay, renormalised to .7071 / 1.2548 = .5635 and .4365. Top-k 3 at temperature 1:
    (.5, .3, .15) / .95. Top-p .3: the first token alone already holds .5, only it stays."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    probs = filter_logits(logits.clone(), temperature=2.0, top_p=0.6).softmax(-1)
    torch.testing.assert_close(probs, torch.tensor([[0.5635, 0.4365, 0.0, 0.0]]), atol=1e-4, rtol=0)
    probs = filter_logits(logits.clone(), temperature=2.0).softmax(-1)
    torch.testing.assert_close(probs, torch.tensor([[0.3790, 0.2936, 0.2076, 0.1199]]), atol=1e-4, rtol=0)
    probs = filter_logits(logits.clone(), top_k=3).softmax(-1)
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95, atol=1e-6, rtol=0)
    assert filter_logits(logits.clone(), top_p=0.3).isfinite().tolist() == [[True, False, False, False]]


def test_sampled_frequencies_and_logprobs_follow_the_filtered_distribution():
    """40,000 draws at temperature 2, top-p .6 from p = (.5, .3, .15, .05): frequencies .5635 / .4365 / 0 / 0
    (4 standard deviations = .01), and each reported log-prob is the log of its token's renormalised prob."""
    n = 40_000
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(n, 1)
    config = SamplingConfig(temperature=2.0, top_p=0.6)
    tokens, logprobs = next_token(logits, config, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=4).float() / n
    torch.testing.assert_close(freq, torch.tensor([0.5635, 0.4365, 0.0, 0.0]), atol=0.01, rtol=0)
    expected = torch.tensor([math.log(0.5635), math.log(0.4365)])[tokens]
    torch.testing.assert_close(logprobs, expected, atol=1e-3, rtol=0)
    # same generator seed, same draws
    again, _ = next_token(torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(n, 1), config,
                          torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)


# -- decoders against Hugging Face ---------------------------------------------------------------------------


@pytest.mark.parametrize("fast", [True, False])
def test_greedy_equals_hf_generate_fp32(fast):
    model = tiny_llama()
    assert _fast_path_unsupported(model, 64) is None
    config = SamplingConfig(max_new_tokens=10, greedy=True, fast=fast, **FP32)
    rollout = sample(model, chat_like_prompts(), config, eos_token_id=1, pad_token_id=PAD)
    assert responses(rollout) == hf_greedy(model, rollout, 10, eos=1)
    assert rollout.prompt_ids[2].tolist() == [PAD] * 8 + chat_like_prompts()[2]  # left padding


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 20, 0.8)])
def test_fast_path_logprobs_equal_hf_forward(temperature, top_k, top_p):
    """The decoder's log-probs equal those of one HF forward over the finished sequences: the plain softmax,
    log softmax(logits / 0.7), and with top-k / top-p filtering the renormalised filtered distribution."""
    model = tiny_llama()
    config = SamplingConfig(max_new_tokens=12, temperature=temperature, top_k=top_k, top_p=top_p, **FP32)
    rollout = sample(model, chat_like_prompts(), config, eos_token_id=1, pad_token_id=PAD,
                     generator=torch.Generator().manual_seed(1))
    assert rollout.response_mask.sum() > 30
    expected = forward_logprobs(model, rollout, temperature, top_k, top_p)
    torch.testing.assert_close(rollout.logprobs, expected, atol=1e-4, rtol=0)
    if top_p < 1.0:  # the filter mattered: some log-probs exceed the unfiltered ones
        assert (rollout.logprobs - forward_logprobs(model, rollout, temperature)).gt(1e-3).any()


def test_generic_path_logprobs_equal_hf_forward():
    model = tiny_llama(seed=1)
    config = SamplingConfig(max_new_tokens=8, fast=False, **FP32)
    rollout = sample(model, chat_like_prompts(), config, eos_token_id=1, pad_token_id=PAD,
                     generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(rollout.logprobs, forward_logprobs(model, rollout), atol=1e-4, rtol=0)


def test_stop_at_eos_masks_and_early_stop():
    """Make the token that row 0 greedily emits 3rd an EOS: row 0 ends there (mask 1 up to and including
    it, pad and log-prob 0 after). With every row's 2nd token an EOS, decoding stops after 2 steps."""
    model = tiny_llama()
    prompts = chat_like_prompts()
    free = sample(model, prompts, GREEDY10, eos_token_id=[], pad_token_id=PAD)
    assert free.response_mask.all() and not free.ended_with_eos.any()
    eos = int(free.response_ids[0, 2])
    assert eos not in free.response_ids[0, :2].tolist()  # holds for this seed: row 0 ends at its 3rd token
    rollout = sample(model, prompts, GREEDY10, eos_token_id=eos, pad_token_id=PAD)
    assert rollout.response_mask[0].tolist() == [1, 1, 1] + [0] * 7
    assert rollout.response_ids[0].tolist() == free.response_ids[0, :3].tolist() + [PAD] * 7
    assert rollout.logprobs[0, 3:].eq(0).all() and rollout.logprobs[0, :3].lt(0).all()
    assert rollout.ended_with_eos[0]
    assert responses(rollout) == hf_greedy(model, rollout, 10, eos=eos)
    for b in range(len(prompts)):  # every row: mask ones then zeros; ended iff its last real token is EOS
        n = int(rollout.response_mask[b].sum())
        assert rollout.response_mask[b, :n].all() and not rollout.response_mask[b, n:].any()
        assert bool(rollout.ended_with_eos[b]) == (int(rollout.response_ids[b, n - 1]) == eos)

    second = sorted(set(free.response_ids[:, 1].tolist()))
    assert not set(second) & set(free.response_ids[:, 0].tolist())  # holds for this seed
    stopped = sample(model, prompts, GREEDY10, eos_token_id=second, pad_token_id=PAD)
    assert stopped.response_ids.shape == (len(prompts), 2) and stopped.ended_with_eos.all()


def test_finished_rows_dropped_mid_batch_still_match_hf():
    """EOS = the first greedy token of most rows: 5 of 9 end at step 0, so the decoder compacts its batch and
    cache to the 4 scattered survivors (rows 1, 4, 5, 8), which must continue exactly as in HF generate."""
    model = tiny_llama(seed=2)
    prompts = chat_like_prompts() + [[4, 3, 2], [9, 9, 9, 9], [7]]
    free = sample(model, prompts, SamplingConfig(max_new_tokens=8, greedy=True, **FP32), eos_token_id=[],
                  pad_token_id=PAD)
    first = free.response_ids[:, 0].tolist()
    eos = sorted(set(first) - {first[1], first[4], first[8]})
    rollout = sample(model, prompts, SamplingConfig(max_new_tokens=8, greedy=True, **FP32), eos_token_id=eos,
                     pad_token_id=PAD)
    survivors = (rollout.response_mask.sum(1) > 1).nonzero().squeeze(1).tolist()
    assert survivors == [1, 4, 5, 8]  # row 5 repeats row 1's prompt
    assert responses(rollout) == hf_greedy(model, rollout, 8, eos=eos)


def test_min_new_tokens_bans_eos():
    model = tiny_llama()
    free = sample(model, [[5, 6, 7]], SamplingConfig(max_new_tokens=4, greedy=True, **FP32), eos_token_id=[],
                  pad_token_id=PAD)
    eos = int(free.response_ids[0, 0])
    config = SamplingConfig(max_new_tokens=4, min_new_tokens=4, greedy=True, **FP32)
    for fast in (True, False):
        rollout = sample(model, [[5, 6, 7]], SamplingConfig(**{**config.__dict__, "fast": fast}),
                         eos_token_id=eos, pad_token_id=PAD)
        assert rollout.response_mask.tolist() == [[1, 1, 1, 1]]
        assert eos not in rollout.response_ids[0].tolist()


def test_tensor_prompts_any_padding_side_equal_lists():
    model = tiny_llama()
    prompts = chat_like_prompts()
    width = max(map(len, prompts))
    ids = torch.tensor([p + [PAD] * (width - len(p)) for p in prompts])  # right-padded
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    config = SamplingConfig(max_new_tokens=5, greedy=True, **FP32)
    a = sample(model, prompts, config, eos_token_id=1, pad_token_id=PAD)
    b = sample(model, ids, config, prompt_mask=mask, eos_token_id=1, pad_token_id=PAD)
    assert torch.equal(a.prompt_ids, b.prompt_ids) and torch.equal(a.response_ids, b.response_ids)


def test_qwen2_with_qkv_bias_uses_fast_path_and_equals_hf():
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert _fast_path_unsupported(model, 64) is None
    rollout = sample(model, chat_like_prompts(), SamplingConfig(max_new_tokens=8, greedy=True, **FP32),
                     eos_token_id=1, pad_token_id=PAD)
    assert responses(rollout) == hf_greedy(model, rollout, 8, eos=1)


def test_lora_adapter_is_merged_for_sampling():
    """A peft LoRA model with non-zero adapters: the fast path merges W + (α/r)·B·A and matches the
    adapter-applying HF forward; with the adapter disabled it matches the base weights."""
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = peft.get_peft_model(base, lora).eval()
    assert _fast_path_unsupported(model.get_base_model(), 64) is None
    prompts = chat_like_prompts()
    config = SamplingConfig(max_new_tokens=8, **FP32)
    gen = torch.Generator().manual_seed(4)
    rollout = sample(model, prompts, config, eos_token_id=1, pad_token_id=PAD, generator=gen)
    torch.testing.assert_close(rollout.logprobs, forward_logprobs(model, rollout), atol=1e-4, rtol=0)
    greedy = SamplingConfig(max_new_tokens=8, greedy=True, **FP32)
    with_adapter = sample(model, prompts, greedy, eos_token_id=1, pad_token_id=PAD)
    with model.disable_adapter():
        without = sample(model, prompts, greedy, eos_token_id=1, pad_token_id=PAD)
        assert responses(without) == hf_greedy(model.get_base_model(), without, 8, eos=1)
    assert responses(with_adapter) != responses(without)


def test_other_architectures_fall_back_to_the_generic_loop():
    config = GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                        initializer_range=0.2)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    assert _fast_path_unsupported(model, 64) is not None
    model.train()  # sampling must switch dropout off, and leave the mode as it found it
    rollout = sample(model, chat_like_prompts(), SamplingConfig(max_new_tokens=8, greedy=True, **FP32),
                     eos_token_id=1, pad_token_id=PAD)
    assert model.training
    assert responses(rollout) == hf_greedy(model.eval(), rollout, 8, eos=1)


def test_bf16_fast_path_samples_the_bf16_model():
    """bf16 weights and activations: log-probs near the fp32 model's. This peaked tiny model amplifies bf16
    rounding (HF's own bf16 forward differs from fp32 by up to ~0.15 nats here), while a wrong decoder is off
    by nats (another seed's model: mean error > 1)."""
    model = tiny_llama()
    config = SamplingConfig(max_new_tokens=6, dtype="bf16")
    rollout = sample(model, chat_like_prompts(), config, eos_token_id=1, pad_token_id=PAD,
                     generator=torch.Generator().manual_seed(5))
    assert rollout.logprobs.dtype == torch.float32 and rollout.logprobs.le(0).all()
    n = rollout.response_mask.sum()
    error = (rollout.logprobs - forward_logprobs(model, rollout)).abs()
    assert error.sum() / n < 0.05 and error.max() < 0.3
    assert (rollout.logprobs - forward_logprobs(tiny_llama(seed=1), rollout)).abs().sum() / n > 1.0


def test_packed_weights_are_used_and_sample_as_the_plain_ones(monkeypatch):
    """On CPU the decoder multiplies by oneDNN-packed fp32 weights (alignkit.packing): the same tokens and, to
    rounding, the same log-probs as with the plain weights. (Where the CPU packs bf16 too, the bf16 test above
    runs packed.)"""
    cpu = torch.device("cpu")
    assert packing.packs(torch.float32, cpu)
    model = tiny_llama()
    decoder = rollout_module._LlamaDecoder(model, torch.float32)
    qkv, o_proj = decoder.layers[0][1], decoder.layers[0][2]
    assert len(qkv) == 1 and qkv[0][0].is_mkldnn and o_proj[0].is_mkldnn and decoder.lm_head[0].is_mkldnn
    config = SamplingConfig(max_new_tokens=12, **FP32)
    out = {}
    for packed in (True, False):
        monkeypatch.setattr(packing, "ENABLED", packed)
        out[packed] = sample(model, chat_like_prompts(), config, eos_token_id=1, pad_token_id=PAD,
                             generator=torch.Generator().manual_seed(2))
    assert not rollout_module._LlamaDecoder(model, torch.float32).lm_head[0].is_mkldnn  # the switch took
    assert responses(out[True]) == responses(out[False]) and out[True].response_mask.sum() > 30
    torch.testing.assert_close(out[True].logprobs, out[False].logprobs, atol=1e-5, rtol=0)


def test_frozen_model_keeps_its_decoder_until_a_weight_changes():
    """A frozen model (serving, judging) reuses its decoder and packed weights between calls; an in-place change
    of any weight rebuilds it; a trainable model keeps nothing; the cache does not keep a model alive."""
    model = tiny_llama().requires_grad_(False)
    prompts = chat_like_prompts()
    first = sample(model, prompts, GREEDY10, eos_token_id=1, pad_token_id=PAD)
    decoder = rollout_module._DECODERS[model][1]
    again = sample(model, prompts, GREEDY10, eos_token_id=1, pad_token_id=PAD)
    assert rollout_module._DECODERS[model][1] is decoder and responses(again) == responses(first)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(-1.0)
    changed = sample(model, prompts, GREEDY10, eos_token_id=1, pad_token_id=PAD)
    assert rollout_module._DECODERS[model][1] is not decoder
    assert responses(changed) != responses(first)
    assert responses(changed) == hf_greedy(model, changed, 10, eos=1)  # the new weights, not the cached ones
    trainable = tiny_llama()
    sample(trainable, prompts, GREEDY10, eos_token_id=1, pad_token_id=PAD)
    assert trainable not in rollout_module._DECODERS
    alive = weakref.ref(model)
    del model, decoder
    gc.collect()
    assert alive() is None


def test_prefill_chunks_are_the_cheapest_split_of_the_sorted_prompts():
    """Against every split of the length-sorted prompts into consecutive chunks (brute force): the cheapest one
    (positions padded to each chunk's longest + PREFILL_CHUNK_COST per chunk, token cap respected); every prompt
    once, each chunk sorted so its last prompt is its longest."""
    import itertools

    from alignkit.rollout import PREFILL_CHUNK_COST, PREFILL_CHUNK_TOKENS, _prefill_chunks

    def cost(chunks, lengths):
        return sum(len(c) * max(lengths[i] for i in c) + PREFILL_CHUNK_COST for c in chunks)

    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = 1 + trial % 9
        lengths = torch.randint(1, 90 if trial % 2 else 700, (n,), generator=g).tolist()
        chunks = _prefill_chunks(lengths)
        assert sorted(i for c in chunks for i in c) == list(range(n))
        assert all([lengths[i] for i in c] == sorted(lengths[i] for i in c) for c in chunks)
        assert all(len(c) == 1 or len(c) * lengths[c[-1]] <= PREFILL_CHUNK_TOKENS for c in chunks)
        order = sorted(range(n), key=lengths.__getitem__)
        best = min(
            cost(parts, lengths)
            for cuts in itertools.chain.from_iterable(itertools.combinations(range(1, n), k) for k in range(n))
            for parts in [[order[a:b] for a, b in zip((0, *cuts), (*cuts, n))]]
            if all(len(p) == 1 or len(p) * lengths[p[-1]] <= PREFILL_CHUNK_TOKENS for p in parts)
        )
        assert cost(chunks, lengths) == best


def test_prefill_in_many_chunks_equals_hf_forward(monkeypatch):
    """With chunks free (cost 0) every prompt gets its own prefill chunk: the log-probs still equal one HF forward
    over the finished sequences."""
    from alignkit.rollout import _prefill_chunks

    monkeypatch.setattr(rollout_module, "PREFILL_CHUNK_COST", 0)
    prompts = chat_like_prompts()
    assert len(_prefill_chunks([len(p) for p in prompts])) == len(prompts)
    model = tiny_llama()
    rollout = sample(model, prompts, SamplingConfig(max_new_tokens=8, **FP32), eos_token_id=1, pad_token_id=PAD,
                     generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(rollout.logprobs, forward_logprobs(model, rollout), atol=1e-4, rtol=0)


def test_an_enclosing_autocast_does_not_change_the_samples():
    """The sampler's precision is SamplingConfig.dtype: inside a caller's bf16 autocast, fp32 sampling gives the
    same tokens and log-probs as outside it (and the packed weights, which autocast cannot cast, still work)."""
    model = tiny_llama()
    config = SamplingConfig(max_new_tokens=8, **FP32)
    outside = sample(model, chat_like_prompts(), config, eos_token_id=1, pad_token_id=PAD,
                     generator=torch.Generator().manual_seed(6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = sample(model, chat_like_prompts(), config, eos_token_id=1, pad_token_id=PAD,
                        generator=torch.Generator().manual_seed(6))
    assert responses(inside) == responses(outside)
    torch.testing.assert_close(inside.logprobs, outside.logprobs, atol=0, rtol=0)
