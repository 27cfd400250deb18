"""lmms-eval model ``pio_fvlm``: any supported HF VLM, wrapped, evaluated by lmms-eval.

    pip install "pio-fvlm[lmms]"
    lmms-eval --model pio_fvlm \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,budget=64,attn_implementation=flash_attention_2 \\
        --tasks gqa,mme,pope --batch_size 8
    accelerate launch --num_processes 8 -m lmms_eval --model pio_fvlm ...   # data parallel

``--model_args``: ``pretrained`` (HF id or folder), the :func:`pio_fvlm.wrap` settings
``budget``, ``layer``, ``nms_threshold``, ``preset``, ``encoder``, ``encoder_budget``,
``prune=false`` (the same pipeline unpruned, for retention), and ``device``, ``dtype``,
``attn_implementation``, ``batch_size``, ``max_new_tokens``, ``chat_template``. Prompts use the
processor's chat template when it has one (LLaVA-1.5-hf, Qwen2.5-VL), else ``<image> question``.
Requests are batched with left padding (lmms-eval's own ``llava_hf`` runs batch 1 only).

This module imports lmms-eval; the entry point that registers it is
:mod:`pio_fvlm.integrations.lmms_eval_manifest`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from .. import unwrap, wrap
from ..compat import forward_cache_keyword, output_cache

WRAP_ARGS = ("budget", "layer", "nms_threshold", "preset", "encoder", "encoder_budget")


class PioFvlm(lmms):
    """An lmms-eval model that loads ``pretrained`` and prunes its visual tokens with PIO-FVLM."""

    def __init__(
        self,
        pretrained: str,
        budget: int | float | None = 64,
        layer: int | None = None,
        nms_threshold: float | None = None,
        preset: str | None = None,
        encoder: str | None = None,
        encoder_budget: int | None = None,
        prune: bool = True,
        device: str | None = None,
        dtype: str = "auto",
        attn_implementation: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int = 128,
        chat_template: str | None = None,
        **unexpected: Any,
    ) -> None:
        super().__init__()
        if unexpected:
            raise ValueError(f"pio_fvlm: unknown --model_args {sorted(unexpected)}; known: pretrained, "
                             f"{', '.join(WRAP_ARGS)}, prune, device, dtype, attn_implementation, batch_size, "
                             "max_new_tokens, chat_template")
        from accelerate import Accelerator
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.accelerator = Accelerator()
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        if device is None:  # one GPU per process under `accelerate launch`; CPU when there is none
            device = f"cuda:{self.accelerator.local_process_index}" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        torch_dtype: Any = dtype if dtype == "auto" else getattr(torch, str(dtype))
        load_kwargs: dict[str, Any] = {"dtype": torch_dtype, "device_map": str(self._device)}
        if attn_implementation:
            load_kwargs["attn_implementation"] = attn_implementation
        self.model: Any = AutoModelForImageTextToText.from_pretrained(pretrained, **load_kwargs).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained)
        self.processor.tokenizer.padding_side = "left"  # batched generate wants left padding
        if chat_template is not None:
            self.processor.chat_template = chat_template
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.prune = bool(prune)
        self.wrap_settings: dict[str, Any] = {
            k: v for k, v in dict(budget=budget, layer=layer, nms_threshold=nms_threshold, preset=preset,
                                  encoder=encoder, encoder_budget=encoder_budget).items() if v is not None
        }
        if preset is not None:
            self.wrap_settings.pop("budget", None)  # a preset carries its own budgets
        if self.prune:
            wrap(self.model, **self.wrap_settings)

    # lmms-eval reads these
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    # --- prompts -------------------------------------------------------------------------------
    def prompt(self, context: str, n_images: int) -> str:
        """The model's text for one request: chat template with ``n_images`` image slots when
        the processor has one, else image tokens then the context."""
        image_token = getattr(self.processor, "image_token", "<image>")
        if image_token in context:  # the task placed its images itself
            n_images = 0
        if getattr(self.processor, "chat_template", None):
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": context}]
            return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True)
        return " ".join([image_token] * n_images + [context])

    def encode(self, texts: list[str], images: list[Any]) -> dict[str, torch.Tensor]:
        """Processor outputs for a batch, on the model's device, floats in the model's dtype."""
        inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        out = {}
        for key, value in inputs.items():
            value = value.to(self._device)
            if value.is_floating_point():
                value = value.to(self.model.dtype)
            out[key] = value
        return out

    @staticmethod
    def visuals_of(request_args: Sequence[Any], task_dict: dict[str, Any]) -> list[Any]:
        """The images of one request: ``doc_to_visual(doc)``, flattened, ``None`` dropped."""
        doc_to_visual, doc_id, task, split = request_args[2:6]
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(task_dict[task][split][doc_id])
        flat: list[Any] = []
        for v in visuals if isinstance(visuals, list | tuple) else [visuals]:
            flat.extend(v if isinstance(v, list | tuple) else [v])
        return [v for v in flat if v is not None]

    # --- lmms-eval API -------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy (or sampled, per the task's ``generation_kwargs``) answers, batched."""
        from tqdm import tqdm

        def order(args: tuple) -> tuple[int, str]:  # longest first: padding waste and OOMs show early
            return -len(self.tokenizer(args[0])["input_ids"]), args[0]

        collator = lmms_utils.Collator([r.args for r in requests], order, grouping=True)
        answers: list[str] = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="pio_fvlm")
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            gen_kwargs = dict(chunk[0][1])
            until = gen_kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            texts, images = [], []
            for args in chunk:
                visuals = self.visuals_of(args, self.task_dict)
                texts.append(self.prompt(args[0], len(visuals)))
                images.extend(visuals)
            inputs = self.encode(texts, images)
            temperature = float(gen_kwargs.get("temperature", 0) or 0)
            generate_kwargs: dict[str, Any] = {
                "max_new_tokens": int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                "do_sample": temperature > 0,
                "num_beams": int(gen_kwargs.get("num_beams", 1) or 1),
                "pad_token_id": self.tokenizer.pad_token_id,
            }
            if temperature > 0:
                generate_kwargs.update(temperature=temperature, top_p=gen_kwargs.get("top_p"))
            with torch.inference_mode():
                out = self.model.generate(**inputs, **generate_kwargs)
            new_tokens = out[:, inputs["input_ids"].shape[1]:]
            for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True):
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                answers.append(text.strip())
                progress.update(1)
        progress.close()
        return collator.get_original(answers)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """log p(continuation | image, context) and whether greedy decoding gives it.

        The context is prefilled first (that is where the visual tokens are chosen, as in
        generation: the continuation must not influence which tokens are kept); the
        continuation then runs against the pruned cache.
        """
        results = []
        for request in requests:
            context, doc_to_target = request.args[0], request.args[1]
            doc = self.task_dict[request.args[4]][request.args[5]][request.args[3]]
            continuation = doc_to_target(doc) if callable(doc_to_target) else doc_to_target
            if isinstance(continuation, list):
                continuation = continuation[0]
            visuals = self.visuals_of(request.args, self.task_dict)
            inputs = self.encode([self.prompt(context, len(visuals))], visuals)
            target = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
            results.append(self.score_continuation(inputs, target.to(self._device)))
        return results

    def score_continuation(self, inputs: dict[str, torch.Tensor], target: torch.Tensor) -> tuple[float, bool]:
        """Sum of log-probabilities of ``target`` (1, T) after the prompt ``inputs`` (batch 1)."""
        with torch.inference_mode():
            first = self.model(**inputs, use_cache=True)
            logits = [first.logits[:, -1:]]
            if target.shape[1] > 1:
                # No attention mask: one unpadded row needs none, and with one (prompt + continuation
                # long) Qwen-VL's M-RoPE gives positions for the whole mask instead of the new tokens
                # (a shape error); without it they continue from the cache, after the rope deltas.
                cache = output_cache(first)
                rest = self.model(input_ids=target[:, :-1], use_cache=True, **{self.cache_keyword: cache})
                logits.append(rest.logits)
            logprobs = torch.cat(logits, dim=1).float().log_softmax(-1)[0]
        picked = logprobs.gather(-1, target[0].unsqueeze(-1)).squeeze(-1)
        greedy = bool((logprobs.argmax(-1) == target[0]).all())
        return float(picked.sum()), greedy

    @property
    def cache_keyword(self) -> str:
        """The keyword the model's forward takes its KV cache by (``cache`` in transformers 5.2x)."""
        return forward_cache_keyword(self.model)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("pio_fvlm: multi-round generation is not supported; use single-round tasks")

    def set_pruning(self, enabled: bool) -> None:
        """Switch pruning on or off without reloading (for full-vs-pruned runs in one process)."""
        if enabled and not self.prune:
            wrap(self.model, **self.wrap_settings)
        elif not enabled and self.prune:
            unwrap(self.model)
        self.prune = enabled


def requests_for(kind: str, items: list[tuple[Any, ...]], doc_to_visual: Callable[[Any], list[Any]],
                 task: str = "local") -> tuple[list[Instance], dict[str, Any]]:
    """Build lmms-eval ``Instance`` requests and the ``task_dict`` they refer to from plain
    ``(context, docs-dependent arg, doc)`` triples — for tests and scripts that drive the model
    without a dataset download."""
    docs = {i: item[-1] for i, item in enumerate(items)}
    requests = [
        Instance(request_type=kind, arguments=(item[0], item[1], doc_to_visual, i, task, "test"), idx=0,
                 metadata={"task": task, "doc_id": i, "repeats": 1})
        for i, item in enumerate(items)
    ]
    return requests, {task: {"test": docs}}
