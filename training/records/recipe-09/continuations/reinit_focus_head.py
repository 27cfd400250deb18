"""Diagnostic: re-initialise one LM head's query/key rows (and their AdamW moments) in a saved run.

    python reinit_focus_head.py MODEL_DIR STATE_DIR [--layer 2 --head 0]
"""
import argparse
import importlib.util
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

TRAIN_SCRIPT = Path(__file__).resolve().parents[4] / "examples" / "train_tiny_vlm.py"

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("state")
p.add_argument("--layer", type=int, default=2)
p.add_argument("--head", type=int, default=0)
a = p.parse_args()
spec = importlib.util.spec_from_file_location("train_tiny_vlm", TRAIN_SCRIPT)
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)

model = LlavaForConditionalGeneration.from_pretrained(a.model)
attn = model.model.language_model.layers[a.layer].self_attn
d = attn.head_dim
rows = slice(a.head * d, (a.head + 1) * d)
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for proj in (attn.q_proj, attn.k_proj):
        proj.weight[rows] = torch.randn(proj.weight[rows].shape, generator=g) * model.config.text_config.initializer_range
# the optimizer state indexes parameters in the training script's group order (the heads come last)
order = [t for group in train.parameter_groups(model) for t in group]
opt = torch.load(f"{a.state}/optimizer.pt")
for proj in (attn.q_proj, attn.k_proj):
    idx = next(i for i, t in enumerate(order) if t is proj.weight)
    st = opt["state"][idx]
    assert st["exp_avg"].shape == proj.weight.shape, (st["exp_avg"].shape, proj.weight.shape)
    st["exp_avg"][rows] = 0
    st["exp_avg_sq"][rows] = 0
torch.save(opt, f"{a.state}/optimizer.pt")
model.save_pretrained(a.model)
print("re-initialised layer", a.layer, "head", a.head, "q/k rows", rows)
