"""Fresh 4-layer tower: train shape on OBJECT-POOLED projector features (mean over each object's
patches -> linear head) or per-patch ('patch'); boost = position boost. Reports held-out pooled
accuracy and a per-patch accuracy of the same head. Usage: pooled_shape.py pooled|patch BOOST SECONDS"""
import random
import sys
import time

import numpy as np
import torch

import tiny_vlm as tv
from pio_fvlm import shapes_vlm as sv
from pio_fvlm import synthetic as syn

torch.set_num_threads(1)
mode, boost, budget_s = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
torch.manual_seed(0)
model = tv.build_model(vision_layers=4)
if "stem" in sys.argv:  # the oriented-edge stem (pio_fvlm.shapes_vlm.oriented_edge_stem)
    print("stem filters", tv.oriented_edge_stem(model))
if boost: tv.boost_patch_positions(model, boost)
class Std(torch.nn.Module):  # per-dimension standardisation over the batch's tokens (BatchNorm without affine)
    def __init__(s): super().__init__(); s.bn = torch.nn.BatchNorm1d(128, affine=False)
    def forward(s, x): return s.bn(x.reshape(-1, 128)).reshape(x.shape)
head = torch.nn.Sequential(Std(), torch.nn.Linear(128, 3)) if "bn" in sys.argv else torch.nn.Sequential(torch.nn.LayerNorm(128), torch.nn.Linear(128, 3)) if "norm" in sys.argv else torch.nn.Linear(128, 3)
params = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(), *head.parameters()]
import os

if os.environ.get("FREEZE"): params = list(head.parameters())
opt = torch.optim.AdamW(params, lr=float(os.environ.get("LR", "2e-3")), weight_decay=0.01)
def batch(n, rng):
    imgs, owners, shapes = [], [], []
    for _ in range(n):
        objs = syn.random_scene(rng, rng.randint(1, 4)); img, owner = syn.render_with_owner(objs, rng)
        imgs.append(img); owners.append(syn.patch_owner(owner)); shapes.append([syn.SHAPES.index(o.shape) for o in objs] + [-1] * (4 - len(objs)))
    return sv.pixels(imgs), torch.from_numpy(np.stack(owners)), torch.tensor(shapes)
def feats(px):
    f = model.model.get_image_features(pixel_values=px)
    f = f.pooler_output if hasattr(f, "pooler_output") else f
    f = torch.stack(list(f)) if isinstance(f, (list, tuple)) else f
    return f.reshape(px.shape[0], 576, -1)
def pooled(f, owner, shapes):
    onehot = torch.stack([(owner == k).float() for k in range(4)], 1)  # (B,4,576)
    cnt = onehot.sum(-1, keepdim=True)
    ok = (shapes >= 0) & (cnt[..., 0] > 0)
    pool = onehot @ f / cnt.clamp(min=1)
    return pool[ok], shapes[ok]
test = batch(48, random.Random(99)); rng = random.Random(5); t0 = time.time(); step = 0
while time.time() - t0 < budget_s:
    step += 1
    px, owner, shapes = batch(8, rng)
    f = feats(px)
    if mode == "pooled":
        x, y = pooled(f, owner, shapes); loss = torch.nn.functional.cross_entropy(head(x), y)
    else:
        obj = owner >= 0
        lab = torch.gather(shapes, 1, owner.clamp(min=0))
        loss = torch.nn.functional.cross_entropy(head(f)[obj], lab[obj])
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 50 == 0:
        head.eval()
        with torch.no_grad():
            f = feats(test[0]); x, y = pooled(f, test[1], test[2])
            pacc = (head(x).argmax(-1) == y).float().mean()
            obj = test[1] >= 0; lab = torch.gather(test[2], 1, test[1].clamp(min=0))
            patch_acc = (head(f).argmax(-1)[obj] == lab[obj]).float().mean()
        print(mode, boost, step, f"loss {loss.item():.3f} pooled acc {pacc:.3f} patch acc {patch_acc:.3f} {(time.time()-t0)/step:.2f}s/step", flush=True); head.train()
