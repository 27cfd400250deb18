"""Train the tiny LLaVA on the synthetic shapes task; resumable.

    python training/train_tiny_vlm.py                  # 2,500 steps, about 1 h on 2 CPU cores
    python training/train_tiny_vlm.py                  # again: resumes where it stopped
    python training/train_tiny_vlm.py --steps 6000 --lr 1e-3   # extend a finished run (the cosine
                                                               # schedule spans the new total)
    python training/train_tiny_vlm.py --steps 12000 --lr 6e-4 --restart-schedule --drop 0.5
                                  # extend with a fresh warmup + cosine, thinning the visual tokens
                                  # of half the sequences from decoder layer 1 on (the shipped
                                  # checkpoint's last run; see docs/quality.md)

Stages for a model that must bind attributes (docs/quality.md has the measured history):

    --vision-layers 4 --position-boost 1.0   # a deeper tower, and a 2-D position code at the
                                             # patches' scale (once per checkpoint)
    --vision-only --aux-balanced --aux-weights 1,4,1   # tower + projector on the per-patch loss
                                             # alone, ~1 s/step: shape read off every object patch
    --focus 1.0 --focus-layer 2 --focus-head 0   # attention supervision: one head looks at the
                                             # object the question names (colour questions)

The shipped checkpoint, in one run from scratch (1 h 33 min on 2 CPU cores; 93.0 % on the test split,
docs/quality.md; its records: training/records/recipe-12-shipped/):

    python training/train_tiny_vlm.py --out runs/demo --state-dir runs/demo-state --steps 3400 \\
        --vision-first 400 --ramp 1000 --vision-layers 4 --position-boost 6.0 --aux-balanced \\
        --aux-weights 1,4,1 --focus 1.0 --focus-relative 1.0 --drop 0.5 \\
        --question-weights color=2,position=1.5,count=0.5 --stem --aux-shape pooled \\
        --aux-shape-both-from 1400 --vision-lr 2e-4 --tower-lr 2e-4

What each setting does (the logs, evaluations and retention of every run that measured them are in
training/records/recipe-01 .. recipe-12-shipped): --position-boost is relative to the patch embeddings' norm when
applied (a fresh tower needs ~6); --stem and --aux-shape pooled get shape learnt at all in a fresh tower
(the per-patch shape target is ill-posed for interior patches, and --vision-lr 2e-3 is too high for it:
training/probe_tower_shape.py); the per-token target from step 1,400 (--aux-shape-both-from) gives
tokens their object's shape; --focus-relative makes the supervised head tell the named object from the
others (training/probe_binding.py), which is what colour questions need.

Saves the model + processor (``save_pretrained``) to ``src/pio_fvlm/assets/tiny-llava-shapes``
every ``--save-every`` steps, with ``training_state.json`` (step, curriculum, last eval). The
optimizer state goes to ``--state-dir`` (not committed); without it a resume restarts AdamW's
moments from the saved weights. What helps such a model leave the answer prior (the runs in
training/records/ show each step): many question/answer pairs per image in one sequence (16), each pair
seeing only the image and itself (a 4-D mask; with plain causal packing the model learnt to copy
earlier answers: low training loss, poor accuracy on a question alone), a curriculum on the
number of objects, and an auxiliary per-patch loss that tells the vision tower early what the
questions are about (colour, shape, column of each patch's object).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

import tiny_vlm as tv
from pio_fvlm import shapes_vlm as sv


def curriculum(step: int, ramp: int) -> int:
    """Most objects per scene at this step: one for the first third of the ramp (to learn to see
    colour, shape and column), then up to two, three, and four from the end of the ramp on."""
    return min(4, 1 + int(3 * step / ramp)) if step < ramp else 4


def lr_at(step: int, total: int, peak: float, warmup: int = 200, start: int = 0) -> float:
    """Linear warmup from ``start``, then cosine down to a tenth of ``peak`` at ``total``."""
    step, total = step - start, total - start
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def learning_rates(step: int, args: argparse.Namespace, start: int) -> tuple[float, float]:
    """(CLIP tower, everything else) learning rates at ``step``.

    The first stage of ``--vision-first`` peaks at ``--vision-lr``, the rest of the run at ``--lr``
    (warmup + cosine from ``start``), from ``--restart-at`` on at ``--restart-lr`` (a second warmup + cosine
    to ``--steps``); ``--tower-lr`` scales the tower's group to its own peak in both
    stages, so the projector and the auxiliary heads can learn fast while a fresh tower's features are
    kept (a tower at 2e-3 wrecks them; heads at 2e-4 leave even the colour of a patch unread for 400
    steps: training/records/).
    """
    if step < args.vision_first and not args.vision_only:
        lr, peak = lr_at(step, args.vision_first, args.vision_lr), args.vision_lr
    elif args.restart_at is not None and step >= args.restart_at:  # a second warmup + cosine inside the same run
        peak = args.restart_lr if args.restart_lr is not None else args.lr
        lr = lr_at(step, args.steps, peak, start=args.restart_at)
    else:
        lr, peak = lr_at(step, args.steps, args.lr, start=start), args.lr
    return (lr if args.tower_lr is None else lr * args.tower_lr / peak), lr


def parameter_groups(model: torch.nn.Module, *heads: torch.nn.Module) -> tuple[list, list]:
    """The optimizer's two groups, in the order its saved state indexes them: the CLIP tower's
    parameters, then every other parameter of the model followed by the training heads'."""
    tower = list(model.model.vision_tower.parameters())
    in_tower = {id(t) for t in tower}
    trained_heads = [t for head in heads for t in head.parameters()]
    rest = [t for t in [*model.parameters(), *trained_heads] if id(t) not in in_tower]
    return tower, rest


