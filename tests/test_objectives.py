"""The prompt objectives against values computed by hand from each tiny model's raw logits, metrics, and errors."""
import math

import pytest
import torch

from mezo_kernels.data import Example
from mezo_kernels.models import add_lora, load_model
from mezo_kernels.objectives import (CausalLMObjective, MaskedLMObjective, ObjectiveOutput, accuracy, f1,
                                     make_objective, objective_value, scalar_objective)
from mezo_kernels.tasks import Task, get_task

SST2 = [Example("a great film with charming actors", None, 1), Example("a boring mess", None, 0),
        Example("the story was dull and the script was stupid", None, 0), Example("it was fun", None, 1),
        Example("brilliant", None, 0)]
RTE = [Example("The president said that the war is over.", "The war is over.", 0),
       Example("A man was killed in Iraq.", "Nobody died.", 1), Example("Oil prices rose.", "Oil is cheap.", 1)]


@pytest.fixture(scope="module")
def models():
    return {n: load_model(n, seed=0) for n in ("tiny-roberta", "tiny-bert", "tiny-llama", "tiny-opt")}


def ce(scores: torch.Tensor, label: int) -> float:
    return float(-(scores.double().log_softmax(-1))[label])


def hand_masked(model, tok, text: str, word_tokens: list[str]) -> torch.Tensor:
    """Label-word logits at the mask, from one unpadded forward."""
    ids = tok(text, return_tensors="pt")["input_ids"]
    pos = int((ids[0] == tok.mask_token_id).nonzero()[0, 0])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, pos]
    return logits[tok.convert_tokens_to_ids(word_tokens)]


