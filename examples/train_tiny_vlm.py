"""Train the tiny LLaVA on the synthetic shapes task; resumable.

    python examples/train_tiny_vlm.py --steps 4000            # about 2 h on 2 CPU cores
    python examples/train_tiny_vlm.py --steps 4000            # again: resumes where it stopped

Saves the model + processor (``save_pretrained``) to ``src/pio_fvlm/assets/tiny-llava-shapes``
every ``--save-every`` steps, with ``training_state.json`` (step, curriculum, last eval). The
optimizer state goes to ``--state-dir`` (not committed); without it a resume restarts AdamW's
moments from the saved weights. What helps such a model leave the answer prior (see
shared/TINY-VLM-NOTES.md): 8 question/answer pairs per image in one teacher-forced sequence,
and a curriculum on the number of objects.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from pio_fvlm import shapes_vlm as sv


def curriculum(step: int) -> int:
    """Most objects per scene at this step: one first, then more."""
    return 1 if step < 300 else 2 if step < 800 else 3 if step < 1500 else 4


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--out", default=str(sv.ASSET_DIR))
    p.add_argument("--state-dir", default="examples/.train_state")
    args = p.parse_args()
    out, state_dir = Path(args.out), Path(args.state_dir)
    torch.manual_seed(0)

    info_path = out / "training_state.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {"step": 0, "history": []}
    if info["step"] > 0:
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(out)
        print(f"resuming at step {info['step']}")
    else:
        model = sv.build_model()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    opt_path = state_dir / "optimizer.pt"
    if info["step"] > 0 and opt_path.exists():
        optimizer.load_state_dict(torch.load(opt_path))
    processor = sv.build_processor()
    split = sv.eval_set(150)
    rng = random.Random(1234 + info["step"])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f} M parameters; {args.steps - info['step']} steps to go")

    step, t0, losses = info["step"], time.time(), []
    while step < args.steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        batch = sv.training_batch(rng, args.batch, curriculum(step))
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        step += 1
        if step % 25 == 0:
            rate = (time.time() - t0) / 25
            t0 = time.time()
            print(f"step {step} loss {sum(losses[-25:]) / 25:.3f} objects<={curriculum(step)} {rate:.2f} s/step",
                  flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            acc = sv.evaluate(model, split)
            model.train()
            print("eval", json.dumps({k: round(v, 3) for k, v in acc.items()}), flush=True)
            info["history"].append({"step": step, "loss": sum(losses[-50:]) / len(losses[-50:]), "eval": acc})
        if step % args.save_every == 0 or step == args.steps:
            model.save_pretrained(out)
            processor.save_pretrained(out)
            info["step"] = step
            info_path.write_text(json.dumps(info, indent=1))
            state_dir.mkdir(parents=True, exist_ok=True)
            torch.save(optimizer.state_dict(), opt_path)
            print(f"saved step {step} to {out}", flush=True)


if __name__ == "__main__":
    main()
