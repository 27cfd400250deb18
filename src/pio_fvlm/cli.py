"""The ``pio-fvlm`` command.

    pio-fvlm demo                      # offline: the shipped tiny VLM, answers with and without pruning
    pio-fvlm run --model ID_OR_PATH --image photo.jpg --prompt "What is shown?" --budget 64
    pio-fvlm bench [options]           # speed benchmark (see pio-fvlm bench --help)
    pio-fvlm lmms-task --out DIR       # an offline lmms-eval task (--include_path DIR --tasks pio_shapes)
    pio-fvlm serve [MODEL] --budget 64 # OpenAI-compatible server with dynamic batching, pruned
    pio-fvlm batch IN.jsonl OUT.jsonl --model ID_OR_PATH --budget 64   # offline batch inference
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from typing import Any

import torch

COMMANDS = {
    "demo": "offline demo on the shipped tiny VLM: answers with all tokens and pruned, timings, picture",
    "run": "one image + prompt through a real checkpoint, pruned and unpruned",
    "bench": "speed benchmark: full vs pio vs ideal vs the authors' style",
    "lmms-task": "write the offline lmms-eval task pio_shapes (for --include_path)",
    "serve": "an OpenAI-compatible server whose model prunes (requests batched)",
    "batch": "answer every row (image + prompt) of a JSONL or Parquet file, resumably",
}


def _median_seconds(fn: Any, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def demo(argv: list[str]) -> int:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from . import last_selection, unwrap, wrap
    from . import shapes_vlm as sv
    from . import synthetic as syn
    from .viz import draw_kept, kept_grids, side_by_side, with_caption

    p = argparse.ArgumentParser(prog="pio-fvlm demo", description=demo.__doc__)
    p.add_argument("--budget", type=int, default=64, help="visual tokens kept of the toy's 576 (default 64)")
    p.add_argument("--seed", type=int, default=3, help="seed of the scene drawn for the picture and questions")
    p.add_argument("--eval", type=int, default=100, help="held-out questions to score (0: skip)")
    p.add_argument("--out", default="pio_fvlm_demo.png", help="where to write the kept-token picture")
    args = p.parse_args(argv)
    if not (sv.ASSET_DIR / "model.safetensors").exists():
        print(f"no shipped model at {sv.ASSET_DIR}; train it with training/train_tiny_vlm.py")
        return 1
    model = LlavaForConditionalGeneration.from_pretrained(sv.ASSET_DIR).eval()
    processor = AutoProcessor.from_pretrained(sv.ASSET_DIR)
    rng = random.Random(args.seed)
    objects = syn.random_scene(rng, 3)
    image = syn.render(objects, rng)
    qas = syn.questions(objects, rng)
    from PIL import Image

    pil = Image.fromarray(image)
    scene = ", ".join(f"{o.color} {o.shape} ({syn.COLUMNS[o.col]})" for o in objects)
    print(f"scene: {scene}; {sv.N_VISUAL} visual tokens, budget {args.budget}\n")

    def answer(qa: syn.QA) -> tuple[str, dict[str, torch.Tensor]]:
        inputs = processor(images=pil, text=f"{sv.IMAGE_TOKEN} " + syn.qa_text(qa, with_answer=False),
                           return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=1, do_sample=False)
        return processor.tokenizer.decode(out[0, -1:]).strip(), inputs

    rows = []
    for qa in qas:
        full, inputs = answer(qa)
        wrap(model, budget=args.budget)
        pruned, _ = answer(qa)
        kept = (last_selection(model) or [torch.empty(0, dtype=torch.long)])[0]
        unwrap(model)
        rows.append((qa, full, pruned))
    width = max(len(qa.question) for qa, _, _ in rows)
    print(f"{'question':<{width}}  truth     all 576   {args.budget} kept")
    for qa, full, pruned in rows:
        print(f"{qa.question:<{width}}  {qa.answer:<8}  {full:<8}  {pruned}")

    with torch.inference_mode():
        full_s = _median_seconds(lambda: model(**inputs))
        wrap(model, budget=args.budget)
        pruned_s = _median_seconds(lambda: model(**inputs))
        unwrap(model)
    print(f"\nprefill (median of 5): all tokens {full_s * 1e3:.1f} ms, {args.budget} kept {pruned_s * 1e3:.1f} ms "
          f"({full_s / pruned_s:.2f}x)")
    grid = kept_grids(kept, inputs["input_ids"][0], model.config.image_token_id, sv.N_VISUAL)[0]
    qa, full, pruned = rows[-1]
    caption = [f"question: {qa.question}   truth: {qa.answer}",
               f"answer with all {sv.N_VISUAL} tokens: {full}   with {args.budget} kept: {pruned}",
               f"right: the {args.budget} of {sv.N_VISUAL} visual tokens kept from layer 1 on",
               "(outlined, in colour); dropped tokens are darkened"]
    with_caption(side_by_side([pil, draw_kept(pil, grid)]), caption).save(args.out)
    print(f"kept tokens of the last question drawn over the image: {args.out}")

    if args.eval:
        full_acc, pruned_acc, blank_acc = sv.demo_accuracy(model, args.eval, args.budget)
        print(f"held-out accuracy on {args.eval} questions: all tokens {full_acc:.1%}, {args.budget} kept "
              f"{pruned_acc:.1%}, blank image {blank_acc:.1%} (the answer prior)")
    return 0


def run(argv: list[str]) -> int:
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from . import last_selection, unwrap, wrap
    from .models import visual_token_counts

    p = argparse.ArgumentParser(prog="pio-fvlm run", description=run.__doc__)
    p.add_argument("--model", required=True, help="HF id or local folder of a supported VLM")
    p.add_argument("--image", required=True, help="path of the image file")
    p.add_argument("--prompt", required=True, help="the question; the chat template is applied when the "
                   "processor has one")
    p.add_argument("--budget", type=float, default=64, help="int: tokens kept; < 1: fraction")
    p.add_argument("--layer", type=int, default=1, help="the decoder layer from which on tokens are pruned")
    p.add_argument("--attn", default="sdpa", help="attention implementation (eager, sdpa, flash_attention_2)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights' dtype (auto: the checkpoint's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to run")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    args = p.parse_args(argv)
    budget: float | int = int(args.budget) if args.budget >= 1 else args.budget
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype, attn_implementation=args.attn,
                                                        device_map=args.device).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    image = Image.open(args.image).convert("RGB")
    if getattr(processor, "chat_template", None):
        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
        text = processor.apply_chat_template(chat, add_generation_prompt=True)
    else:
        token = getattr(processor, "image_token", "<image>")
        text = f"{token} {args.prompt}"
    inputs = processor(images=image, text=text, return_tensors="pt").to(model.device)
    if "pixel_values" in inputs and model.dtype != torch.float32:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    n_new = args.max_new_tokens

    def generate() -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(**inputs, max_new_tokens=n_new, do_sample=False)

    def prefill() -> Any:
        with torch.inference_mode():
            return model(**inputs, logits_to_keep=1)

    length = inputs["input_ids"].shape[1]
    results = {}
    for name in ("all tokens", "pruned"):
        if name == "pruned":
            wrap(model, budget=budget, layer=args.layer)
        out = generate()
        total = _median_seconds(generate, 3)
        first = _median_seconds(prefill, 3)
        results[name] = (processor.decode(out[0, length:], skip_special_tokens=True), first, total)
        if name == "pruned":
            kept = (last_selection(model) or [torch.empty(0, dtype=torch.long)])[0]
            unwrap(model)
    n_visual = visual_token_counts(model, inputs["input_ids"])[0]
    for name, (text_out, first, total) in results.items():
        print(f"[{name}] prefill {first * 1e3:.1f} ms, generate {total * 1e3:.1f} ms: {text_out!r}")
    print(f"visual tokens kept: {len(kept)} of {n_visual}; prefill speedup "
          f"{results['all tokens'][1] / results['pruned'][1]:.2f}x, generate speedup "
          f"{results['all tokens'][2] / results['pruned'][2]:.2f}x")
    return 0


def lmms_task(argv: list[str]) -> int:
    """Write the offline lmms-eval task pio_shapes (questions on the shipped tiny VLM's task)."""
    from . import shapes_vlm as sv
    from .integrations.shapes_task import write_shapes_task

    p = argparse.ArgumentParser(prog="pio-fvlm lmms-task", description=lmms_task.__doc__)
    p.add_argument("--out", required=True, help="folder to write the task into")
    p.add_argument("--items", type=int, default=200, help="questions in the task")
    args = p.parse_args(argv)
    folder = write_shapes_task(args.out, items=args.items)
    print(f"wrote the pio_shapes task ({args.items} questions) to {folder}; run it with\n"
          f"  lmms-eval --model pio_fvlm --model_args pretrained={sv.ASSET_DIR},budget=64 "
          f"--include_path {folder} --tasks pio_shapes --batch_size 8")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: pio-fvlm <command> [options]\n\ncommands:")
        for name, what in COMMANDS.items():
            print(f"  {name:<10} {what}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from .bench import main as bench_main

        bench_main(rest)
        return 0
    if command in ("serve", "batch"):
        from .serving import commands

        return commands.serve(rest) if command == "serve" else commands.batch(rest)
    return {"demo": demo, "run": run, "lmms-task": lmms_task}[command](rest)


if __name__ == "__main__":
    raise SystemExit(main())
