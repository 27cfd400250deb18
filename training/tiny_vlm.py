"""Training the demo model: building it, its processor, the teacher-forced batches and the losses.

Used by ``training/train_tiny_vlm.py`` and the diagnostics next to it; the package itself only
loads and scores the trained model (:mod:`pio_fvlm.shapes_vlm`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pio_fvlm import synthetic as syn
from pio_fvlm.select.baselines import attention_rows
from pio_fvlm.shapes_vlm import ASSET_DIR, CLIP_MEAN, CLIP_STD, IMAGE_TOKEN, N_VISUAL, pixels, word_ids


def build_model(seed: int = 0, vision_width: int = 128, vision_layers: int = 2, text_width: int = 128,
                text_layers: int = 4) -> Any:
    """A fresh random tiny LLaVA. The defaults are the shipped checkpoint's: a 2-layer CLIP tower
    of width 128 (the earlier 1-layer width-64 tower barely learnt shape) and a 4-layer Llama of
    width 128; about 1.4 M parameters."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    ids = word_ids()
    vision = CLIPVisionConfig(hidden_size=vision_width, intermediate_size=4 * vision_width,
                              num_hidden_layers=vision_layers, num_attention_heads=4, image_size=syn.SIZE,
                              patch_size=14, projection_dim=64)
    text = LlamaConfig(hidden_size=text_width, intermediate_size=3 * text_width, num_hidden_layers=text_layers,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=len(syn.VOCAB),
                       pad_token_id=ids["<pad>"], bos_token_id=None, eos_token_id=ids[";"],
                       max_position_embeddings=1024)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=ids[IMAGE_TOKEN],
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    config._attn_implementation = "sdpa"
    return LlavaForConditionalGeneration(config)


def _append_identity_layers(stack: torch.nn.ModuleList, layers: int, make_layer: Callable[[int], torch.nn.Module],
                            residual_outputs: Callable[[Any], list[torch.nn.Linear]], std: float,
                            seed: int) -> int:
    """Append ``make_layer(index)`` to ``stack`` until it holds ``layers``: weights normal(0, std)
    from their own generator (growing must not reseed training), biases 0, and the projections
    that write into the residual stream (``residual_outputs(layer)``) all 0, so each new
    pre-norm layer is an exact identity at first. Returns how many were added."""
    have = len(stack)
    gen = torch.Generator().manual_seed(seed)
    like = next(stack[0].parameters())  # new layers on the model's device and dtype
    for index in range(have, layers):
        layer = make_layer(index)
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=std, generator=gen)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
        for projection in residual_outputs(layer):
            torch.nn.init.zeros_(projection.weight)
        stack.append(layer.to(device=like.device, dtype=like.dtype))
    return layers - have


