"""The shipped tiny LLaVA still answers from the image, and PIO-FVLM at 64 tokens keeps its answers.

A guard on the committed asset and on the whole pruning path together: a corrupted or
mis-saved checkpoint, a processor that no longer lines up with it, or a selection that drops the
objects the questions ask about would all pass the invariant suite (which uses random weights)
and fail here. 100 of the test split's questions, scored as ``pio-fvlm demo`` scores them, ~15 s."""

import pytest

from pio_fvlm import shapes_vlm as sv


@pytest.mark.slow
def test_shipped_model_reads_the_image_and_pruning_keeps_its_answers():
    from transformers import LlavaForConditionalGeneration

    assert (sv.ASSET_DIR / "model.safetensors").exists(), f"the shipped checkpoint is missing from {sv.ASSET_DIR}"
    model = LlavaForConditionalGeneration.from_pretrained(sv.ASSET_DIR).eval()
    full, pruned, blank = sv.demo_accuracy(model, n=100, budget=64)
    # Measured on the committed checkpoint: 92 % all tokens, 90 % at 64 kept, 33 % blank (README).
    # A model at its answer prior scores ~30-37 % with or without the image.
    assert full >= 0.80, f"all-token accuracy {full:.0%} on 100 test questions: the checkpoint is broken"
    assert blank <= 0.45, f"blank-image accuracy {blank:.0%}: the model answers without looking"
    assert pruned >= full - 0.03, f"64 tokens kept: {pruned:.0%} against {full:.0%} with all 576"


def test_chat_template_gives_the_trained_prompt_and_generation_ends_after_the_answer():
    import random

    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from pio_fvlm import synthetic as syn

    processor = AutoProcessor.from_pretrained(sv.ASSET_DIR)
    model = LlavaForConditionalGeneration.from_pretrained(sv.ASSET_DIR).eval()
    rng = random.Random(7)
    objects = syn.random_scene(rng, 2)
    image = Image.fromarray(syn.render(objects, rng))
    for qa in syn.questions(objects, rng):
        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": qa.question}]}]
        text = processor.apply_chat_template(chat, add_generation_prompt=True)
        inputs = processor(images=image, text=text, return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == sv.prompt_rows([qa])[0]
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
        answer = out[0, inputs["input_ids"].shape[1]:].tolist()
        assert len(answer) == 1 and syn.VOCAB[answer[0]] in syn.ANSWER_WORDS  # one word, then generation ends


def test_training_code_rebuilds_the_shipped_processor_and_generation_settings():
    from transformers import AutoProcessor, GenerationConfig

    import tiny_vlm as tv  # training/, on the test path

    built = tv.build_processor()
    shipped = AutoProcessor.from_pretrained(sv.ASSET_DIR)
    assert built.chat_template == shipped.chat_template
    assert built.tokenizer.get_vocab() == shipped.tokenizer.get_vocab()
    model = tv.build_model(vision_width=32, vision_layers=1, text_width=32, text_layers=2)
    tv.end_generation_after_the_answer(model)
    assert model.generation_config.eos_token_id == GenerationConfig.from_pretrained(sv.ASSET_DIR).eos_token_id


def test_the_package_ships_the_model_and_nothing_of_its_training():
    shipped = sorted(p.name for p in sv.ASSET_DIR.iterdir())
    assert shipped == ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
                       "processor_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert sum(p.stat().st_size for p in sv.ASSET_DIR.iterdir()) < 10 * 2**20
    package = sv.ASSET_DIR.parents[1]
    assert not any("train" in p.name for p in package.rglob("*.py"))