def aux_shape_at(step: int, args: argparse.Namespace) -> str:
    """The auxiliary loss's shape target at ``step``: ``--aux-shape``, or ``both`` from
    ``--aux-shape-both-from`` on (pooled first gets shape learnt early, as in recipe-04;
    the per-patch target then spreads it to every token, which binding needs: docs/quality.md)."""
    if args.aux_shape_both_from is not None and step >= args.aux_shape_both_from:
        return "both"
    return args.aux_shape


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--pairs", type=int, default=16, help="question/answer pairs per image and sequence")
    p.add_argument("--aux", type=float, default=1.0,
                   help="weight of the auxiliary per-patch loss (colour, shape, column of the object under "
                        "each visual token, read from the projector's output by a linear head that is "
                        "discarded after training); 0 = answers only")
    p.add_argument("--aux-balanced", action="store_true",
                   help="object and background patches weigh half each in the auxiliary loss (else the "
                        "background, most of the patches, dominates it)")
    p.add_argument("--aux-weights", default="1,1,1",
                   help="weights of colour, shape and column in the auxiliary loss (e.g. 1,4,1: shape is "
                        "the one a tiny tower learns last)")
    p.add_argument("--vision-only", action="store_true",
                   help="train only the vision tower and projector, on the auxiliary loss (no language-model "
                        "forward: about half the cost of a step); a stage that teaches the tower to see shape "
                        "before the whole model trains again")
    p.add_argument("--vision-first", type=int, default=0, metavar="N",
                   help="steps below N train the tower and projector alone (as --vision-only, at --vision-lr "
                        "on their own cosine schedule), the later ones the whole model (warmup + cosine from N; "
                        "the object curriculum starts again at N): the whole recipe in one run")
    p.add_argument("--vision-lr", type=float, default=2e-3,
                   help="peak learning rate of the --vision-first stage (projector, auxiliary heads, and the "
                        "tower unless --tower-lr)")
    p.add_argument("--tower-lr", type=float, default=None,
                   help="peak learning rate of the CLIP tower's own parameter group in both stages (it follows "
                        "the stage's warmup + cosine); default: the stage's peak (--vision-lr, then --lr), as the "
                        "rest. A fresh tower's features are wrecked at 2e-3 (training/probe_tower_shape.py)")
    p.add_argument("--aux-shape", choices=("patch", "pooled", "both"), default="patch",
                   help="shape target of the auxiliary loss: on every object patch, or once per object on its "
                        "patches' mean (tiny_vlm.object_shape_logits, a standardised linear head): shape is an "
                        "object's property, interior patches cannot show it; or both: the pooled target gets "
                        "shape learnt, the per-patch one puts it in every token, which the LM's attention needs to "
                        "find the object a question names (training/probe_binding.py)")
    p.add_argument("--aux-shape-both-from", type=int, default=None, metavar="STEP",
                   help="with --aux-shape pooled: add the per-patch shape target from STEP on (--aux-shape both "
                        "from then), once the tower has learnt shape at the object level")
    p.add_argument("--stem", action="store_true",
                   help="from scratch: start the tower's patch filters with oriented step edges "
                        "(shapes_vlm.oriented_edge_stem)")
    p.add_argument("--freeze-tower", action="store_true",
                   help="after the vision-only steps, keep the CLIP tower fixed (the projector still learns): "
                        "~30 %% less time per step, but only for a tower that already sees shape")
    p.add_argument("--ramp", type=int, default=1500,
                   help="steps of the curriculum (1 object first, 4 at most from this step on); when "
                        "resuming with a larger --steps, the curriculum does not start over")
    p.add_argument("--drop", type=float, default=0.0,
                   help="share of sequences whose visual tokens are randomly thinned from --drop-layer on "
                        "(to 16..576, log-uniform; see shapes_vlm.token_keep), so that pruning is in distribution")
    p.add_argument("--drop-layer", type=int, default=1, help="decoder layer from which on dropped tokens are hidden")
    p.add_argument("--restart-schedule", action="store_true",
                   help="warm up and decay the learning rate from the step this invocation starts at, "
                        "not from 0 (resuming an interrupted run with this flag warms up again)")
    p.add_argument("--restart-at", type=int, default=None, metavar="STEP",
                   help="in the same run, warm up again from STEP and decay to --steps at --restart-lr: the rate "
                        "back up once the tokens carry shape, when the colour binding must form (docs/quality.md, "
                        "recipe-10's continuation); STEP is a step of the run, not of this invocation")
    p.add_argument("--restart-lr", type=float, default=None,
                   help="peak learning rate from --restart-at on (default: --lr)")
    p.add_argument("--text-layers", type=int, default=None,
                   help="grow the LM to this many decoder layers (new layers start as exact identities, "
                        "see shapes_vlm.deepen_language_model; AdamW's moments restart when it grows)")
    p.add_argument("--vision-layers", type=int, default=None,
                   help="grow the CLIP tower to this many layers (new layers start as exact identities, "
                        "see shapes_vlm.deepen_vision_tower; AdamW's moments restart when it grows); "
                        "from scratch, a tower of this many random layers")
    p.add_argument("--position-boost", type=float, default=0.0,
                   help="add a 2-D sine-cosine code of this many times the patch embeddings' norm to the CLIP "
                        "tower's patch position embeddings before training (shapes_vlm.boost_patch_positions; "
                        "once: a resume does not add it again)")
    p.add_argument("--question-weights", default="",
                   help="e.g. 'color=3,presence=2': draw the question types of each sequence with these "
                        "weights (1 for types not named) instead of one of each type in turn")
    p.add_argument("--focus", type=float, default=0.0,
                   help="weight of an attention-supervision loss: one head (--focus-layer, --focus-head) "
                        "learns to look at the object a question names (teaches colour questions' binding)")
    p.add_argument("--focus-relative", type=float, default=0.0,
                   help="weight of a second --focus term: the named object's share of the head's weight on "
                        "all objects (the background left out), on scenes with more than one object "
                        "(shapes_vlm.focus_loss with among=)")
    p.add_argument("--focus-layer", type=int, default=2)
    p.add_argument("--focus-head", type=int, default=0)
    p.add_argument("--seed", type=int, default=0,
                   help="initial weights and training data (0: the seed of every run recorded in docs/quality.md); "
                        "a resume must be given the seed it started with")
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--out", default=str(sv.ASSET_DIR))
    p.add_argument("--state-dir", default="examples/.train_state")
    args = p.parse_args()
    out, state_dir = Path(args.out), Path(args.state_dir)
    torch.manual_seed(args.seed)

    info_path = out / "training_state.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {"step": 0, "history": []}
    # how this checkpoint was made: every invocation, from the step it started at
    info.setdefault("runs", []).append({"from_step": info["step"], "args": sys.argv[1:]})
    if info["step"] > 0:
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(out)
        print(f"resuming at step {info['step']}")
    else:  # from scratch: a tower of --vision-layers random layers rather than identities appended
        model = tv.build_model(seed=args.seed, vision_layers=args.vision_layers or 2)
        if args.stem:
            print(f"oriented-edge stem: {tv.oriented_edge_stem(model)} patch filters")
    grown = tv.deepen_language_model(model, args.text_layers) if args.text_layers else 0
    if grown:
        print(f"added {grown} identity decoder layers: {args.text_layers} in all")
    grown_vision = tv.deepen_vision_tower(model, args.vision_layers) if args.vision_layers else 0
    if grown_vision:
        print(f"added {grown_vision} identity vision layers: {args.vision_layers} in all")
    grown += grown_vision
    if args.position_boost and "position_boost_at" not in info:
        norm = tv.boost_patch_positions(model, args.position_boost)
        info["position_boost_at"] = info["step"]  # saved with the weights: a resume must not add it twice
        print(f"added a 2-D position code of norm {norm:.2f} to the patch position embeddings")
    kind_weights = {}
    for part in filter(None, args.question_weights.split(",")):
        kind, _, weight = part.partition("=")
        if kind not in sv.syn.QUESTION_TYPES or not weight.replace(".", "", 1).isdigit():
            p.error(f"--question-weights: {part!r} is not TYPE=WEIGHT with TYPE one of "
                    f"{', '.join(sv.syn.QUESTION_TYPES)} (e.g. color=3,presence=2)")
        kind_weights[kind] = float(weight)
    aux_weights = tuple(float(w) for w in args.aux_weights.split(","))
    if len(aux_weights) != 3:
        p.error(f"--aux-weights: {args.aux_weights!r} is not three numbers (colour, shape, column), e.g. 1,4,1")
    if (args.vision_only or args.vision_first) and not args.aux:
        p.error("--vision-only / --vision-first train on the auxiliary loss alone: --aux must be > 0")
    if args.aux_shape_both_from is not None and args.aux_shape != "pooled":
        p.error("--aux-shape-both-from switches the pooled shape target to both: it needs --aux-shape pooled")
    if args.vision_first and (args.vision_only or args.restart_schedule):
        p.error("--vision-first sets its own two schedules: drop --vision-only / --restart-schedule")
    if args.restart_at is not None and not max(args.vision_first, 1) <= args.restart_at <= args.steps - 200:
        p.error(f"--restart-at must be a step after the vision stage and at least 200 (a warmup) before --steps "
                f"{args.steps}: got {args.restart_at}")
    if args.restart_lr is not None and args.restart_at is None:
        p.error("--restart-lr is the peak from --restart-at on: give --restart-at too")
    model.train()
    width = model.config.text_config.hidden_size
    aux_head = torch.nn.Linear(width, sum(tv.PATCH_CLASSES))
    # per-dimension standardisation: the pooled features differ by a few % of their shared norm
    shape_head = torch.nn.Sequential(
        torch.nn.BatchNorm1d(width, affine=False), torch.nn.Linear(width, len(sv.syn.SHAPES))
    )
    projected: list[torch.Tensor] = []
    model.model.multi_modal_projector.register_forward_hook(lambda m, i, out: projected.append(out))
    focus_inputs: list[dict] = []
    if args.focus_relative and not args.focus:
        p.error("--focus-relative is a second term on the --focus head: give --focus too")
    if args.focus:
        if args.vision_only:
            p.error("--focus trains the LM's attention: it cannot go with --vision-only")
        layers = model.model.language_model.layers
        if not 0 <= args.focus_layer < len(layers):
            p.error(f"--focus-layer must be in [0, {len(layers) - 1}]")
        layers[args.focus_layer].self_attn.register_forward_pre_hook(
            lambda m, a, kw: focus_inputs.append(kw) if m.training else None, with_kwargs=True)
    keep_columns: list[torch.Tensor] = []
    if args.drop:
        tv.hide_dropped_tokens(model.model.language_model.layers, args.drop_layer, keep_columns)
    tower, rest = parameter_groups(model, aux_head, shape_head)
    optimizer = torch.optim.AdamW([{"params": tower}, {"params": rest}], lr=args.lr, weight_decay=0.01)
    opt_path, aux_path = state_dir / "optimizer.pt", state_dir / "aux_head.pt"
    if info["step"] > 0 and opt_path.exists():
        if not grown:  # new parameters: the saved moments no longer line up with the parameter list
            try:
                optimizer.load_state_dict(torch.load(opt_path))
            except ValueError:  # saved before the tower had a group of its own
                print("optimizer state from another parameter grouping: AdamW's moments restart")
        heads = torch.load(aux_path)
        if "aux" not in heads:  # saved before the pooled shape head existed
            heads = {"aux": heads, "shape": shape_head.state_dict()}
        aux_head.load_state_dict(heads["aux"])
        shape_head.load_state_dict(heads["shape"])
    processor = tv.build_processor()
    split = sv.eval_set(150, seed=sv.VALIDATION_SEED)  # not the test split benchmarks/quality.py reports on
    rng = random.Random(1234 + info["step"] + 1_000_003 * args.seed)  # seed 0: the recorded runs' data
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f} M parameters; {args.steps - info['step']} steps to go")

    step, t0, losses, aux_losses, focus_losses = info["step"], time.time(), [], [0.0], [0.0]
    relative_losses = [0.0]
    aux_accuracy: list[list[float]] = [[0.0, 0.0, 0.0]]
    start = step if args.restart_schedule else args.vision_first
    while step < args.steps:
        vision_only = args.vision_only or step < args.vision_first
        stage_start = 0 if vision_only and not args.vision_only else args.vision_first
        tower_lr, lr = learning_rates(step, args, start)
        optimizer.param_groups[0]["lr"], optimizer.param_groups[1]["lr"] = tower_lr, lr
        if args.freeze_tower and not vision_only:
            model.model.vision_tower.requires_grad_(False)
        objects = curriculum(step - stage_start, args.ramp)
        batch = tv.training_batch(rng, args.batch, objects, pairs=args.pairs, kind_weights=kind_weights or None)
        targets = tv.pop_targets(batch)
        patch_labels, focus_query, focus_tokens = (targets[name] for name in tv.TRAINING_TARGETS)
        objects_seen = (patch_labels[:, 0] > 0)[:, None, :]  # (B, 1, 576): every object's tokens
        if args.drop:
            keep = tv.token_keep(patch_labels, rng, args.drop)
            text = torch.ones(keep.shape[0], batch["input_ids"].shape[1] - keep.shape[1], dtype=torch.bool)
            keep_columns[:] = [torch.cat([keep, text], dim=1)]  # the image comes first in every row
            if args.drop_layer <= args.focus_layer:  # hidden tokens cannot be looked at
                focus_tokens &= keep[:, None, :]
                objects_seen &= keep[:, None, :]
        projected.clear()
        focus_inputs.clear()
        if vision_only:  # the tower and projector alone; the LM gets no gradient
            model.model.get_image_features(pixel_values=batch["pixel_values"])
            answer_loss = loss = torch.zeros(())
        else:
            answer_loss = loss = model(**batch).loss
        if args.focus and not vision_only:
            kw = focus_inputs[-1]
            weights = tv.head_attention(model.model.language_model.layers[args.focus_layer].self_attn,
                                        kw["hidden_states"], kw["position_embeddings"], kw["attention_mask"],
                                        args.focus_head, focus_query)
            focus = tv.focus_loss(weights, focus_query, focus_tokens)
            if args.focus_relative:  # logged "focus" stays the plain term, comparable with earlier runs
                relative = tv.focus_loss(weights, focus_query, focus_tokens, among=objects_seen.expand_as(focus_tokens))
                relative_losses.append(relative.item())
                loss = loss + args.focus_relative * relative
            focus_losses.append(focus.item())
            loss = loss + args.focus * focus
        aux_shape = aux_shape_at(step, args)
        if args.aux:
            aux_logits = aux_head(projected[-1])
            aux, seen = tv.auxiliary_loss(aux_logits, projected[-1], patch_labels, shape_head, aux_shape,
                                          weights=aux_weights, balanced=args.aux_balanced)
            aux_losses.append(aux.item())
            aux_accuracy.append(seen)
            loss = loss + args.aux * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(answer_loss.item())
        step += 1
        if step % 25 == 0:
            rate = (time.time() - t0) / 25
            t0 = time.time()
            aux_mean = sum(aux_losses[-25:]) / len(aux_losses[-25:])
            # the auxiliary head on the training batches' object patches: is the tower seeing shape?
            seen = [sum(a[k] for a in aux_accuracy[-25:]) / len(aux_accuracy[-25:]) for k in range(3)]
            focus_mean = sum(focus_losses[-25:]) / len(focus_losses[-25:])
            relative_text = f"relative {sum(relative_losses[-25:]) / len(relative_losses[-25:]):.3f} " \
                if args.focus_relative else ""
            print(f"step {step} loss {sum(losses[-25:]) / 25:.3f} aux {aux_mean:.3f} focus {focus_mean:.3f} "
                  f"{relative_text}"
                  f"(object patches: colour {seen[0]:.2f} shape{' (pooled)' if aux_shape == 'pooled' else ''} "
                  f"{seen[1]:.2f} column {seen[2]:.2f}) "
                  f"objects<={objects} lr {lr:.2e} {rate:.2f} s/step, "
                  f"about {rate * (args.steps - step) / 60:.0f} min to step {args.steps}", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            acc = sv.evaluate(model, split)
            model.train()
            print("eval", json.dumps({k: round(v, 3) for k, v in acc.items()}), flush=True)
            info["history"].append({"step": step, "loss": sum(losses[-50:]) / len(losses[-50:]), "eval": acc})
        if step % args.save_every == 0 or step == args.steps:
            tv.end_generation_after_the_answer(model)
            model.save_pretrained(out)
            processor.save_pretrained(out)
            info["step"] = step
            info_path.write_text(json.dumps(info, indent=1))
            state_dir.mkdir(parents=True, exist_ok=True)
            torch.save(optimizer.state_dict(), opt_path)
            torch.save({"aux": aux_head.state_dict(), "shape": shape_head.state_dict()}, aux_path)
            print(f"saved step {step} to {out}", flush=True)


if __name__ == "__main__":
    main()