def deepen_language_model(model: Any, layers: int, seed: int = 0) -> int:
    """Append decoder layers to the LM until it has ``layers``, each an exact identity at first
    (zeroed attention-output and MLP-down projections: both residual branches add 0), so a
    trained checkpoint keeps its answers and training goes on with more depth. Returns how many
    layers were added (0 when it already has that many)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    text_config, stack = model.config.text_config, model.model.language_model.layers
    if layers < len(stack):
        raise ValueError(f"the model has {len(stack)} decoder layers; deepen_language_model only adds layers")
    text_config.num_hidden_layers = layers
    return _append_identity_layers(stack, layers, lambda index: LlamaDecoderLayer(text_config, layer_idx=index),
                                   lambda layer: [layer.self_attn.o_proj, layer.mlp.down_proj],
                                   text_config.initializer_range, seed)


def deepen_vision_tower(model: Any, layers: int, seed: int = 0) -> int:
    """Append CLIP encoder layers to the vision tower until it has ``layers``, each an exact
    identity at first (zeroed attention-output and MLP-output projections), so a trained
    checkpoint keeps its answers while its patches get more rounds of mixing (on the shapes
    task, a patch inside an object must look at the object's edges to know its shape). The
    model must read the last layer (``vision_feature_layer=-1``), which then is the new last
    one. Returns how many layers were added."""
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)  # CLIPVisionModel wraps a CLIPVisionTransformer in some versions
    vision_config, stack = model.config.vision_config, tower.encoder.layers
    if layers < len(stack):
        raise ValueError(f"the vision tower has {len(stack)} layers; deepen_vision_tower only adds layers")
    if model.config.vision_feature_layer != -1:
        raise ValueError(f"the model reads vision layer {model.config.vision_feature_layer}, not the last one: "
                         "layers added at the end would not be used")
    if getattr(model.model.vision_tower, "_output_capturing_hooks_installed", False):
        # transformers records the tower's hidden states (which LLaVA reads) through hooks it puts on
        # the layers at the first forward: layers added later would be left out
        raise ValueError("deepen_vision_tower must run before the model's first forward: load the model "
                         "again (from_pretrained) and grow it first")
    vision_config.num_hidden_layers = layers
    return _append_identity_layers(stack, layers, lambda index: CLIPEncoderLayer(vision_config),
                                   lambda layer: [layer.self_attn.out_proj, layer.mlp.fc2],
                                   vision_config.initializer_range, seed)


def grid_sincos(side: int, dim: int, base: float = 100.0) -> torch.Tensor:
    """(side * side, dim) 2-D sine-cosine code of a row-major grid: a quarter of the channels
    each for sin / cos of the row and of the column at ``dim // 4`` frequencies (``base`` sets
    the slowest). Dot products between rows depend on the row and column offsets only, which is
    what attention needs to group neighbouring patches."""
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4, got {dim}")
    quarter = dim // 4
    omega = base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    parts = []
    for coordinate in (rows.flatten(), cols.flatten()):
        angle = coordinate[:, None].double() * omega[None]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).float()


@torch.no_grad()
def oriented_edge_stem(model: Any, scale: float = 0.5) -> int:
    """Overwrite the first 72 CLIP patch-embedding filters with step-edge detectors: 8
    orientations x 3 offsets from the patch centre x 3 colour channels, each zero-mean with norm
    ``scale`` (the others stay random). Returns how many were set.

    Why: an object's shape shows at the patch scale only in the orientation of its edges (the
    interior patches of a circle, a square and a triangle look the same), and random filters
    mix orientation with colour; rectified and pooled over an object, these filters' responses
    give its shape to a linear probe at 0.99 (examples/probe_tower_shape.py, docs/quality.md).
    Stock CLIP weights, only their values change."""
    tower = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower)
    weight = tower.embeddings.patch_embedding.weight  # (D, 3, 14, 14)
    side = weight.shape[-1]
    centre = torch.arange(float(side)) - (side - 1) / 2
    yy, xx = torch.meshgrid(centre, centre, indexing="ij")
    k = 0
    for a in range(8):
        theta = math.pi * a / 8
        for offset in (-0.25 * side, 0.0, 0.25 * side):
            edge = torch.tanh((xx * math.cos(theta) + yy * math.sin(theta) - offset) / 1.5)
            edge = (edge - edge.mean()) / (edge - edge.mean()).norm()
            for channel in range(3):
                weight[k].zero_()
                weight[k, channel] = scale * edge.to(weight.dtype)
                k += 1
    return k


@torch.no_grad()
def boost_patch_positions(model: Any, scale: float, seed: int = 0) -> float:
    """Add a 2-D sine-cosine code (:func:`grid_sincos`) to the CLIP tower's patch position
    embeddings, each row scaled to ``scale`` times the mean norm of the patch embeddings of
    training scenes; the [CLS] position is left alone. Returns that row norm.

    Why: CLIP adds its learned position embeddings to the patch embeddings before the first
    layer norm, and in the trained tiny tower they are ~40x weaker than the patches' colour
    (0.7 vs 31), so the tower can hardly tell where a patch is: a linear probe reads an object's
    column off its patches at chance, and grouping an object's patches to see its shape is slow
    to learn. Stock CLIP weights, only their values change."""
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    embeddings = tower.embeddings
    rng = random.Random(seed)
    scenes = [syn.render(syn.random_scene(rng, rng.randint(1, 4)), rng) for _ in range(8)]
    weight = embeddings.patch_embedding.weight
    patches = embeddings.patch_embedding(pixels(scenes).to(weight.device, weight.dtype))  # (8, D, 24, 24)
    norm = patches.flatten(2).norm(dim=1).mean().item()
    side, dim = patches.shape[-1], patches.shape[1]
    code = grid_sincos(side, dim)
    code = code / code.norm(dim=1, keepdim=True) * norm * scale
    embeddings.position_embedding.weight[1:] += code.to(weight.device, weight.dtype)
    return norm * scale


def build_processor() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab=word_ids(), unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                        eos_token=";", padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_processor = CLIPImageProcessor(size={"shortest_edge": syn.SIZE},
                                         crop_size={"height": syn.SIZE, "width": syn.SIZE},
                                         image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                               num_additional_image_tokens=1)
    processor.chat_template = (ASSET_DIR / "chat_template.jinja").read_text()  # "<image> QUESTION answer"
    return processor


def end_generation_after_the_answer(model: Any) -> None:
    """The demo model answers in one word: its generation ends after ";" or any answer word."""
    ids = word_ids()
    model.generation_config.eos_token_id = [ids[";"]] + [ids[w] for w in syn.ANSWER_WORDS]


def training_batch(rng: random.Random, batch: int, max_objects: int, pairs: int = 8,
                   kind_weights: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Teacher-forced sequences: image tokens, then ``pairs`` question/answer pairs, each pair
    seeing only the image and itself.

    Pairs share the image prefix (cheap: the 576 image tokens dominate the cost) but a 4-D
    attention mask hides the other pairs, and each pair's positions continue from the image as
    if it were alone: otherwise a repeated or related question is answered by copying an earlier
    answer instead of looking (the model then scores well in training and poorly alone).

    Returns ``input_ids`` (B, L), ``attention_mask`` (B, 1, L, L) bool, ``position_ids`` (B, L),
    ``labels`` (B, L) (-100 except at answer tokens), ``pixel_values`` and ``patch_labels``
    (B, 3, 576): colour / shape / column class of each patch (0 = background), for the
    training script's auxiliary loss, ``focus_query`` (B, pairs) the position where each pair's
    answer is predicted (-1 for counting and "no" questions: nothing to look at) and
    ``focus_tokens`` (B, pairs, 576) bool, the visual tokens of the objects it asks about, for
    :func:`focus_loss` (:func:`pop_targets` takes these three out before calling the model).

    ``kind_weights`` (question type -> weight, 1 for types not named) draws the pairs from a pool
    of the scene's questions with these weights instead of taking them in rounds of one per type.
    """
    ids = word_ids()
    rows, label_rows, segment_rows, images, dense = [], [], [], [], []
    focus_query = torch.full((batch, pairs), -1, dtype=torch.long)
    focus_tokens = torch.zeros(batch, pairs, N_VISUAL, dtype=torch.bool)
    for b in range(batch):
        objects = syn.random_scene(rng, rng.randint(1, max_objects))
        image, owner = syn.render_with_owner(objects, rng)
        images.append(image)
        dense.append(syn.patch_labels(objects, owner))
        token_owner = torch.from_numpy(syn.patch_owner(owner))
        qas: list[syn.QA] = []
        while len(qas) < pairs:
            qas += syn.questions(objects, rng)
        if kind_weights is not None:
            weights = [kind_weights.get(qa.kind, 1.0) for qa in qas]
            qas = rng.choices(qas, weights=weights, k=pairs)
        rng.shuffle(qas)
        row = [ids[IMAGE_TOKEN]] * N_VISUAL
        labels = [-100] * N_VISUAL
        segments = [0] * N_VISUAL  # 0: the image, k: the k-th pair
        for k, qa in enumerate(qas[:pairs], start=1):
            words = syn.qa_text(qa, with_answer=True).split()
            row += [ids[w] for w in words]
            labels += [-100] * len(words)
            segments += [k] * len(words)
            # predict the answer at the position of "answer" (labels are shifted by the model)
            labels[len(row) - 2] = ids[qa.answer]
            if qa.kind != "count":  # counting looks at every object: no single place to look
                about = syn.question_objects(qa, objects)
                if about:
                    focus_query[b, k - 1] = len(row) - 3  # the "answer" token, where it is predicted
                    focus_tokens[b, k - 1] = torch.isin(token_owner, torch.tensor(about))
        rows.append(row)
        label_rows.append(labels)
        segment_rows.append(segments)
    length = max(len(r) for r in rows)
    input_ids = torch.full((batch, length), ids["<pad>"], dtype=torch.long)
    labels_t = torch.full((batch, length), -100, dtype=torch.long)
    segment = torch.full((batch, length), -1, dtype=torch.long)  # -1: padding
    for i, (r, lab, seg) in enumerate(zip(rows, label_rows, segment_rows)):
        input_ids[i, : len(r)] = torch.tensor(r)
        labels_t[i, : len(r)] = torch.tensor(lab)
        segment[i, : len(r)] = torch.tensor(seg)
    q, k = segment.unsqueeze(2), segment.unsqueeze(1)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    visible = causal & (k >= 0) & ((k == 0) | (k == q))
    visible |= torch.eye(length, dtype=torch.bool)  # padding rows see themselves (no empty softmax)
    # positions: the image 0..575, every pair from 576 on, as when asked alone
    first = torch.zeros_like(segment)
    for i, seg in enumerate(segment_rows):
        start = N_VISUAL
        for j in range(N_VISUAL, len(seg)):
            if seg[j] != seg[j - 1]:
                start = j
            first[i, j] = start
    position_ids = torch.arange(length).expand(batch, length) - first + torch.where(segment > 0, N_VISUAL, 0)
    return {"input_ids": input_ids, "attention_mask": visible.unsqueeze(1), "position_ids": position_ids,
            "labels": labels_t, "pixel_values": pixels(images), "patch_labels": torch.from_numpy(np.stack(dense)),
            "focus_query": focus_query, "focus_tokens": focus_tokens}


