"""Decode tokens/s on the default model: base vs MixLoRA (attention merged) eager vs compiled decoding.

Random non-zero expert weights (B ~ N(0, 0.01)), greedy 32 new tokens after a 16-token prompt, one thread,
base and compiled MixLoRA interleaved; checks that the compiled model generates the same tokens::

    python scripts/decode_compiled.py topk
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from transformers import GenerationConfig

from loramix import compile_decoding, merge_attention, tune_malloc
from loramix.bench import fresh_copy, frozen_base, make_loramix


def main() -> None:
    router = sys.argv[1] if len(sys.argv) > 1 else "topk"
    tune_malloc()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = frozen_base()
    mix, _ = make_loramix(fresh_copy(base), router=router)
    with torch.no_grad():
        for name, p in mix.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    mix = merge_attention(mix.eval())
    prompt = torch.randint(0, base.config.vocab_size, (1, 16))
    cfg = GenerationConfig(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0, eos_token_id=None)

    def generate(model: torch.nn.Module) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=cfg)
        return out, 32 / (time.perf_counter() - start)

    eager_tokens, _ = generate(mix)
    eager = [generate(mix)[1] for _ in range(3)]
    start = time.perf_counter()
    compile_decoding(mix)
    compiled_tokens, _ = generate(mix)
    print(f"first compiled generate {time.perf_counter() - start:.1f} s; same tokens as eager:",
          torch.equal(compiled_tokens, eager_tokens))
    rates: dict[str, list[float]] = {"base": [], "compiled": []}
    for _ in range(4):
        rates["base"].append(generate(base)[1])
        rates["compiled"].append(generate(mix)[1])
    b = statistics.median(rates["base"])
    for name, v in (("base", rates["base"]), ("mixlora eager", eager), ("mixlora compiled", rates["compiled"])):
        print(f"{name}: {statistics.median(v):.2f} tok/s, {statistics.median(v) / b:.2f}x base")


if __name__ == "__main__":
    main()
