"""lmms-eval's ``pio_fvlm`` model on a tiny random checkpoint of every family (saved with a
matching processor, loaded like a real one): batched greedy answers over images of different
sizes equal the same prompts run one at a time through the model wrapped by hand, the prompts
come from the checkpoint's chat template, the budget holds, and log-likelihoods equal those of
generation forced to write the continuation."""

import numpy as np
import pytest
import torch

lmms_eval = pytest.importorskip("lmms_eval", reason="install the [lmms] extra (CI does)")


from pio_fvlm import is_wrapped, last_selection, wrap  # noqa: E402
from pio_fvlm.integrations.lmms_eval import PioFvlm, requests_for  # noqa: E402
from tiny_checkpoints import (  # noqa: E402
    CHAT_ASSISTANT,
    CHAT_USER,
    CHECKPOINT_IMAGE_MARKUP,
    images_only_processors,
    load_checkpoint,
    tiny_checkpoint,
)
from tiny_models import FAMILIES  # noqa: E402

BUDGET = 3  # below every image's visual-token count (4 to 24 here): every sample is pruned
NEW_TOKENS = 3
# (context, image sizes (height, width)): contexts of distinct lengths (lmms-eval orders requests
# by length), images of different sizes and aspect ratios (different visual-token counts, except
# LLaVA-1.5), one request with two images
ITEMS = [("w1 w2 w3 w4 w5", [(40, 40)]), ("w6 w7 w8 w9", [(50, 120), (64, 48)]), ("w10 w11 w12", [(120, 60)]),
         ("w13 w14", [(90, 90)]), ("w15", [(30, 100)])]
UNTIL = CHAT_ASSISTANT  # the tiny models sometimes write it: answers are cut there


def _images(doc):
    """The document's images: (height, width, 3) noise as PIL images, the same for the same document."""
    from PIL import Image

    rng = np.random.default_rng(doc["seed"])
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in doc["sizes"]]


def _docs():
    return [{"context": c, "sizes": s, "seed": i} for i, (c, s) in enumerate(ITEMS)]


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    family = request.param
    return family, tiny_checkpoint(family, tmp_path_factory.mktemp(family))


def _by_hand(family, folder, prune):
    """Each document alone: the template's text written out, processor, generate, decode."""
    model, processor = load_checkpoint(folder)
    if prune:
        wrap(model, budget=BUDGET)
    markup = CHECKPOINT_IMAGE_MARKUP.get(family, "<image>")
    answers = []
    for doc in _docs():
        images = _images(doc)
        text = f"{CHAT_USER} {f'{markup} ' * len(images)}{doc['context']} {CHAT_ASSISTANT}"
        inputs = processor(text=[text], images=images, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
        answer = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        answers.append(answer.split(UNTIL)[0].strip())
    return answers


@pytest.mark.parametrize("prune", [True, False], ids=["pruned", "full"])
def test_generate_until_batched_equals_the_model_by_hand(checkpoint, prune, monkeypatch):
    family, folder = checkpoint
    with images_only_processors():
        lm = PioFvlm(pretrained=str(folder), budget=BUDGET, prune=prune, batch_size=2, device="cpu")
    prompt = lm.prompt("w1", 1)
    markup = CHECKPOINT_IMAGE_MARKUP.get(family, "<image>")
    assert prompt == f"{CHAT_USER} {markup} w1 {CHAT_ASSISTANT}"  # the checkpoint's chat template
    assert lm.processor.image_token_id == lm.model.config.image_token_id

    items = [(doc["context"], {"until": [UNTIL], "max_new_tokens": NEW_TOKENS}, doc) for doc in _docs()]
    requests, lm.task_dict = requests_for("generate_until", items, _images)
    kept = []  # per generate call (batches of 2, 2, 1), the visual tokens each sample kept
    generate = lm.model.generate

    def generate_and_record(**inputs):
        out = generate(**inputs)
        kept.append([len(row) for row in last_selection(lm.model)] if prune else [])
        return out

    monkeypatch.setattr(lm.model, "generate", generate_and_record)
    got = lm.generate_until(requests)
    assert any(got)  # the tiny models write words, so the comparison below compares text
    assert got == _by_hand(family, folder, prune)
    assert is_wrapped(lm.model) == prune
    if prune:
        assert kept == [[BUDGET, BUDGET], [BUDGET, BUDGET], [BUDGET]]


CONTINUATION = "w40 w41 w42"


def _forced_logprob(model, inputs, target):
    """log p(target | prompt) read from generation forced to write ``target`` (a list of ids): the
    decode path generation takes, pruned or not; and whether each forced token was the argmax."""
    start = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_new_tokens=len(target), do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0,
                         prefix_allowed_tokens_fn=lambda _, ids: [target[len(ids) - start]])
    logprobs = torch.stack(out.logits, 1)[0].float().log_softmax(-1)  # (T, vocab): raw logits, not forced
    ids = torch.tensor(target)
    return float(logprobs.gather(-1, ids[:, None]).sum()), bool((logprobs.argmax(-1) == ids).all())


@pytest.mark.parametrize("prune", [True, False], ids=["pruned", "full"])
def test_loglikelihood_equals_forced_generation(checkpoint, prune):
    _, folder = checkpoint
    with images_only_processors():
        lm = PioFvlm(pretrained=str(folder), budget=BUDGET, prune=prune, device="cpu")
    docs = _docs()[:2]  # one image, two images
    requests, lm.task_dict = requests_for("loglikelihood", [(d["context"], CONTINUATION, d) for d in docs], _images)
    got = lm.loglikelihood(requests)
    target = lm.tokenizer(CONTINUATION, add_special_tokens=False)["input_ids"]
    for doc, (logprob, greedy) in zip(docs, got):
        images = _images(doc)
        inputs = lm.encode([lm.prompt(doc["context"], len(images))], images)
        with torch.inference_mode():
            want, want_greedy = _forced_logprob(lm.model, inputs, target)
        assert logprob == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy
    # the model's own greedy next word, scored as a continuation, is greedy (the random model's
    # argmax is sometimes an id outside the tokenizer's words: those documents are passed over)
    scored = 0
    for doc in _docs():
        images = _images(doc)
        inputs = lm.encode([lm.prompt(doc["context"], len(images))], images)
        with torch.inference_mode():
            own = lm.model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=0)[0, -1:]
        answer = lm.tokenizer.decode(own)
        if lm.tokenizer(answer, add_special_tokens=False)["input_ids"] != own.tolist():
            continue
        requests, lm.task_dict = requests_for("loglikelihood", [(doc["context"], answer, doc)], _images)
        assert lm.loglikelihood(requests)[0][1] is True
        scored += 1
    assert scored > 0
