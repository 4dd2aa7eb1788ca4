"""The prompt objectives against values computed by hand from each tiny model's raw logits, metrics, and errors."""
import math

import pytest
import torch

from mezo_kernels.tasks.records import Example
from mezo_kernels.models import add_lora, load_model
from mezo_kernels.tasks.objectives import CausalLMObjective, MaskedLMObjective, make_objective
from mezo_kernels.tasks.metrics import ObjectiveOutput, Reduction, accuracy, f1, objective_value, scalar_objective
from mezo_kernels.tasks.records import Task
from mezo_kernels.tasks.registry import get_task

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


def lmbff_ids(tok, task_name: str, ex: Example) -> list[int]:
    """The ids LM-BFF builds, each template part tokenized alone (one-character text: a vocabulary lookup)."""
    def enc(t):
        return tok(t, add_special_tokens=False)["input_ids"]
    cls, sep, mask, one = tok.cls_token_id, tok.sep_token_id, tok.mask_token_id, tok.convert_tokens_to_ids
    if task_name == "sst2":                        # *cls**sent_0*_It_was*mask*.*sep+*
        return [cls, *enc(ex.text_a), *enc(" It was"), mask, one("."), sep]
    hyp = ex.text_b[:1].lower() + ex.text_b[1:]    # *cls**sent-_0*?*mask*,*+sentl_1**sep+*
    return [cls, *enc(ex.text_a[:-1]), one("?"), mask, one(","), *enc(" " + hyp), sep]


def hand_masked(model, tok, text: str | list[int], word_tokens: list[str]) -> torch.Tensor:
    """Label-word logits at the mask, from one unpadded forward of ``text`` (or of these ids)."""
    ids = tok(text, return_tensors="pt")["input_ids"] if isinstance(text, str) else torch.tensor([text])
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
        out = obj(model, batch)
    # BPE: word-initial tokens "Ġgreat"; WordPiece (lowercasing): "great", "yes"
    words = {"sst2": ["terrible", "great"], "rte": ["Yes", "No"]}[task_name]
    words = ["Ġ" + w for w in words] if name == "tiny-roberta" else [w.lower() for w in words]
    want = []
    for i, ex in enumerate(batch):
        s = hand_masked(model, tok, lmbff_ids(tok, task_name, ex), words)
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
    assert isinstance(obj, CausalLMObjective) and kind == "causal" and obj.engine is None   # the plain forward
    with torch.no_grad():
        out = obj(model, batch)
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
    obj = CausalLMObjective(tok, get_task("sst2"), max_length=12)
    long = Example(" ".join(["the movie was great and the plot was dull"] * 10), None, 1)
    enc = obj.encode([long, SST2[1]])
    assert enc["input_ids"].shape[1] <= 12 and enc["input_ids"][0, 0] == tok.bos_token_id
    assert enc["input_ids"][1, -1] == tok.eos_token_id
    masked = MaskedLMObjective(models["tiny-roberta"][1], get_task("sst2"), max_length=16)
    enc = masked.encode([long])
    assert enc["input_ids"].shape[1] <= 16 and int(enc["mask_pos"][0]) > 0


def test_grad_enabled_and_lora(models):
    model, tok, _ = models["tiny-opt"]
    obj = make_objective(model, tok, get_task("sst2"))
    out = obj(model, SST2[:2])
    assert out.loss.requires_grad  # the caller decides about no_grad
    out.loss.backward()
    assert model.get_input_embeddings().weight.grad is not None
    model.zero_grad(set_to_none=True)
    base, tok_r, _ = load_model("tiny-roberta", seed=0)
    with torch.no_grad():
        ref = make_objective(base, tok_r, get_task("sst2"))(base, SST2).loss
        lora = add_lora(base)
        obj = make_objective(lora, tok_r, get_task("sst2"))  # detected through the peft wrapper
        assert isinstance(obj, MaskedLMObjective)
        assert obj(lora, SST2).loss.item() == pytest.approx(ref.item(), abs=1e-6)  # LoRA B = 0 at init
    base, tok_l, _ = load_model("tiny-llama", seed=0)
    with torch.no_grad():
        ref = make_objective(base, tok_l, get_task("rte"))(base, RTE).logits
        lora = add_lora(base)
        obj = make_objective(lora, tok_l, get_task("rte"))
        assert isinstance(obj, CausalLMObjective)
        torch.testing.assert_close(obj(lora, RTE).logits, ref, atol=1e-6, rtol=0)


