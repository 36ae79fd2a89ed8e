"""``make demo``: a short LoRA SFT of the bundled SmolLM2-135M-Instruct on the bundled instruction set.

Prints the held-out loss before and after, and where the model was saved. Later stages of the alignment
quick start (reward model, DPO, PPO) build on the same engine.
"""

from __future__ import annotations

import sys
import time

from alignkit.algos import sft
from alignkit.config import DataConfig, ModelConfig
from alignkit.engine import TrainConfig


def main(output_dir: str = "runs/demo-sft") -> None:
    cfg = sft.SFTConfig(
        model=ModelConfig(model="smollm2-135m", lora=True, lora_r=16, lora_alpha=32),
        data=DataConfig(data="bundled:instructions_train", eval_data="bundled:instructions_test", max_length=512),
        train=TrainConfig(output_dir=output_dir, max_steps=30, batch_size=8, lr=3e-4, warmup_steps=3,
                          report_to="tensorboard"),
    )
    started = time.time()
    path = sft.train(cfg)
    print(f"demo finished in {time.time() - started:.0f} s; try: .venv/bin/alignkit generate --model {path} "
          "--prompt 'Give me three tips for better sleep.'")


if __name__ == "__main__":
    main(*sys.argv[1:])
