"""What many tests share: standard prompts, a fixed-set selector, the invariants as assertions,
loading a repository script as a module."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

from pio_fvlm.measure import layer_lengths  # noqa: F401
from pio_fvlm.select import SelectionRequest, select_with_nms
from tiny_models import FAMILIES, VIDEO_FAMILIES, Prompt, make_batch, tiny_llava, tiny_vlm  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def load_script(relative: str) -> ModuleType:
    """A script of the repository (``"training/train_tiny_vlm.py"``, ``"benchmarks/quality.py"``)
    imported as a module, for its functions; its folder is on ``sys.path`` while it loads, as
    when it runs (``probe_binding`` imports its neighbour ``probe_tower_shape``)."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


class FixedSelector:
    """Keeps the same visual tokens whatever the hidden states: by their rank among the row's
    visual tokens (a scrambled but deterministic order). Used to compare cached decoding with
    an uncached recompute on the same kept set."""

    calls = 0

    def __call__(self, request: SelectionRequest) -> torch.Tensor:
        FixedSelector.calls += 1
        cand = request.candidates
        rank = cand.long().cumsum(1) - 1
        score = ((rank * 7919) % 1009).float()
        return select_with_nms(score, request.probe_inputs.hidden, cand, request.budgets, None)


def standard_prompts(model) -> list[Prompt]:
    """Two prompts of different text lengths (and, where the family allows, different visual
    counts); families with videos get a third, video-only prompt."""
    prompts = [
        Prompt(before=[5, 6], after=[9, 10, 11, 12, 13], size=0),
        Prompt(before=[5, 6, 20, 21, 22], after=[9, 10, 14], size=1 if model.config.model_type != "llava" else 0),
    ]
    if model.config.model_type in VIDEO_FAMILIES:
        prompts.append(Prompt(before=[5, 30], after=[9, 10, 11], images=0, videos=1))
    return prompts


def standard_batch(model, seed: int = 0):
    """Prompts of different text lengths, left padded (see standard_prompts)."""
    return make_batch(model, standard_prompts(model), seed=seed)


def n_visual(inputs) -> list[int]:
    ids = inputs["input_ids"]
    return ((ids == 3) | (ids == 4)).sum(1).tolist()


def logits_equal_on_valid(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, atol: float = 1e-5) -> bool:
    m = mask.bool()
    return torch.allclose(a[m], b[m], atol=atol, rtol=1e-4)


GREEDY = dict(max_new_tokens=4, do_sample=False, suppress_tokens=[0, 1, 2, 3, 4])


def assert_batch_equals_alone(model, prompts, batch, gen=GREEDY) -> None:
    """The wrapped model's batched generate equals each sample generated alone."""
    from tiny_models import split_batch

    out = model.generate(**batch, **gen)
    length = batch["input_ids"].shape[1]
    for i in range(len(prompts)):
        alone = split_batch(model, prompts, batch, i)
        solo = model.generate(**alone, **gen)
        assert out[i, length:].tolist() == solo[0, alone["input_ids"].shape[1]:].tolist(), f"sample {i}"


def assert_cached_equals_uncached_and_batch_equals_alone(model, prompts, **wrap_kwargs) -> None:
    """With a fixed kept set, cached generate == uncached recompute; with PIO, batch == alone."""
    import pio_fvlm

    batch = make_batch(model, prompts)
    pio_fvlm.wrap(model, **wrap_kwargs, selector=FixedSelector())
    cached = model.generate(**batch, **GREEDY)
    assert torch.equal(cached, model.generate(**batch, use_cache=False, **GREEDY))
    pio_fvlm.wrap(model, **wrap_kwargs)
    assert_batch_equals_alone(model, prompts, batch)


def assert_encoder_then_pio_stages(model, encoder_sizes: list[int], pio_sizes: list[int]) -> None:
    """The last call kept ``encoder_sizes[b]`` tokens of sample b at stage 0 (the encoder) and
    ``pio_sizes[b]`` at stage 1, the latter a subset of the former."""
    import pio_fvlm

    stage0, stage1 = pio_fvlm.last_selection(model, 0), pio_fvlm.last_selection(model, 1)
    assert [len(s) for s in stage0] == encoder_sizes and [len(s) for s in stage1] == pio_sizes
    for a, b in zip(stage0, stage1):
        assert set(b.tolist()) <= set(a.tolist())


def with_cache(model, cache) -> dict:
    """``cache`` as the keyword argument the model's forward takes it by (``cache`` in
    transformers 5.2x, ``past_key_values`` in 5.20)."""
    from pio_fvlm.compat import forward_cache_keyword

    return {forward_cache_keyword(model): cache}


SERVING_BUDGET = 48  # the budget of the servers the serving tests start


def assert_batch_answers_equal_alone(generator, requests) -> list:
    """``generator`` (a serving BatchGenerator) answers ``requests`` together; every answer equals
    the one the request gets alone (text, token counts, visual tokens seen and kept). Returns the
    batched answers."""
    from pio_fvlm.serving.core import ChatAnswer

    batched = generator.generate(requests)
    assert all(isinstance(answer, ChatAnswer) for answer in batched), batched
    for request, answer in zip(requests, batched):
        alone = generator.generate([request])[0]
        assert isinstance(alone, ChatAnswer)
        assert (answer.text, answer.completion_tokens, answer.prompt_tokens) == (
            alone.text, alone.completion_tokens, alone.prompt_tokens)
        assert (answer.visual_seen, answer.visual_kept) == (alone.visual_seen, alone.visual_kept)
    return batched
