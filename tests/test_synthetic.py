"""The synthetic shapes task: per-patch labels line up with the rendered image."""

import random

import numpy as np

import tiny_vlm as tv  # training/, on the test path
from pio_fvlm import synthetic as syn


def test_owner_map_and_patch_labels_line_up_with_the_image():
    for seed in range(5):
        objects = syn.random_scene(random.Random(seed), 1 + seed % 4)
        image = syn.render(objects, random.Random(100 + seed))
        same, owner = syn.render_with_owner(objects, random.Random(100 + seed))
        assert np.array_equal(image, same)  # the same random draws
        labels = syn.patch_labels(objects, owner)
        assert labels.shape == (3, (syn.SIZE // 14) ** 2)
        grid = labels.reshape(3, syn.SIZE // 14, syn.SIZE // 14)
        for k, o in enumerate(objects):
            painted = owner == k
            assert (image[painted] == syn.COLORS[o.color]).all()
            ys, xs = np.nonzero(painted)
            r, c = int(ys.mean()) // 14, int(xs.mean()) // 14  # the patch at the object's centre
            assert grid[0, r, c] == list(syn.COLORS).index(o.color) + 1
            assert grid[1, r, c] == syn.SHAPES.index(o.shape) + 1
            assert grid[2, r, c] == o.col + 1
        assert (labels[0] > 0).sum() == (labels[2] > 0).sum()
        blank, none = syn.render_with_owner(objects, random.Random(1), blank=True)
        assert (none == -1).all() and not syn.patch_labels(objects, none).any()


def test_packed_training_pairs_see_only_the_image_and_themselves():
    """Each question/answer pair in a training sequence gets the logits it would get asked
    alone right after the image (no copying of earlier answers)."""
    import torch

    from pio_fvlm import shapes_vlm as sv

    model = tv.build_model(vision_width=32, vision_layers=1, text_width=32, text_layers=2).eval()
    batch = tv.training_batch(random.Random(0), 2, 3, pairs=5)
    tv.pop_targets(batch)
    labels = batch.pop("labels")
    with torch.no_grad():
        packed = model(**batch).logits
    ids, pos = batch["input_ids"], batch["position_ids"]
    for row in range(2):
        starts = [j for j in range(sv.N_VISUAL + 1, ids.shape[1]) if pos[row, j] == sv.N_VISUAL]
        n_valid = int((ids[row] != sv.word_ids()["<pad>"]).sum())
        bounds = [sv.N_VISUAL, *starts, n_valid]
        assert len(bounds) == 6  # image end + 5 pairs
        for a, b in zip(bounds, bounds[1:]):
            alone = torch.cat([ids[row, : sv.N_VISUAL], ids[row, a:b]]).unsqueeze(0)
            with torch.no_grad():
                ref = model(input_ids=alone, pixel_values=batch["pixel_values"][row : row + 1]).logits
            torch.testing.assert_close(packed[row, a:b], ref[0, sv.N_VISUAL:], rtol=1e-4, atol=1e-5)
            assert (labels[row, a:b] != -100).sum() == 1  # one answer per pair


def test_question_objects_name_what_each_question_is_about():
    objects = [syn.Obj("circle", "red", 0, 0), syn.Obj("square", "red", 1, 1), syn.Obj("circle", "blue", 2, 2)]
    about = {
        "what color is the square ?": [1],
        "what shape is the blue ?": [2],
        "is there a red circle ?": [0],
        "is there a green square ?": [],
        "where is the blue circle ?": [2],
    }
    for question, want in about.items():
        assert syn.question_objects(syn.QA("x", question, "x"), objects) == want
    assert syn.question_objects(syn.QA("count", "how many shapes ?", "three"), objects) == [0, 1, 2]


def test_eval_split_with_owners_is_the_eval_split():
    """The quality benchmark's object coverage reads owners of the very scenes it asks about."""
    from pio_fvlm import shapes_vlm as sv

    items = sv.eval_set_with_owners(12)
    for (image, objects, qa), ((same, objs, q), owners) in zip(sv.eval_set(12), items):
        assert np.array_equal(image, same) and objects == objs and qa == q
        assert owners.shape == (sv.N_VISUAL,)
        assert set(owners.tolist()) == {-1, *range(len(objects))}  # every object owns a token
        # at least a third of an owned token's patch shows its object's colour
        for index in np.nonzero(owners >= 0)[0][:: 7]:
            r, c = divmod(int(index), syn.SIZE // 14)
            patch = image[14 * r : 14 * r + 14, 14 * c : 14 * c + 14]
            assert (patch == syn.COLORS[objects[owners[index]].color]).all(-1).mean() >= 1 / 3


def test_tokens_dropped_in_training_are_pruned_tokens():
    """The training script's token thinning (hide visual tokens from decoder layer 1 on) gives
    the logits that pruning those same tokens with the library gives: the augmentation puts
    exactly what pruning does in distribution, no more, no less."""
    import torch

    import pio_fvlm
    from pio_fvlm import shapes_vlm as sv
    from pio_fvlm.select.baselines import top_by_visual_score

    model = tv.build_model(vision_width=32, vision_layers=1, text_width=32, text_layers=3)
    batch = tv.training_batch(random.Random(0), 3, 3, pairs=1)
    patch_labels = tv.pop_targets(batch)["patch_labels"]
    batch.pop("labels")
    keep = tv.token_keep(patch_labels, random.Random(1), share=1.0)
    counts = keep.sum(1)
    assert ((counts >= 16) & (counts <= sv.N_VISUAL)).all() and (counts < sv.N_VISUAL).any()
    assert tv.token_keep(patch_labels, random.Random(1), share=0.0).all()

    columns: list[torch.Tensor] = []
    tv.hide_dropped_tokens(model.model.language_model.layers, 1, columns)
    text_len = batch["input_ids"].shape[1] - sv.N_VISUAL
    columns.append(torch.cat([keep, torch.ones(3, text_len, dtype=torch.bool)], dim=1))
    model.train()  # the hooks act in training only (no dropout in this config)
    with torch.no_grad():
        thinned = model(**batch).logits
        model.eval()
        untouched = model(**batch).logits

    for row in range(3):
        n_valid = int((batch["input_ids"][row] != sv.word_ids()["<pad>"]).sum())

        def kept_by_training(request, row=row):
            return top_by_visual_score(request, [keep[row].float()])

        pio_fvlm.wrap(model, budget=int(counts[row]), selector=kept_by_training)
        with torch.no_grad():
            pruned = model(input_ids=batch["input_ids"][row : row + 1, :n_valid],
                           pixel_values=batch["pixel_values"][row : row + 1]).logits
        pio_fvlm.unwrap(model)
        text = slice(sv.N_VISUAL, n_valid)
        torch.testing.assert_close(thinned[row, text], pruned[0, -(n_valid - sv.N_VISUAL):], rtol=1e-4, atol=1e-5)
        if counts[row] < sv.N_VISUAL:  # and the thinning did change something
            assert not torch.allclose(thinned[row, text], untouched[row, text], atol=1e-4)


def test_deepened_language_model_answers_as_before_and_trains_its_new_layers():
    """Appended decoder layers start as exact identities (logits, cached generation unchanged)
    and get gradients; shrinking is refused."""
    import pytest
    import torch

    from pio_fvlm import shapes_vlm as sv

    model = tv.build_model(vision_width=32, vision_layers=1, text_width=32, text_layers=2).eval()
    batch = tv.training_batch(random.Random(3), 2, 3, pairs=3)
    tv.pop_targets(batch)
    with torch.no_grad():
        before = model(**batch).logits
        prompt = batch["input_ids"][:1, : sv.N_VISUAL + 6]
        pixels = batch["pixel_values"][:1]
        generated = model.generate(input_ids=prompt, pixel_values=pixels, max_new_tokens=4, do_sample=False)
    assert tv.deepen_language_model(model, 4) == 2
    assert model.config.text_config.num_hidden_layers == 4 == len(model.model.language_model.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before)
        again = model.generate(input_ids=prompt, pixel_values=pixels, max_new_tokens=4, do_sample=False)
    assert torch.equal(again, generated)
    model.train()
    model(**batch).loss.backward()
    for layer in model.model.language_model.layers[2:]:
        assert layer.self_attn.o_proj.weight.grad.abs().sum() > 0
        assert layer.mlp.down_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="only adds layers"):
        tv.deepen_language_model(model, 3)


def test_question_weights_change_the_mix_of_training_questions():

    def color_share(**kwargs) -> float:
        batch = tv.training_batch(random.Random(5), 4, 4, pairs=16, **kwargs)
        words = [syn.VOCAB[int(t)] for t in batch["input_ids"].flatten()]
        return words.count("color") / (4 * 16)

    assert color_share() < 0.3  # one question of each type in turn
    assert color_share(kind_weights={"color": 50.0}) > 0.8
    assert color_share(kind_weights={"color": 0.0}) == 0


def test_deepened_vision_tower_answers_as_before_and_its_last_layer_is_read():
    """Appended CLIP layers start as exact identities, LLaVA reads the new last one, they get
    gradients; growing after the first forward, shrinking, or a model that reads an earlier
    layer are refused with a clear error."""
    import pytest
    import torch


    def small() -> torch.nn.Module:
        return tv.build_model(seed=4, vision_width=32, vision_layers=1, text_width=32, text_layers=2).eval()

    model, grown = small(), small()
    assert tv.deepen_vision_tower(grown, 3) == 2
    assert grown.config.vision_config.num_hidden_layers == 3 == len(grown.model.vision_tower.encoder.layers)
    batch = tv.training_batch(random.Random(3), 2, 3, pairs=3)
    tv.pop_targets(batch)
    with torch.no_grad():
        torch.testing.assert_close(grown(**batch).logits, model(**batch).logits, rtol=0, atol=0)
        grown.model.vision_tower.encoder.layers[-1].mlp.fc2.bias.add_(0.5)  # the new last layer is read
        assert not torch.allclose(grown(**batch).logits, model(**batch).logits)
    grown.train()
    grown(**batch).loss.backward()
    for layer in grown.model.vision_tower.encoder.layers[1:]:
        assert layer.self_attn.out_proj.weight.grad.abs().sum() > 0
        assert layer.mlp.fc2.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="first forward"):
        tv.deepen_vision_tower(grown, 4)
    fresh = small()
    with pytest.raises(ValueError, match="only adds layers"):
        tv.deepen_vision_tower(fresh, 0)
    fresh.config.vision_feature_layer = -2
    with pytest.raises(ValueError, match="not the last one"):
        tv.deepen_vision_tower(fresh, 3)


def test_balanced_patch_loss_weighs_object_patches_as_much_as_the_background():
    import math

    import torch


    labels = torch.zeros(2, 3, 576, dtype=torch.long)
    labels[:, :, :20] = 1  # 20 of 576 patches per image on an object
    logits = torch.zeros(2, 576, sum(tv.PATCH_CLASSES))
    # sure of "background" everywhere: right on the background, badly wrong on the object patches
    for start in (0, tv.PATCH_CLASSES[0], tv.PATCH_CLASSES[0] + tv.PATCH_CLASSES[1]):
        logits[..., start] = 30.0
    plain = tv.patch_attribute_loss(logits, labels).item()
    balanced = tv.patch_attribute_loss(logits, labels, balanced=True).item()
    assert math.isclose(plain, 30.0 * 20 / 576, rel_tol=1e-4)  # the object patches' share of the mean
    assert math.isclose(balanced, 30.0 / 2, rel_tol=1e-4)  # half the weight, whatever their number
    uniform = torch.zeros_like(logits)  # the same loss on every patch: both means agree
    expected = sum(math.log(c) for c in tv.PATCH_CLASSES) / 3
    assert math.isclose(tv.patch_attribute_loss(uniform, labels, balanced=True).item(), expected, rel_tol=1e-5)
    assert math.isclose(tv.patch_attribute_loss(uniform, labels).item(), expected, rel_tol=1e-5)


def test_grid_sincos_similarity_depends_only_on_the_offset():
    import pytest
    import torch


    code = tv.grid_sincos(6, 16)
    assert code.shape == (36, 16)

    def at(row: int, col: int) -> torch.Tensor:
        return code[row * 6 + col]

    # the same offset (1, 2) from two different places, and the same place at two offsets
    assert torch.isclose(at(0, 0) @ at(1, 2), at(3, 1) @ at(4, 3), atol=1e-5)
    assert not torch.isclose(at(0, 0) @ at(1, 2), at(0, 0) @ at(2, 2), atol=1e-3)
    assert torch.allclose(code.norm(dim=1), torch.full((36,), 8**0.5))  # dim / 2 unit sin-cos pairs
    with pytest.raises(ValueError, match="multiple of 4"):
        tv.grid_sincos(6, 18)


def test_boosted_patch_positions_add_the_scaled_grid_code_and_leave_cls_alone():
    import random

    import torch

    from pio_fvlm import shapes_vlm as sv
    from pio_fvlm import synthetic as syn

    model = tv.build_model(seed=2, vision_width=32, vision_layers=1, text_width=32, text_layers=1)
    embeddings = model.model.vision_tower.embeddings
    before = embeddings.position_embedding.weight.detach().clone()
    norm = tv.boost_patch_positions(model, 0.5, seed=7)
    added = embeddings.position_embedding.weight.detach() - before
    assert torch.equal(added[0], torch.zeros(32))  # [CLS]
    rng = random.Random(7)  # the patch embeddings' norm the code is scaled to, measured again
    scenes = [syn.render(syn.random_scene(rng, rng.randint(1, 4)), rng) for _ in range(8)]
    with torch.no_grad():
        patch_norm = embeddings.patch_embedding(sv.pixels(scenes)).flatten(2).norm(dim=1).mean().item()
    assert abs(norm - 0.5 * patch_norm) < 1e-4 * patch_norm
    code = tv.grid_sincos(24, 32)
    torch.testing.assert_close(added[1:], code / code.norm(dim=1, keepdim=True) * norm, rtol=1e-5, atol=1e-5)


def test_patch_loss_weights_and_object_patch_accuracy():
    import math

    import torch


    gen = torch.Generator().manual_seed(0)
    labels = torch.zeros(2, 3, 576, dtype=torch.long)
    labels[:, 0, :40], labels[:, 1, :40], labels[:, 2, :40] = 2, 3, 1  # 40 patches of a green triangle, left
    logits = torch.randn(2, 576, sum(tv.PATCH_CLASSES), generator=gen)
    colour, shape, column = logits.split(tv.PATCH_CLASSES, dim=-1)
    shape_only = torch.nn.functional.cross_entropy(shape.flatten(0, 1), labels[:, 1].flatten())
    assert math.isclose(tv.patch_attribute_loss(logits, labels, weights=(0.0, 1.0, 0.0)).item(), shape_only.item(),
                        rel_tol=1e-5)
    parts = [tv.patch_attribute_loss(logits, labels, weights=w).item() for w in ((1, 0, 0), (0, 1, 0), (0, 0, 1))]
    weighted = tv.patch_attribute_loss(logits, labels, weights=(1.0, 4.0, 1.0)).item()
    assert math.isclose(weighted, (parts[0] + 4 * parts[1] + parts[2]) / 6, rel_tol=1e-5)

    # accuracy counts object patches only: right colour on all of them, right shape on a quarter
    logits = torch.zeros(2, 576, sum(tv.PATCH_CLASSES))
    logits[..., 2] = 5.0  # colour class 2 everywhere (wrong on the background, not counted)
    logits[:, :10, tv.PATCH_CLASSES[0] + 3] = 5.0  # shape 3 on the first 10 of the 40 object patches
    logits[:, :, sum(tv.PATCH_CLASSES[:2]) + 2] = 5.0  # column 2 everywhere: wrong on every object patch
    assert tv.patch_attribute_accuracy(logits, labels) == [1.0, 0.25, 0.0]


def test_focus_targets_and_recomputed_head_attention_match_the_model():
    """``--focus`` supervises one head's attention at the answer position: the targets are the
    tokens of the object the question names, and the weights recomputed from the layer's inputs
    (any backend) are the ones eager attention returns, hidden tokens included."""
    import torch

    from pio_fvlm import shapes_vlm as sv

    batch = tv.training_batch(random.Random(2), 3, 4, pairs=6)
    targets = tv.pop_targets(batch)
    query, tokens = targets["focus_query"], targets["focus_tokens"]
    ids, words = batch["input_ids"], {v: k for k, v in sv.word_ids().items()}
    colour_of = {i + 1: c for i, c in enumerate(syn.COLORS)}
    shape_of = {i + 1: s for i, s in enumerate(syn.SHAPES)}
    checked = 0
    for b, p in (query >= 0).nonzero().tolist():
        q = int(query[b, p])
        assert words[int(ids[b, q])] == "answer" and batch["labels"][b, q + 1] != -100
        start = q - 1
        while int(batch["position_ids"][b, start]) != sv.N_VISUAL:
            start -= 1
        question = {words[int(t)] for t in ids[b, start:q]}
        on = tokens[b, p]
        assert on.any()
        # every focus token lies on an object with the question's colour / shape words
        for k, names in ((0, colour_of), (1, shape_of)):
            seen = {names[int(c)] for c in targets["patch_labels"][b, k][on].unique()}
            named = question & set(names.values())
            assert not named or seen == named
        checked += 1
    assert checked >= 6
    counting = [(b, p) for b, p in (query < 0).nonzero().tolist()]
    assert all(not tokens[b, p].any() for b, p in counting)

    model = tv.build_model(vision_width=32, vision_layers=1, text_width=32, text_layers=3)
    model.set_attn_implementation("eager")
    keep = tv.token_keep(targets["patch_labels"], random.Random(1), share=1.0)
    columns: list[torch.Tensor] = []
    tv.hide_dropped_tokens(model.model.language_model.layers, 1, columns)
    columns.append(torch.cat([keep, torch.ones(3, ids.shape[1] - sv.N_VISUAL, dtype=torch.bool)], dim=1))
    captured: list[dict] = []
    attention = model.model.language_model.layers[2].self_attn
    attention.register_forward_pre_hook(lambda m, a, kw: captured.append(kw), with_kwargs=True)
    mask = batch.pop("attention_mask")
    # eager attention adds the mask: pass it additive, as the bool one would be read wrongly
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    model.train()
    with torch.no_grad():
        out = model(**batch, attention_mask=additive, output_attentions=True)
        kw = captured[-1]
        weights = tv.head_attention(attention, kw["hidden_states"], kw["position_embeddings"],
                                    kw["attention_mask"], 1, query)
    eager = out.attentions[2][:, 1]  # (B, L, L)
    for b, p in (query >= 0).nonzero().tolist():
        torch.testing.assert_close(weights[b, p], eager[b, int(query[b, p])], rtol=1e-4, atol=1e-6)
        assert (weights[b, p, : sv.N_VISUAL][~keep[b]] == 0).all()  # hidden tokens get nothing
    loss = tv.focus_loss(weights, query, tokens & keep[:, None, :])
    use = (query >= 0) & (tokens & keep[:, None, :]).any(-1)
    mass = (weights[..., : sv.N_VISUAL] * (tokens & keep[:, None, :])).sum(-1)[use]
    torch.testing.assert_close(loss, -(mass + 1e-6).log().mean())


def test_relative_focus_loss_ignores_the_background_and_single_object_scenes() -> None:
    import math

    import torch

    from pio_fvlm import shapes_vlm as sv

    n = sv.N_VISUAL
    weights = torch.zeros(1, 3, n + 5)  # 3 pairs; 5 text columns after the image
    tokens = torch.zeros(1, 3, n, dtype=torch.bool)
    among = torch.zeros(1, 3, n, dtype=torch.bool)
    # pair 0: named object = tokens 0-3 (weight 0.1 each), another object = 10-11 (0.1 each), background 0.4
    tokens[0, 0, 0:4] = True
    among[0, 0, 0:4] = among[0, 0, 10:12] = True
    weights[0, 0, 0:4] = weights[0, 0, 10:12] = 0.1
    weights[0, 0, 100] = 0.4
    # pair 1: the only object in the scene, half the weight on it: no other object, left out
    tokens[0, 1, 20:22] = among[0, 1, 20:22] = True
    weights[0, 1, 20:22] = 0.25
    weights[0, 1, n] = 0.5
    # pair 2: two objects weighted alike, nearly all the weight on the background
    tokens[0, 2, 30] = True
    among[0, 2, 30] = among[0, 2, 40] = True
    weights[0, 2, 30] = weights[0, 2, 40] = 0.01
    weights[0, 2, 200] = 0.98
    query = torch.tensor([[7, 8, 9]])
    got = tv.focus_loss(weights, query, tokens, among=among)
    want = (-math.log(0.4 / 0.6) + math.log(2)) / 2  # pairs 0 and 2 only; background ignored
    assert abs(got.item() - want) < 1e-4
    plain = tv.focus_loss(weights, query, tokens)  # the plain loss counts the background, all 3 pairs
    assert abs(plain.item() - (-math.log(0.4) - math.log(0.5) - math.log(0.01)) / 3) < 1e-4
    query[0, 0] = query[0, 2] = -1  # no pair left with another object: zero, not NaN
    assert tv.focus_loss(weights, query, tokens, among=among).item() == 0.0


def test_object_shape_logits_pool_each_objects_tokens_and_name_its_shape() -> None:
    import torch


    labels = torch.zeros(1, 3, 576, dtype=torch.long)
    labels[0, :2, 0:10] = torch.tensor([[1], [2]])  # colour 1, shape 2 (a square): patches 0-9
    labels[0, :2, 20:25] = torch.tensor([[3], [1]])  # colour 3, shape 1 (a circle): patches 20-24
    features = torch.randn(1, 576, 3) * 10  # the background: noise that must not enter the pools
    features[0, 0:10] = torch.tensor([1.0, 2.0, 3.0]) + torch.arange(10.0)[:, None]
    features[0, 20:25] = torch.tensor([-1.0, 0.0, 5.0])
    logits, shapes = tv.object_shape_logits(features, labels, torch.nn.Identity())
    assert shapes.tolist() == [1, 0]  # shape indices into SHAPES: square, circle
    assert torch.allclose(logits, torch.tensor([[5.5, 6.5, 7.5], [-1.0, 0.0, 5.0]]))


def test_auxiliary_loss_both_puts_shape_in_every_patch_pooled_only_in_the_mean() -> None:
    import torch


    labels = torch.zeros(2, 3, 576, dtype=torch.long)
    labels[:, :, 0:10] = torch.tensor([1, 2, 1])[:, None]  # colour 1, square, column 1
    labels[:, :, 40:50] = torch.tensor([2, 1, 3])[:, None]  # colour 2, circle, column 3
    torch.manual_seed(0)
    features = torch.randn(2, 576, 8)
    shape_head = torch.nn.Linear(8, 3)
    weights = (1.0, 4.0, 1.0)
    n_classes, shape_part = sum(tv.PATCH_CLASSES), slice(tv.PATCH_CLASSES[0], sum(tv.PATCH_CLASSES[:2]))

    def shape_gradient(target: str) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.randn(2, 576, n_classes, generator=torch.Generator().manual_seed(1), requires_grad=True)
        loss, seen = tv.auxiliary_loss(logits, features, labels, shape_head, target, weights=weights, balanced=True)
        loss.backward()
        return loss.detach(), logits.grad[..., shape_part].abs().sum()

    for target in ("patch", "pooled", "both"):
        loss, _ = shape_gradient(target)
        assert torch.isfinite(loss)
    # the per-patch shape logits get a gradient from "patch" and "both", none from "pooled"
    assert shape_gradient("pooled")[1] == 0
    assert shape_gradient("both")[1] > 0 and shape_gradient("patch")[1] > 0

    logits = torch.randn(2, 576, n_classes, generator=torch.Generator().manual_seed(1))
    per_patch = tv.patch_attribute_loss(logits, labels, balanced=True, weights=weights)
    patch_only, _ = tv.auxiliary_loss(logits, features, labels, shape_head, "patch", weights=weights, balanced=True)
    torch.testing.assert_close(patch_only, per_patch)
    pooled_logits, shapes = tv.object_shape_logits(features, labels, shape_head)
    pooled = torch.nn.functional.cross_entropy(pooled_logits, shapes)
    both, _ = tv.auxiliary_loss(logits, features, labels, shape_head, "both", weights=weights, balanced=True)
    torch.testing.assert_close(both, (per_patch * 6 + 4 * pooled) / 10)  # shape's weight counts twice
    colour_column = tv.patch_attribute_loss(logits, labels, balanced=True, weights=(1.0, 0.0, 1.0))
    pooled_only, seen = tv.auxiliary_loss(logits, features, labels, shape_head, "pooled", weights=weights,
                                          balanced=True)
    torch.testing.assert_close(pooled_only, (colour_column * 2 + 4 * pooled) / 6)
    assert seen[1] == float((pooled_logits.argmax(-1) == shapes).float().mean())  # per object, not per patch
    try:
        tv.auxiliary_loss(logits, features, labels, shape_head, "edges")
    except ValueError as error:
        assert "'patch', 'pooled' or 'both'" in str(error)
    else:
        raise AssertionError("an unknown shape target was accepted")
