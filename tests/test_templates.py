"""Prompts as the paper's code builds them: LM-BFF's masked-LM templates, tokenized part by part, and MeZO's
causal (OPT) templates from ``large_models/templates.py``.

No RoBERTa tokenizer can be downloaded here, so the expected ids are built with the tiny byte-level BPE RoBERTa
tokenizer (models.build_tiny_tokenizer) the way LM-BFF's ``tokenize_multipart_input`` builds them: each ``*``
piece encoded alone without special tokens, one-character text looked up in the vocabulary, ``_`` a space."""
import pytest

pytest.importorskip("transformers")
from mezo_kernels.tasks import lmbff  # noqa: E402
from mezo_kernels.tasks.records import Example  # noqa: E402
from mezo_kernels.models import build_tiny_tokenizer, load_model  # noqa: E402
from mezo_kernels.tasks.objectives import CausalLMObjective, MaskedLMObjective  # noqa: E402
from mezo_kernels.tasks.records import Task  # noqa: E402
from mezo_kernels.tasks.registry import get_task

SST2_LMBFF = "*cls**sent_0*_It_was*mask*.*sep+*"          # LM-BFF run_experiment.sh, SST-2
RTE_LMBFF = "*cls**sent-_0*?*mask*,*+sentl_1**sep+*"      # LM-BFF run_experiment.sh, RTE
SST2 = [Example("it was great .", None, 1), Example("a boring mess", None, 0)]
RTE = [Example("A man was killed in Iraq.", "Nobody died.", 1),
       Example("The president said that the war is over.", "The war is over.", 0)]


@pytest.fixture(scope="module")
def roberta():
    return build_tiny_tokenizer("roberta")


def by_hand(tok, template: str, ex: Example) -> list[int]:
    """LM-BFF's construction, written out for the pieces these two templates use."""
    ids = []
    for piece in template.split("*"):
        if not piece:
            continue
        if piece == "cls":
            ids.append(tok.cls_token_id)
        elif piece in ("sep", "sep+"):
            ids.append(tok.sep_token_id)
        elif piece == "mask":
            ids.append(tok.mask_token_id)
        elif piece == "sent_0":
            ids += tok.encode(ex.text_a, add_special_tokens=False)
        elif piece == "sent-_0":
            ids += tok.encode(ex.text_a[:-1], add_special_tokens=False)
        elif piece == "+sentl_1":
            ids += tok.encode(" " + ex.text_b[:1].lower() + ex.text_b[1:], add_special_tokens=False)
        elif len(piece.replace("_", " ")) == 1:
            ids.append(tok.convert_tokens_to_ids(piece))
        else:
            ids += tok.encode(piece.replace("_", " "), add_special_tokens=False)
    return ids


def test_the_builtin_masked_templates_are_lmbffs():
    assert get_task("sst2").template == SST2_LMBFF and get_task("rte").template == RTE_LMBFF
    parts = lmbff.parse(RTE_LMBFF)
    assert [p.kind for p in parts] == ["special", "sent", "text", "special", "text", "sent", "special"]
    assert parts[1] == lmbff.Part("sent", 0, drop_last=True) and parts[5] == lmbff.Part("sent", 1, space=True, case="l")
    assert lmbff.parse(SST2_LMBFF)[2] == lmbff.Part("text", " It was")


@pytest.mark.parametrize("template, batch", [(SST2_LMBFF, SST2), (RTE_LMBFF, RTE)])
def test_objective_ids_are_lmbffs(roberta, template, batch):
    task = get_task("sst2" if template == SST2_LMBFF else "rte")
    enc = MaskedLMObjective(roberta, task).encode(batch)
    for row, mask, ex in zip(enc["input_ids"], enc["attention_mask"], batch):
        assert row[mask.bool()].tolist() == by_hand(roberta, template, ex)


def test_pinned_tokens(roberta):
    """The pieces as tokens: the period sits right after the mask as the bare "." (not "Ġ."), the premise loses
    its final period, "?" and "," are bare, the hypothesis starts with a lower-cased, space-prefixed word."""
    def toks(task, ex):
        enc = MaskedLMObjective(roberta, get_task(task)).encode([ex])
        return roberta.convert_ids_to_tokens(enc["input_ids"][0].tolist())
    assert toks("sst2", SST2[0]) == ["<s>", "it", "Ġwas", "Ġgreat", "Ġ.", "ĠIt", "Ġwas", "<mask>", ".", "</s>"]
    assert toks("rte", RTE[0]) == ["<s>", "A", "Ġman", "Ġwas", "Ġkilled", "Ġin", "ĠIraq", "?", "<mask>", ",",
                                   "Ġnobody", "Ġdied", ".", "</s>"]
    # the earlier whole-string prompt "<S> It was <mask> ." put "Ġ." after the mask: a different input
    old = roberta(f"{SST2[0].text_a} It was {roberta.mask_token} .")["input_ids"]
    assert roberta.convert_ids_to_tokens(old)[-2:] == ["Ġ.", "</s>"]