def test_chat_wrapper(models):
    model, tok, _ = models["tiny-llama"]
    with pytest.raises(ValueError, match="chat template"):
        CausalLMObjective(tok, get_task("sst2"), chat=True)
    tok.chat_template = "{% for m in messages %}<s>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    try:
        obj = CausalLMObjective(tok, get_task("sst2"), chat=True)
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
            out = obj(model, SST2[:1])
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
        out = obj(model, SST2)
        acc = sum(int(out.logits[i].argmax()) == e.label for i, e in enumerate(SST2)) / len(SST2)
        assert scalar_objective(obj, "neg_accuracy")(model, SST2) == pytest.approx(-acc)
        assert scalar_objective(obj)(model, SST2) == pytest.approx(out.loss.item())
        assert scalar_objective(obj, "neg_f1")(model, SST2) == pytest.approx(-f1(out))
        assert scalar_objective(lambda m, b: obj(m, b), "neg_f1")(model, SST2) == pytest.approx(-f1(out))
        assert scalar_objective(lambda m, b: 3.0)(model, SST2) == 3.0
    assert not math.isnan(out.loss.item())


def test_errors(models):
    model, tok, _ = models["tiny-roberta"]
    multi = Task("m", {0: "terrible", 1: "absolutely wonderful"}, "{text_a} It was {mask} .")
    with pytest.raises(ValueError, match="single token"):
        MaskedLMObjective(tok, multi)
    with pytest.raises(ValueError, match="single token"):
        make_objective(*models["tiny-bert"][:2], multi)
    llama, ltok, _ = models["tiny-llama"]
    with pytest.raises(ValueError, match="no mask token"):
        MaskedLMObjective(ltok, get_task("sst2"))
    with pytest.raises(ValueError, match="is a causal LM, not a masked LM"):
        make_objective(llama, tok, get_task("sst2"), kind="masked")
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


def test_an_engine_handed_in_runs_the_model(models):
    """The causal objective runs whatever ``engine`` its builder gives it; its logits become the scores."""
    model, tok, _ = models["tiny-llama"]
    plain = CausalLMObjective(tok, get_task("sst2"))

    class Recording:
        calls = 0

        def logits_at(self, m, ids, mask, rows, cols):
            Recording.calls += 1
            return m(input_ids=ids, attention_mask=mask).logits[rows, cols] * 2.0   # visibly not the plain path

    with torch.no_grad():
        want = plain(model, SST2[:2])
        got = CausalLMObjective(tok, get_task("sst2"), engine=Recording())(model, SST2[:2])
    assert Recording.calls == 1
    assert not torch.allclose(got.logits, want.logits)
    enc = plain.encode(SST2[:2])
    with torch.no_grad():
        lp = (2.0 * model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
              [enc["tgt_r"], enc["tgt_pos"]]).log_softmax(-1).gather(1, enc["tgt_ids"][:, None])[:, 0]
    torch.testing.assert_close(got.logits.flatten(), lp, atol=1e-5, rtol=1e-5)   # one token per candidate


@pytest.mark.parametrize("kind", ["ce", "neg_accuracy", "neg_f1"])
def test_reduction_over_split_rows_equals_the_full_batch_value(models, kind):
    """What data-parallel ranks do: rows of two halves, concatenated in order, reduce to objective_value of the
    whole batch, bit for bit."""
    model, tok, _ = models["tiny-bert"]
    obj = make_objective(model, tok, get_task("sst2"))
    red = Reduction(kind)
    with torch.no_grad():
        full = obj(model, SST2)
        halves = [red.rows(obj(model, part)) for part in (SST2[:2], SST2[2:])]
    rows = torch.cat(halves, dim=1)
    assert rows.shape == ((1 if kind == "ce" else 3), len(SST2)) and rows.dtype == torch.float32
    assert red.value(red.rows(full)) == objective_value(full, kind)
    assert red.additive == (kind == "ce")
    # CE per example depends on the padding of the call; the metrics do not
    if kind != "ce":
        assert red.value(rows) == objective_value(full, kind)
    with pytest.raises(TypeError, match="ObjectiveOutput"):
        red.rows(0.5)
    with pytest.raises(ValueError, match="unknown objective 'acc'"):
        Reduction("acc")
    with pytest.raises(ValueError, match="unknown objective 'acc'"):
        scalar_objective(obj, "acc")
