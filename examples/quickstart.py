"""Offline quickstart: wrap a random LLaVA-1.5-shaped model and generate.

    python examples/quickstart.py

No download: the model is the benchmark's LLaVA-1.5 miniature (576 visual tokens per image,
8 layers here) with random weights, so the answers are gibberish; the point is the mechanics: one line to
wrap, `generate` as always, which tokens were kept, and the time saved in prefill.
For a real checkpoint see the README.
"""

from __future__ import annotations

import time

import torch

import pio_fvlm
from pio_fvlm.bench_models import IMAGE_TOKEN_ID, SHAPES, miniature_llava, shape_inputs


def prefill_seconds(model: torch.nn.Module, inputs: dict[str, torch.Tensor], repeats: int = 5) -> float:
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    torch.manual_seed(0)
    model = miniature_llava(num_layers=8, hidden=256)
    inputs = shape_inputs(model, SHAPES["miniature"], batch=1, text_tokens=45)
    n_visual = int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum())
    full_time = prefill_seconds(model, inputs)
    full_answer = model.generate(**inputs, max_new_tokens=8, do_sample=False)

    model = pio_fvlm.wrap(model, budget=64)  # <- the whole integration
    pruned_answer = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    kept = pio_fvlm.last_selection(model)[0]
    pruned_time = prefill_seconds(model, inputs)

    length = inputs["input_ids"].shape[1]
    print(f"visual tokens: {n_visual}, kept: {len(kept)} (positions {kept[:8].tolist()} ...)")
    print(f"answer, all tokens : {full_answer[0, length:].tolist()}")
    print(f"answer, 64 kept    : {pruned_answer[0, length:].tolist()}  (random weights: answers differ)")
    print(f"prefill median: full {full_time * 1e3:.1f} ms, pruned {pruned_time * 1e3:.1f} ms, "
          f"speedup {full_time / pruned_time:.2f}x")
    pio_fvlm.unwrap(model)
    print("unwrapped: the model is exactly the original again")


if __name__ == "__main__":
    main()