def test_label_words_carry_the_leading_space(roberta):
    for name, words in (("sst2", ["Ġterrible", "Ġgreat"]), ("rte", ["ĠYes", "ĠNo"])):
        obj = MaskedLMObjective(roberta, get_task(name))
        assert roberta.convert_ids_to_tokens(obj.word_ids.tolist()) == words


def test_bert_wordpiece_ids_too():
    tok = build_tiny_tokenizer("bert")
    for name, template, batch in (("sst2", SST2_LMBFF, SST2), ("rte", RTE_LMBFF, RTE)):
        enc = MaskedLMObjective(tok, get_task(name)).encode(batch)
        for row, mask, ex in zip(enc["input_ids"], enc["attention_mask"], batch):
            assert row[mask.bool()].tolist() == by_hand(tok, template, ex)


def test_long_rows_lose_tokens_of_their_longest_sentence(roberta):
    long = Example(" ".join(["the film was great"] * 30) + ".", "It was fun.", 0)
    obj = MaskedLMObjective(roberta, get_task("rte"), max_length=24)
    enc = obj.encode([long, RTE[0]])
    row = enc["input_ids"][0].tolist()
    full = by_hand(roberta, RTE_LMBFF, long)
    assert len(row) == 24 and len(full) > 24
    tail = full[-6:]                           # "?", mask, ",", " it was fun." tail, sep: kept whole
    assert row[-6:] == tail and row[:10] == full[:10]
    assert enc["attention_mask"][1].sum() < 24                          # a row that fits is left alone
    assert row.count(roberta.mask_token_id) == 1


@pytest.mark.parametrize("bad, why", [("*cls**sent_0*_It_was.*sep+*", "exactly one"),
                                      ("*cls**sent_0**mask**mask*", "exactly one"),
                                      ("*cls**sent_2**mask*", "sent_0"),
                                      ("*cls**sent_0**sent_2**mask*", "sentence 2"),
                                      ("*cls**sent_0**mask**label_0*", "not supported")])
def test_malformed_lmbff_templates_are_refused(bad, why):
    with pytest.raises(ValueError, match=why):
        lmbff.parse(bad)


def test_an_lmbff_template_needs_a_causal_template():
    spec = {"name": "t", "label_words": {0: "bad", 1: "good"}, "template": SST2_LMBFF}
    with pytest.raises(ValueError, match="causal_template"):
        Task(**spec)
    with pytest.raises(ValueError, match="causal_template"):
        Task(**spec, causal_template=SST2_LMBFF)
    assert Task(**spec, causal_template="{text_a} It was {mask}").mask_has_leading_space()


# MeZO large_models/templates.py: SST2Template and RTETemplate, the prompt and each candidate's full text
def mezo_sst2(ex, word):
    return f"{ex.text_a.strip()} It was", f"{ex.text_a.strip()} It was {word}"


def mezo_rte(ex, word):
    p = f"{ex.text_a}\nDoes this mean that \"{ex.text_b}\" is true? Yes or No?\n"
    return p, p + word


@pytest.mark.parametrize("model", ["tiny-opt", "tiny-llama"])
@pytest.mark.parametrize("name", ["sst2", "rte"])
def test_causal_prompts_are_mezos(model, name):
    """Text: prompt + candidate is MeZO's verbalized string; ids: our prompt ids + candidate ids are the ids of
    that whole string (MeZO encodes it whole and takes the last option_len tokens as the candidate)."""
    _, tok, _ = load_model(model)
    task, batch, mezo = (get_task("sst2"), SST2, mezo_sst2) if name == "sst2" else (get_task("rte"), RTE, mezo_rte)
    obj = CausalLMObjective(tok, task, max_length=256)
    for ex in batch:
        cp = task.format_causal(ex)
        for c, word in enumerate(task.words):
            prompt, full = mezo(ex, word)
            assert cp.prompt == prompt.strip(" ") and cp.prompt + cp.candidates[c] == full
        enc = obj.encode([ex])
        rows = [r[m.bool()].tolist() for r, m in zip(enc["input_ids"], enc["attention_mask"])]
        for c, word in enumerate(task.words):
            pick = enc["tgt_row"] == c
            cont = enc["tgt_ids"][pick].tolist()
            row = rows[int(enc["tgt_r"][pick][0])]
            first = int(enc["tgt_pos"][pick][0]) + 1                       # where the candidate starts
            ours = row[:first] + cont
            whole = tok.encode(mezo(ex, word)[1])
            assert ours == whole, (tok.convert_ids_to_tokens(ours), tok.convert_ids_to_tokens(whole))
            n_opt = len(whole) - len(tok.encode(mezo(ex, word)[0].strip(" ")))
            assert len(cont) == n_opt                                      # MeZO's option_len
