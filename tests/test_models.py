"""The bundled model: the cached safetensors conversion is the GGUF model, exactly; loading resolves names and
run directories; precision choice follows the hardware."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from alignkit.models import _bundled_gguf, bf16_is_fast, load_model, resolve, torch_dtype


def test_gguf_import_gives_the_gguf_models_logits():
    converted, tokenizer = load_model("smollm2-135m")
    assert not hasattr(converted.config, "quantization_config")  # trainable and saveable
    gguf_dir, gguf_file = _bundled_gguf("smollm2-135m")
    reference = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        ours, theirs = converted(ids).logits, reference(ids).logits
    assert ours.shape == (1, ids.shape[1], 49152)
    assert torch.equal(ours, theirs)
    assert len(tokenizer) == 49152 and tokenizer.eos_token == "<|im_end|>"


def test_run_directory_resolves_to_final_then_newest_checkpoint(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-10").mkdir()
    assert resolve(str(tmp_path)) == str(tmp_path / "checkpoint-10")
    (tmp_path / "final").mkdir()
    assert resolve(str(tmp_path)) == str(tmp_path / "final")
    assert resolve("some/hub-id") == "some/hub-id"


def test_auto_dtype_follows_the_cpu(monkeypatch):
    monkeypatch.delenv("ALIGNKIT_BF16", raising=False)  # the detection itself, even in a run that forces the path
    has_native_bf16 = any(f in open("/proc/cpuinfo").read() for f in ("avx512_bf16", "amx_bf16"))
    if not torch.cuda.is_available():
        assert bf16_is_fast() == has_native_bf16
    assert torch_dtype("auto") == (torch.bfloat16 if bf16_is_fast() else torch.float32)
    assert torch_dtype("fp32") == torch.float32