@pytest.mark.parametrize("name", ["tiny-roberta", "tiny-bert"])
@pytest.mark.parametrize("task_name", ["sst2", "rte"])
def test_masked_matches_hand(models, name, task_name):
    model, tok, kind = models[name]
    task, batch = (get_task("sst2"), SST2) if task_name == "sst2" else (get_task("rte"), RTE)
    obj = make_objective(model, tok, task)
    assert isinstance(obj, MaskedLMObjective) and kind == "masked"
    with torch.no_grad():
        out = obj(batch)
    # BPE: word-initial tokens "Ġgreat"; WordPiece (lowercasing): "great", "yes"
    words = {"sst2": ["terrible", "great"], "rte": ["Yes", "No"]}[task_name]
    words = ["Ġ" + w for w in words] if name == "tiny-roberta" else [w.lower() for w in words]
    want = []
    for i, ex in enumerate(batch):
        m = tok.mask_token
        text = f"{ex.text_a} It was {m} ." if task_name == "sst2" else f"{ex.text_a} ? {m} , {ex.text_b}"
        s = hand_masked(model, tok, text, words)
        torch.testing.assert_close(out.logits[i], s, atol=1e-5, rtol=1e-5)
        want.append(ce(s, ex.label))
    assert out.logits.shape == (len(batch), 2) and out.loss.dtype == torch.float32 and out.loss.ndim == 0
    torch.testing.assert_close(out.per_example.double(), torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    assert out.loss.item() == pytest.approx(sum(want) / len(want), abs=1e-5)
    assert out.preds.tolist() == out.logits.argmax(-1).tolist()
    assert out.labels.tolist() == [e.label for e in batch]


def hand_causal(model, tok, prompt: str, cont: str, normalize: bool) -> float:
    """Sum (or mean) of the continuation's token log-probs, from one unpadded forward."""
    p = tok(prompt)["input_ids"]
    c = tok(cont, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = model(input_ids=torch.tensor([p + c])).logits[0].double().log_softmax(-1)
    s = sum(float(lp[len(p) - 1 + j, t]) for j, t in enumerate(c))
    return s / len(c) if normalize else s


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
@pytest.mark.parametrize("task_name", ["sst2", "rte", "multi"])
@pytest.mark.parametrize("normalize", [True, False])
def test_causal_matches_hand(models, name, task_name, normalize):
    model, tok, kind = models[name]
    if task_name == "multi":  # multi-token candidates of different lengths: one row per (example, candidate)
        task = Task("multi", {0: "terrible", 1: "absolutely wonderful"}, "{text_a} It was {mask} .")
        assert len(tok(" absolutely wonderful", add_special_tokens=False)["input_ids"]) > 2
    else:
        task = get_task(task_name)
    batch = RTE if task_name == "rte" else SST2
    obj = make_objective(model, tok, task, length_normalize=normalize)
    assert isinstance(obj, CausalLMObjective) and kind == "causal"
    with torch.no_grad():
        out = obj(batch)
    for i, ex in enumerate(batch):
        if task_name == "rte":
            prompt, conts = f'{ex.text_a}\nDoes this mean that "{ex.text_b}" is true? Yes or No?\n', ["Yes", "No"]
        else:
            prompt, conts = f"{ex.text_a} It was", [" " + w for w in task.words]
        s = torch.tensor([hand_causal(model, tok, prompt, c, normalize) for c in conts], dtype=torch.float64)
        torch.testing.assert_close(out.logits[i].double(), s, atol=2e-5, rtol=1e-5)
        assert out.per_example[i].item() == pytest.approx(ce(s, ex.label), abs=2e-5)


def test_causal_pad_fallback_and_truncation(models):
    model, tok, _ = models["tiny-llama"]
    assert tok.pad_token is None  # tiny-llama has no pad token: eos pads
    obj = CausalLMObjective(model, tok, get_task("sst2"), max_length=12)
    long = Example(" ".join(["the movie was great and the plot was dull"] * 10), None, 1)
    enc = obj.encode([long, SST2[1]])
    assert enc["input_ids"].shape[1] <= 12 and enc["input_ids"][0, 0] == tok.bos_token_id
    assert enc["input_ids"][1, -1] == tok.eos_token_id
    masked = MaskedLMObjective(*models["tiny-roberta"][:2], get_task("sst2"), max_length=16)
    enc = masked.encode([long])
    assert enc["input_ids"].shape[1] <= 16 and int(enc["mask_pos"][0]) > 0


def test_grad_enabled_and_lora(models):
    model, tok, _ = models["tiny-opt"]
    obj = make_objective(model, tok, get_task("sst2"))
    out = obj(SST2[:2])
    assert out.loss.requires_grad  # the caller decides about no_grad
    out.loss.backward()
    assert model.get_input_embeddings().weight.grad is not None
    model.zero_grad(set_to_none=True)
    base, tok_r, _ = load_model("tiny-roberta", seed=0)
    with torch.no_grad():
        ref = make_objective(base, tok_r, get_task("sst2"))(SST2).loss
        lora = add_lora(base)
        obj = make_objective(lora, tok_r, get_task("sst2"))  # detected through the peft wrapper
        assert isinstance(obj, MaskedLMObjective)
        assert obj(SST2).loss.item() == pytest.approx(ref.item(), abs=1e-6)  # LoRA B = 0 at init
    base, tok_l, _ = load_model("tiny-llama", seed=0)
    with torch.no_grad():
        ref = make_objective(base, tok_l, get_task("rte"))(RTE).logits
        obj = make_objective(add_lora(base), tok_l, get_task("rte"))
        assert isinstance(obj, CausalLMObjective)
        torch.testing.assert_close(obj(RTE).logits, ref, atol=1e-6, rtol=0)


def test_chat_wrapper(models):
    model, tok, _ = models["tiny-llama"]
    with pytest.raises(ValueError, match="chat template"):
        CausalLMObjective(model, tok, get_task("sst2"), chat=True)
    tok.chat_template = "{% for m in messages %}<s>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    try:
        obj = CausalLMObjective(model, tok, get_task("sst2"), chat=True)
        enc = obj.encode(SST2[:1])
        p = tok("<s>" + SST2[0].text_a + " It was\nA:", add_special_tokens=False)["input_ids"]
        assert enc["input_ids"][0, :len(p)].tolist() == p  # chat text carries its own bos: no second one
        want = []
        for w in ["terrible", "great"]:  # bare label words after the assistant header
            c = tok(w, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                lp = model(input_ids=torch.tensor([p + c])).logits[0].log_softmax(-1)
            want.append(sum(float(lp[len(p) - 1 + j, t]) for j, t in enumerate(c)) / len(c))
        with torch.no_grad():
            out = obj(SST2[:1])
        torch.testing.assert_close(out.logits[0], torch.tensor(want), atol=2e-5, rtol=1e-5)
    finally:
        tok.chat_template = None


def out_of(preds, labels):
    p, y = torch.tensor(preds), torch.tensor(labels)
    z = torch.zeros(len(preds))
    return ObjectiveOutput(torch.tensor(0.5), z, torch.zeros(len(preds), 2), p, y)


def test_metrics_and_objective_values(models):
    o = out_of([1, 1, 0, 0, 1], [1, 0, 0, 1, 1])  # TP 2, FP 1, FN 1, 3 right
    assert accuracy(o) == pytest.approx(0.6) and f1(o) == pytest.approx(4 / 6)
    assert f1(o, positive=0) == pytest.approx(2 / 4)
    assert objective_value(o, "neg_accuracy") == pytest.approx(-0.6)
    assert objective_value(o, "neg_f1") == pytest.approx(-4 / 6)
    assert objective_value(o, "ce") == pytest.approx(0.5)
    assert f1(out_of([0, 0], [0, 0])) == 1.0 and f1(out_of([0, 0], [0, 0]), zero_division=0.0) == 0.0
    assert f1(out_of([1, 1], [0, 0])) == 0.0
    with pytest.raises(ValueError, match="unknown objective"):
        objective_value(o, "acc")
    # from a real forward: -accuracy of the argmax of the same scores
    model, tok, _ = models["tiny-bert"]
    obj = make_objective(model, tok, get_task("sst2"))
    with torch.no_grad():
        out = obj(SST2)
        acc = sum(int(out.logits[i].argmax()) == e.label for i, e in enumerate(SST2)) / len(SST2)
        assert scalar_objective(obj, "neg_accuracy")(model, SST2) == pytest.approx(-acc)
        assert scalar_objective(obj)(model, SST2) == pytest.approx(out.loss.item())
        assert scalar_objective(lambda m, b: obj(b, model=m), "neg_f1")(model, SST2) == pytest.approx(-f1(out))
        assert scalar_objective(lambda m, b: 3.0)(model, SST2) == 3.0
    assert not math.isnan(out.loss.item())


def test_errors(models):
    model, tok, _ = models["tiny-roberta"]
    multi = Task("m", {0: "terrible", 1: "absolutely wonderful"}, "{text_a} It was {mask} .")
    with pytest.raises(ValueError, match="single token"):
        MaskedLMObjective(model, tok, multi)
    with pytest.raises(ValueError, match="single token"):
        make_objective(*models["tiny-bert"][:2], multi)
    llama, ltok, _ = models["tiny-llama"]
    with pytest.raises(ValueError, match="no mask token"):
        MaskedLMObjective(llama, ltok, get_task("sst2"))
    with pytest.raises(ValueError, match="causal LM"):
        MaskedLMObjective(llama, tok, get_task("sst2"))
    with pytest.raises(ValueError, match=r"\{mask\}"):
        Task("x", {0: "a", 1: "b"}, "{text_a} It was .")
    with pytest.raises(ValueError, match="slot"):
        Task("x", {0: "a", 1: "b"}, "{text_a} {label} {mask}")
    with pytest.raises(ValueError, match="after"):
        Task("x", {0: "a", 1: "b"}, "{text_a} ? {mask} , {text_b}", num_text_fields=2)
    with pytest.raises(ValueError, match="unknown task 'cola'"):
        get_task("cola")
    with pytest.raises(ValueError, match="kind"):
        make_objective(model, tok, get_task("sst2"), kind="seq2seq")
