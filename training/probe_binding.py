"""Why a tiny VLM answers "what color is the <shape> ?" with another object's colour.

    python training/probe_binding.py --model src/pio_fvlm/assets/tiny-llava-shapes   # ~2 min a model

A diagnostic for the demo model's training recipe (docs/quality.md). Two measurements:

1. Per-patch shape: for every visual token that lies on an object, a closed-form ridge probe
   (``probe_tower_shape.ridge_accuracy``) reads the object's shape off the token's hidden state at
   the input of each LM decoder layer (fitted on 120 scenes, scored on 120 others). To find the
   object a question names, the LM's attention needs shape in the tokens it looks at, not only
   in an object's mean (what ``--aux-shape pooled`` trains).
2. Where the heads look: on colour questions about scenes of 2 - 4 objects (the validation seed's
   first 1,200 questions), the attention weight each head of each layer puts, from the answer
   position, on the named object's tokens and on the other objects' tokens, for right and for
   wrong answers (eager attention).
"""

from __future__ import annotations

import argparse
import collections

import numpy as np
import torch

from pio_fvlm import shapes_vlm as sv
from pio_fvlm import synthetic as syn
from probe_tower_shape import ridge_accuracy  # the script's folder is on sys.path


def forward_in_chunks(model, items: list, **outputs: bool):
    """Yield (chunk, image start per row, model output) over ``items`` ((image, objects, qa), owner)
    in batches of 24 prompts, left-padded; ``outputs`` e.g. ``output_attentions=True``."""
    for start in range(0, len(items), 24):
        chunk = items[start:start + 24]
        input_ids, mask = sv.prompt_batch([qa for (_, _, qa), _ in chunk])
        out = model(input_ids=input_ids, attention_mask=mask, pixel_values=sv.pixels([item[0] for item, _ in chunk]),
                    **outputs)
        yield chunk, (mask == 0).sum(-1).tolist(), out  # the image starts after the left padding


@torch.no_grad()
def per_patch_shape(model, n_scenes: int = 240, seed: int = 424_242) -> list[float]:
    """Held-out per-patch shape accuracy at the input of each LM layer (one float per layer)."""
    items = sv.eval_set_with_owners(n_scenes, seed=seed)
    layers = len(model.model.language_model.layers)
    features: list[list[list[np.ndarray]]] = [[[] for _ in range(layers)] for _ in range(2)]
    labels: list[list[np.ndarray]] = [[], []]
    seen = 0
    for chunk, image_starts, out in forward_in_chunks(model, items, output_hidden_states=True):
        for b, ((_, objects, _), owner) in enumerate(chunk):
            half = int(seen >= len(items) // 2)  # first half fits the probe, second half scores it
            seen += 1
            on = torch.from_numpy(owner >= 0)
            labels[half].append(np.array([syn.SHAPES.index(objects[k].shape) for k in owner[owner >= 0]]))
            for layer in range(layers):
                tokens = out.hidden_states[layer][b, image_starts[b]:image_starts[b] + sv.N_VISUAL]
                features[half][layer].append(tokens[on].numpy())
    fit_y, test_y = (np.concatenate(y) for y in labels)
    return [ridge_accuracy((np.concatenate(features[0][layer]), fit_y), (np.concatenate(features[1][layer]), test_y))
            for layer in range(layers)]


@torch.no_grad()
def colour_question_attention(model, n: int = 1200, seed: int = sv.VALIDATION_SEED) -> dict[bool, dict]:
    """{answered right: {"count": questions, "in scene": answers that are a colour in the scene,
    "named": (layers, heads), "others": (layers, heads)}}: mean attention weight from the answer
    position on the named object's / the other objects' tokens."""
    items = [(item, owner) for item, owner in sv.eval_set_with_owners(n, seed=seed)
             if item[2].kind == "color" and len(item[1]) > 1]
    sums: dict[bool, dict] = collections.defaultdict(lambda: {"count": 0, "named": 0.0, "others": 0.0, "in scene": 0})
    for chunk, image_starts, out in forward_in_chunks(model, items, output_attentions=True):
        weights = torch.stack(out.attentions, dim=1)[:, :, :, -1]  # (B, layers, heads, L) from the answer position
        for b, ((_, objects, qa), owner) in enumerate(chunk):
            said = syn.VOCAB[int(out.logits[b, -1].argmax())]
            right = said == qa.answer
            named = next(k for k, o in enumerate(objects) if o.color == qa.answer and o.shape in qa.question.split())
            on_image = weights[b, ..., image_starts[b]:image_starts[b] + sv.N_VISUAL]  # (layers, heads, 576)
            owner = torch.from_numpy(owner)
            entry = sums[right]
            entry["count"] += 1
            entry["in scene"] += any(o.color == said for o in objects)
            entry["named"] = entry["named"] + on_image[..., owner == named].sum(-1)
            entry["others"] = entry["others"] + on_image[..., (owner >= 0) & (owner != named)].sum(-1)
    return {right: {**e, "named": e["named"] / e["count"], "others": e["others"] / e["count"]}
            for right, e in sums.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="a checkpoint folder (repeatable)")
    args = p.parse_args()
    from transformers import LlavaForConditionalGeneration

    for path in args.model:
        model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
        print(path)
        shape = per_patch_shape(model)
        per_layer = ", ".join(f"{layer}: {acc:.3f}" for layer, acc in enumerate(shape))
        print(f"  per-patch shape at the input of LM layer {per_layer} (chance {1 / len(syn.SHAPES):.2f})")
        for right, e in sorted(colour_question_attention(model).items(), reverse=True):
            print(f"  colour questions answered {'right' if right else 'wrong'} ({e['count']}, "
                  f"{e['in scene']} with a colour in the scene): "
                  "attention on the named object / the others, per layer and head")
            for layer, (named, others) in enumerate(zip(e["named"], e["others"])):
                heads = "  ".join(f"h{h} {a:.2f}/{o:.2f}" for h, (a, o) in enumerate(zip(named, others)))
                print(f"    layer {layer}: {heads}")


if __name__ == "__main__":
    main()