TRAINING_TARGETS = ("patch_labels", "focus_query", "focus_tokens")


def pop_targets(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Take the training script's extra targets (:data:`TRAINING_TARGETS`) out of a
    :func:`training_batch`, leaving what the model takes."""
    return {name: batch.pop(name) for name in TRAINING_TARGETS}


PATCH_CLASSES = (1 + len(syn.COLORS), 1 + len(syn.SHAPES), 1 + syn.GRID)  # background + colours, shapes, columns


def patch_attribute_loss(logits: torch.Tensor, labels: torch.Tensor, balanced: bool = False,
                         weights: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """The training script's auxiliary loss: weighted mean cross-entropy of the three per-patch
    attributes (colour, shape, column of the object under each visual token).

    Args:
        logits: (B, 576, sum(PATCH_CLASSES)), from the projected visual tokens by a linear head.
        labels: (B, 3, 576) class indices, :func:`training_batch`'s ``patch_labels`` (0 = background).
        balanced: object and background patches weigh half each. Unbalanced, the ~90 %
            background patches (class 0, easy) dominate the mean, and a low loss hides that the
            object patches' shape is poorly read.
        weights: of colour, shape and column (the loss divides by their sum). Colour is read
            off one patch and column off its position; shape needs the patches of the whole
            object, is learnt last, and may be given more weight.
    """
    on_object = (labels[:, 0] > 0).flatten().float()
    weight = (on_object / on_object.sum().clamp(min=1) + (1 - on_object) / (1 - on_object).sum().clamp(min=1)) / 2
    total = logits.new_zeros(())
    for k, part in enumerate(logits.split(PATCH_CLASSES, dim=-1)):
        per_patch = torch.nn.functional.cross_entropy(part.flatten(0, 1), labels[:, k].flatten(), reduction="none")
        total = total + weights[k] * ((per_patch * weight).sum() if balanced else per_patch.mean())
    return total / sum(weights)


def object_shape_logits(features: torch.Tensor, labels: torch.Tensor,
                        head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape read off each object's visual tokens pooled (mean), for the training script's
    object-level shape target (``--aux-shape pooled``).

    Shape is an object's property, not a patch's: the interior patches of all three shapes look
    alike, so a per-patch shape target asks them for what only the tower's attention can bring;
    pooled over the object, edge orientations decide it (training/probe_tower_shape.py).

    Args:
        features: (B, 576, D) projected visual tokens.
        labels: (B, 3, 576) :func:`training_batch`'s ``patch_labels``; the (colour, shape) pair
            names an object (distinct within a scene, :func:`synthetic.random_scene`).
        head: maps (N, D) -> (N, len(SHAPES)).
    Returns:
        (N, len(SHAPES)) logits and (N,) shape indices, one row per object with a patch.
    """
    n_shapes = len(syn.SHAPES) + 1
    key = labels[:, 0] * n_shapes + labels[:, 1]  # (B, 576); 0 on the background
    slots = torch.arange(1, PATCH_CLASSES[0] * n_shapes, device=key.device)
    member = (key[:, None, :] == slots[None, :, None]).to(features.dtype)  # (B, slots, 576)
    count = member.sum(-1)  # (B, slots)
    pooled = member @ features / count.clamp(min=1)[..., None]  # (B, slots, D)
    shape = (slots % n_shapes - 1).expand_as(count)
    present = (count > 0) & (shape >= 0)
    return head(pooled[present]), shape[present]


def auxiliary_loss(logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, shape_head: torch.nn.Module,
                   shape_target: str = "patch", weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
                   balanced: bool = False) -> tuple[torch.Tensor, list[float]]:
    """The training script's whole auxiliary loss, with its shape target chosen by ``--aux-shape``.

    ``"patch"``: :func:`patch_attribute_loss` on all three attributes. ``"pooled"``: colour and
    column per patch, shape once per object (:func:`object_shape_logits`). ``"both"``: the pooled
    target and the per-patch one: pooled gets shape learnt at all, but leaves it in the object's
    mean only (a per-patch probe reads it at 0.62 - 0.79 in the stop-18 model, 0.998 in the
    shipped one), and the LM's attention needs it in every token to find the object a question
    names (training/probe_binding.py).

    Args:
        logits: (B, 576, sum(PATCH_CLASSES)), the per-patch head on ``features``.
        features: (B, 576, D) projected visual tokens.
        labels: (B, 3, 576) :func:`training_batch`'s ``patch_labels``.
        shape_head: the object-level head of :func:`object_shape_logits`.
        weights: of colour, shape and column; with ``"both"`` shape's weight counts twice.
    Returns:
        The loss (a weighted mean) and the object patches' [colour, shape, column] accuracy
        (shape: the pooled head's, per object, with ``"pooled"``; the per-patch head's otherwise).
    """
    if shape_target not in ("patch", "pooled", "both"):
        raise ValueError(f"shape_target must be 'patch', 'pooled' or 'both', got {shape_target!r}")
    seen = patch_attribute_accuracy(logits.detach(), labels)
    if shape_target == "patch":
        return patch_attribute_loss(logits, labels, balanced=balanced, weights=weights), seen
    colour, shape, column = weights
    per_patch_shape = shape if shape_target == "both" else 0.0
    per_patch_weight = colour + per_patch_shape + column
    per_patch = (patch_attribute_loss(logits, labels, balanced=balanced, weights=(colour, per_patch_shape, column))
                 if per_patch_weight else logits.new_zeros(()))
    shape_logits, shapes = object_shape_logits(features, labels, shape_head)
    pooled = torch.nn.functional.cross_entropy(shape_logits, shapes)
    total = per_patch * per_patch_weight + shape * pooled
    if shape_target == "pooled":
        seen[1] = float((shape_logits.argmax(-1) == shapes).float().mean())
    return total / (per_patch_weight + shape), seen


def patch_attribute_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Accuracy of the auxiliary head's colour, shape and column on the patches that lie on an
    object (the background is easy and most of the image); shapes as :func:`patch_attribute_loss`."""
    on_object = labels[:, 0] > 0
    return [float((part.argmax(-1) == labels[:, k])[on_object].float().mean())
            for k, part in enumerate(logits.split(PATCH_CLASSES, dim=-1))]


def head_attention(attention: torch.nn.Module, hidden: torch.Tensor,
                   position_embeddings: tuple[torch.Tensor, torch.Tensor],
                   mask: torch.Tensor, head: int, query: torch.Tensor) -> torch.Tensor:
    """One Llama attention head's weights at chosen query positions, recomputed from the layer's
    inputs (:func:`pio_fvlm.select.baselines.attention_rows`: any attention backend).

    Args:
        attention: a ``LlamaAttention``.
        hidden: (B, L, D) its input; ``position_embeddings`` the (cos, sin) it gets.
        mask: (B, 1, L, L) bool (True = may attend) or additive float.
        query: (B, P) positions, -1 for none (their rows are those of position 0: ignore them).
    Returns: (B, P, L) attention weights of head ``head``.
    """
    rows = query.clamp(min=0)
    allowed = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] > torch.finfo(mask.dtype).min / 2
    allowed = allowed.gather(1, rows[..., None].expand(-1, -1, hidden.shape[1]))
    return attention_rows(attention, hidden, position_embeddings, rows, allowed)[:, head]


def focus_loss(weights: torch.Tensor, query: torch.Tensor, tokens: torch.Tensor,
               among: torch.Tensor | None = None) -> torch.Tensor:
    """Attention supervision for the training script's ``--focus``: minus the log of the weight a
    head puts on the visual tokens of the object a question asks about, at the position where
    the answer is predicted (a head that finds the object named in the question; without it the
    tiny LM answers colour questions with any colour in the image).

    With ``among`` (the training script's ``--focus-relative``): minus the log of the named object's
    share of the weight on ``among`` (all objects' tokens), averaged over the pairs whose scene
    shows another object; the background does not count, so the whole signal goes to telling the
    named object from the others (a head that looks at every object alike scores 0 on the plain
    loss's single-object scenes and log(objects) here).

    Args:
        weights: (B, P, L) from :func:`head_attention` (the image's 576 tokens come first).
        query: (B, P), -1 where the pair has no object to look at.
        tokens: (B, P, 576) bool, the object's tokens (those the sequence kept).
        among: None, or (B, P, 576) bool, every object's tokens (those kept); ``tokens`` lie inside.
    """
    use = (query >= 0) & tokens.any(-1)
    if among is not None:
        use &= (among & ~tokens).any(-1)  # another object to tell the named one from
    if not use.any():
        return weights.new_zeros(())
    visual = weights[..., : tokens.shape[-1]]
    on_object = (visual * tokens).sum(-1)
    if among is None:
        return -(on_object[use] + 1e-6).log().mean()
    on_objects = (visual * among).sum(-1)
    return -((on_object[use] + 1e-6) / (on_objects[use] + 1e-6)).log().mean()


# how a thinned sequence picks its tokens: top-k of uniform noise + this bias on object tokens
DROP_BIAS = {"uniform": 0.0, "objects first": 2.0, "objects favoured": 0.5}


def token_keep(patch_labels: torch.Tensor, rng: random.Random, share: float, least: int = 16) -> torch.Tensor:
    """(B, 576) bool: the visual tokens each training sequence keeps from the thinning layer on
    (the training script's ``--drop``; applied by :func:`hide_dropped_tokens`).

    A ``share`` of the sequences keep only ``k`` tokens (log-uniform in [least, 576]), chosen
    uniformly at random, or the objects' tokens first, or with objects favoured (a third each), so
    that the model sees what any pruning method leaves (a few objects' tokens and little background)
    and does not depend on the background being there. The rest keep all tokens.

    Args:
        patch_labels: (B, 3, 576) from :func:`training_batch`; row 0 > 0 marks a token on an object.
    """
    on_object = (patch_labels[:, 0] > 0).float()
    keep = torch.ones(on_object.shape, dtype=torch.bool)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    for i in range(keep.shape[0]):
        if rng.random() >= share:
            continue
        k = round(math.exp(rng.uniform(math.log(least), math.log(on_object.shape[1]))))
        noise = torch.rand(on_object.shape[1], generator=gen)
        bias = DROP_BIAS[rng.choice(tuple(DROP_BIAS))]
        keep[i] = False
        keep[i, (noise + bias * on_object[i]).topk(k).indices] = True
    return keep


def hide_dropped_tokens(layers: torch.nn.ModuleList, first: int, keep_columns: list[torch.Tensor]) -> None:
    """From decoder layer ``first`` on, no query sees a dropped visual token (each still sees
    itself): the same as pruning it there. ``keep_columns[-1]`` is the current batch's (B, L)
    bool, True for every text token and kept visual token."""

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if not module.training:  # evaluation sees every token
            return args, kwargs
        mask = kwargs["attention_mask"]  # (B, 1, L, L), from training_batch: bool, or additive (eager)
        eye = torch.eye(mask.shape[-1], dtype=torch.bool)
        visible = keep_columns[-1][:, None, None, :] | eye
        if mask.dtype == torch.bool:
            kwargs["attention_mask"] = mask & visible
        else:
            kwargs["attention_mask"] = mask.masked_fill(~visible, torch.finfo(mask.dtype).min)
        return args, kwargs

    for layer in layers[first:]:
        layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
