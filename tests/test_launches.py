"""What a pruned prefill dispatches on top of the unpruned one: kernel-launching ops and host reads.

On a GPU at batch 1 a prefill is bound by kernel launches, so these counts (the same on CPU and
GPU for the same code path) decide whether pruning pays there. The limits below pin today's
overhead so that it cannot grow unnoticed.
"""

import copy

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import pio_fvlm
from pio_fvlm.measure import OpStats, count_launches

MAX_EXTRA_KERNEL_OPS = 150  # probe + NMS + bookkeeping, whatever the depth
MAX_EXTRA_HOST_READS = 2  # the visual-token counts at the call's start, the NMS's one check
MAX_NOOP_EXTRA_KERNEL_OPS = 3  # a budget that keeps everything


@pytest.fixture(scope="module")
def llava_32_layers():
    """LLaVA-1.5's token layout (576 visual tokens) and depth (32 layers), narrow."""
    torch.manual_seed(0)
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=1, num_attention_heads=2)
    text = LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=32,
                       num_attention_heads=4, num_key_value_heads=4)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=499,
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    config._attn_implementation = "sdpa"
    return LlavaForConditionalGeneration(config).eval()


def _inputs(batch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.randint(1, 499, (batch, 5), generator=g), torch.full((batch, 576), 499),
                     torch.randint(1, 499, (batch, 45), generator=g)], 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(batch, 3, 336, 336, generator=g)}


def _count(model, inputs) -> tuple[int, int]:
    with torch.no_grad():
        model(**inputs)  # warm-up: caches built on the first call are not counted
        return count_launches(lambda: model(**inputs))


@pytest.mark.parametrize("batch", [1, 4])
def test_pruned_prefill_overhead_is_pinned(llava_32_layers, batch):
    inputs = _inputs(batch)
    full_ops, full_reads = _count(llava_32_layers, inputs)
    pruned = pio_fvlm.wrap(copy.deepcopy(llava_32_layers), budget=64)
    ops, reads = _count(pruned, inputs)
    assert 0 < ops - full_ops <= MAX_EXTRA_KERNEL_OPS, ops - full_ops
    assert reads - full_reads <= MAX_EXTRA_HOST_READS, reads - full_reads
    noop = pio_fvlm.wrap(copy.deepcopy(llava_32_layers), budget=576)
    noop_ops, noop_reads = _count(noop, inputs)
    assert noop_ops - full_ops <= MAX_NOOP_EXTRA_KERNEL_OPS
    assert noop_reads - full_reads <= 1


class _WindowCounter(OpStats):
    """Counts only while ``on``."""

    on = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.on:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


def test_no_ops_in_the_hooks_of_later_pruned_layers(llava_32_layers):
    """The pre-hooks of pruned layers after the first hand over prepared inputs and dispatch
    nothing (the first one gathers the kept tokens: one op)."""
    model = pio_fvlm.wrap(copy.deepcopy(llava_32_layers), budget=64)
    counter = _WindowCounter()
    per_layer: dict[int, int] = {}

    def start(module, args, kwargs):
        counter.kernels, counter.on = 0, True

    def stop(i, module, args, kwargs):
        counter.on = False
        per_layer[i] = counter.kernels

    layers = model.model.language_model.layers
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(start, with_kwargs=True, prepend=True))
        handles.append(layer.register_forward_pre_hook(lambda m, a, k, i=i: stop(i, m, a, k), with_kwargs=True))
    try:
        with torch.no_grad(), counter:
            model(**_inputs(1))
    finally:
        for h in handles:
            h.remove()
    assert per_layer[0] == 0
    assert per_layer[1] > 1  # the selection runs in layer 1's pre-hook
    assert all(per_layer[i] == 0 for i in range(2, len(layers))), per_layer


def test_counter_counts_host_reads_and_leaves_views_out():
    x = torch.arange(6.0).view(2, 3)
    with OpStats() as c:
        y = x.t().unsqueeze(0)  # views only
    assert (c.kernels, c.syncs) == (0, 0)
    with OpStats() as c:
        y = (x * 2).sum(1)
        y.tolist()
        float(y[0])
    assert c.kernels == 3  # mul, sum, and the scalar read
    assert c.syncs == 2  # tolist and the scalar read
    assert torch.Tensor.tolist(y) == [6.0, 24.0]  # the patched method is restored


def test_op_stats_measures_the_peak_of_what_is_allocated_inside():
    x = torch.zeros(1000, 250)  # 1 MB, made before: not counted, nor are views of it
    with torch.no_grad(), OpStats() as stats:
        y = x.view(250, 1000).t()
        a = x + 1  # 1 MB
        with stats.window():
            b = a * 2  # +1 MB
            del b
            c = a.sum()  # a few bytes
        del a
        d = x * 3  # 1 MB, after a was freed
    assert stats.peak_bytes == 2 * 1_000_000
    assert stats.window_peak_bytes == 1_000_000
    assert stats.live_bytes == 1_000_000 + c.untyped_storage().nbytes()
    del y, d


def test_pre_hook_seconds_reports_every_hooked_layer(llava_32_layers):
    from pio_fvlm.measure import pre_hook_seconds

    model = pio_fvlm.wrap(copy.deepcopy(llava_32_layers), budget=64)
    layers = model.model.language_model.layers
    with torch.no_grad():
        spent = pre_hook_seconds(layers, lambda: model(**_inputs(1)))
    assert sorted(spent) == list(range(len(layers)))
    assert all(s >= 0 for s in spent.values())
    assert all(len(layer._forward_pre_hooks) == 1 for layer in layers[1:])  # its own hooks are gone
