"""MeZO-prefix (prefix tuning, mezo_kernels/prefix/): causal LMs through peft, masked LMs through our own module.

Checked against references: a causal prefix initialised from real tokens X equals running X first (causal
attention: X's keys/values do not depend on what follows, and the tokens after the prefix sit at positions P..);
the masked-LM prefix against a float64 encoder written out here; the forward engine against the plain forward,
inplace and virtual perturbation, eval cache included (a stale prefix would show). End to end on tiny models:
train, save, eval the saved adapter, resume and replay bit for bit; bad settings are clear errors.
"""
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
from mezo_kernels import models  # noqa: E402
from mezo_kernels.forward import ForwardEngine  # noqa: E402
from mezo_kernels.optim import MeZO  # noqa: E402
from mezo_kernels.prefix import PrefixMaskedLM, add_prefix, learned_kv  # noqa: E402
from mezo_kernels.prefix.kv import from_layers, real_tokens, to_layers  # noqa: E402
from mezo_kernels.tasks import objectives  # noqa: E402
from mezo_kernels.tasks.records import Example  # noqa: E402
from mezo_kernels.tasks.registry import get_task  # noqa: E402
from mezo_kernels.train.cli import main  # noqa: E402
from mezo_kernels.train.config import TrainConfig  # noqa: E402


def _rows(lengths, vocab, seed, pad=0):
    """Right-padded random ids [R, T] and mask for rows of ``lengths`` (ids from 3, clear of the specials)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids, mask = torch.full((len(lengths), T), pad), torch.zeros(len(lengths), T, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(3, vocab, (n,), generator=g)
        mask[r, :n] = 1
    return ids, mask


def test_layout_round_trips_and_refuses_a_wrong_width():
    kv = [(torch.randn(1, 3, 5, 7), torch.randn(1, 3, 5, 7)) for _ in range(2)]
    flat = from_layers(kv)
    assert flat.shape == (5, 2 * 2 * 3 * 7)
    back = to_layers(flat[None], 2, 3, 7)
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(kv, back))
    with pytest.raises(ValueError, match="not 2 layers x 2 x 4 heads"):
        to_layers(flat[None], 2, 4, 7)
    m, _, _ = models.load_model("tiny-llama")
    a, b = real_tokens(m, 6, 1), real_tokens(m, 6, 1)
    assert torch.equal(a, b) and not torch.equal(a, real_tokens(m, 6, 2)) and int(a.max()) < m.config.vocab_size


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_causal_prefix_from_real_tokens_equals_running_them_first(name):
    """The initial prefix holds the cached keys/values of P real tokens X: a row Y after it computes what Y after X
    computes (right-padded rows of odd lengths; the logits of padding positions are not compared)."""
    m, _, kind = models.load_model(name, seed=3)
    P = 3
    X = real_tokens(m, P, 11)
    ids, mask = _rows([7, 4, 5], m.config.vocab_size, 0, pad=1)
    with torch.no_grad():
        ref = [m(input_ids=torch.cat([X, ids[r:r + 1, :n]], 1)).logits[0, P:] for r, n in enumerate([7, 4, 5])]
        pm = add_prefix(m, P, seed=11)
        assert [n for n, p in pm.named_parameters() if p.requires_grad] == ["prompt_encoder.default.embedding.weight"]
        out = pm(input_ids=ids, attention_mask=mask).logits
    for r, n in enumerate([7, 4, 5]):
        torch.testing.assert_close(out[r, :n], ref[r], atol=2e-5, rtol=1e-5)
    with torch.no_grad():
        with pm.disable_adapter():
            assert learned_kv(pm) is None
        plain = m(input_ids=ids, attention_mask=mask).logits
    assert (plain[0, :7] - out[0, :7]).abs().max() > 1e-3       # the prefix does change what the model computes


def _masked_reference(model: PrefixMaskedLM, ids, mask):
    """A RoBERTa masked LM with the learned prefix, written out in float64: every query attends to the P prefix
    keys and to the row's own unpadded keys."""
    base = model.base
    kv = learned_kv(model).kv
    h = base.roberta.embeddings(input_ids=ids)
    B, T, _ = h.shape
    H, D = model.heads, model.head_dim
    bias = torch.zeros(B, 1, 1, T, dtype=h.dtype).masked_fill(mask[:, None, None, :] == 0, float("-inf"))
    bias = torch.cat([torch.zeros(B, 1, 1, kv[0][0].shape[2], dtype=h.dtype), bias], -1)
    for i, layer in enumerate(base.roberta.encoder.layer):
        sa = layer.attention.self
        split = lambda x: x.view(B, T, H, D).transpose(1, 2)                       # noqa: E731
        k = torch.cat([kv[i][0].expand(B, -1, -1, -1), split(sa.key(h))], 2)
        v = torch.cat([kv[i][1].expand(B, -1, -1, -1), split(sa.value(h))], 2)
        a = ((split(sa.query(h)) @ k.transpose(-1, -2)) / D ** 0.5 + bias).softmax(-1) @ v
        h = layer.attention.output(a.transpose(1, 2).reshape(B, T, H * D), h)
        h = layer.output(layer.intermediate(h), h)
    return base.lm_head(h)


@pytest.mark.parametrize("name", ["tiny-roberta", "tiny-bert"])
def test_masked_prefix_matches_a_float64_encoder_written_out(name):
    m, tok, kind = models.load_model(name, seed=5, dtype=torch.float64)
    assert kind == "masked"
    pm = add_prefix(m, 3, seed=2)
    assert [n for n, p in pm.named_parameters() if p.requires_grad] == ["prefix.weight"]
    assert models.unwrap(pm) is m and models.model_kind(pm) == "masked"
    with torch.no_grad():
        pm.prefix.weight.add_(torch.randn_like(pm.prefix.weight) * 0.3)     # away from the init, any values
    ids, mask = _rows([9, 5, 2], m.config.vocab_size, 1, pad=tok.pad_token_id)
    with torch.no_grad():
        out = pm(input_ids=ids, attention_mask=mask).logits
        alone = pm(input_ids=ids[1:2, :5]).logits                  # no padding, no mask at all
        if name == "tiny-roberta":
            ref = _masked_reference(pm, ids, mask)
            for r, n in enumerate([9, 5, 2]):
                torch.testing.assert_close(out[r, :n], ref[r, :n], atol=1e-10, rtol=1e-10)
        without = m(input_ids=ids, attention_mask=mask).logits     # the bare model: no prefix
    torch.testing.assert_close(out[1, :5], alone[0], atol=1e-10, rtol=1e-10)
    assert (without[0, :9] - out[0, :9]).abs().max() > 1e-3


def test_masked_prefix_init_is_the_real_tokens_keys_and_values():
    """Layer 0's keys of the random tokens X are its query-free projections of X's embeddings: the prefix's first
    layer holds exactly those (deeper layers depend on the attention among X, checked through the encoder)."""
    m, _, _ = models.load_model("tiny-roberta", seed=1)
    pm = add_prefix(m, 4, seed=9)
    X = real_tokens(m, 4, 9)
    with torch.no_grad():
        e = m.roberta.embeddings(input_ids=X)
        sa = m.roberta.encoder.layer[0].attention.self
        k0 = sa.key(e).view(1, 4, pm.heads, pm.head_dim).transpose(1, 2)
        v0 = sa.value(e).view(1, 4, pm.heads, pm.head_dim).transpose(1, 2)
    k, v = learned_kv(pm).kv[0]
    assert torch.equal(k, k0) and torch.equal(v, v0)


def test_half_precision_masked_model_keeps_a_float32_prefix():
    """As peft does for causal LMs: the learned tensor is float32 (MeZO updates it exactly), cast in the attention;
    the bf16 model's logits follow the float32 model's with the same prefix to bf16 rounding."""
    m32, tok, _ = models.load_model("tiny-roberta", seed=2)
    m16, _, _ = models.load_model("tiny-roberta", seed=2, dtype=torch.bfloat16)
    p32 = add_prefix(m32, 3, seed=4)
    p16 = PrefixMaskedLM(m16, 3, init=p32.prefix.weight.detach())
    assert p16.prefix.weight.dtype == torch.float32 and torch.equal(p16.prefix.weight, p32.prefix.weight)
    enc = tok(["it was a great movie", "bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = p32(**enc).logits, p16(**enc).logits
    assert b.dtype == torch.bfloat16
    torch.testing.assert_close(b.float()[0], a[0], atol=0.1, rtol=0.05)


# ----------------------------------------------------------------------------------------------- the engine
_BATCH = [Example("the movie was great and the plot was fun", None, 1),
          Example("the movie was great but the acting was boring", None, 0),
          Example("the movie was great", None, 1), Example("bad", None, 0)]


def _objectives(pm, tok):
    task = get_task("sst2")
    eng = ForwardEngine(min_prefix=2)
    on = objectives.make_objective(pm, tok, task, kind="causal", engine=eng)
    off = objectives.make_objective(pm, tok, task, kind="causal", engine=ForwardEngine.plain())
    return eng, on, off


def test_engine_logits_equal_the_plain_forward_and_follow_the_prefix():
    """Float64, rows sharing a prompt prefix (segments run once): the engine's logits equal peft's own forward; the
    eval cache hits for an unchanged prefix and never serves one computed under an older prefix."""
    m, tok, _ = models.load_model("tiny-llama", seed=4, dtype=torch.float64)
    pm = add_prefix(m, 5, seed=1)
    eng, on, _ = _objectives(pm, tok)
    enc = on.encode(_BATCH)
    args = enc["input_ids"], enc["attention_mask"], enc["tgt_r"], enc["tgt_pos"]
    w = pm.prompt_encoder.default.embedding.weight
    with torch.no_grad():
        for step in range(3):
            ref = pm(input_ids=args[0], attention_mask=args[1]).logits[args[2], args[3]]
            got = eng.logits_at(pm, *args)
            torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)
            hits = eng.stats.prefix_cache_hits
            torch.testing.assert_close(eng.logits_at(pm, *args), ref, atol=1e-10, rtol=1e-10)
            assert eng.stats.prefix_cache_hits > hits               # same prefix: served from the eval cache
            w.add_(0.25 * torch.randn_like(w))                      # a new prefix (in place: version bumped)
    s = eng.stats
    assert s.fallback is None and s.frozen_hits == 0 and s.run_token_layers < s.plain_token_layers


@pytest.mark.parametrize("perturb", ["inplace", "virtual"])
def test_mezo_prefix_steps_engine_on_and_off_give_the_same_losses(perturb):
    """MeZO steps on the prefix: the engine (prefix reuse, eval cache) and the plain forward see the same +/-
    passes (a prefix computed without the virtual perturbation, or served stale, would make them differ)."""
    runs = []
    for use_engine in (True, False):
        m, tok, _ = models.load_model("tiny-llama", seed=4)
        pm = add_prefix(m, 4, seed=3)
        eng, on, off = _objectives(pm, tok)
        obj = on if use_engine else off
        params = models.trainable_parameters(pm)
        opt = MeZO(params, lr=5e-2, eps=1e-2, seed=7, backend="torch", perturb=perturb, model=pm)
        losses = []
        with torch.no_grad():
            for _ in range(4):
                r = opt.step(lambda: float(obj(pm, _BATCH).per_example.mean()))
                losses += [r.loss_plus, r.loss_minus]
                obj(pm, _BATCH)                                     # an evaluation between steps (eval cache)
        runs.append((losses, params[0][1].detach().clone(), eng.stats))
    (a, wa, stats), (b, wb, _) = runs
    assert all(x != y for x, y in zip(a[::2], a[1::2]))             # + and - passes saw different prefixes
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wa, wb, atol=1e-5, rtol=1e-5)
    assert stats.fallback is None and stats.run_token_layers < stats.plain_token_layers


# ----------------------------------------------------------------------------------------------- end to end
def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    assert out, f"no tensors in {folder}"
    return out


def _same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-roberta"])
def test_train_save_eval_resume_replay(model, tmp_path, data_dir, capsys):
    common = ["--model", model, "--data-dir", data_dir, "--k", "8", "--batch-size", "4", "--eval-every", "0",
              "--eval-max", "8", "--no-progress", "--prefix-tokens", "3", "--lr", "5e-2", "--eps", "1e-2"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", *common, "--steps", "4", "--output-dir", str(full)]) == 0
    saved = json.loads((full / "config.json").read_text())
    summary = json.loads((full / "summary.json").read_text())
    assert saved["prefix_tokens"] == 3 and summary["trainable"] == 3 * 2 * 2 * (32 if model == "tiny-llama" else 64)
    trained = _tensors(full / "adapter")
    # the same run interrupted after 2 steps, then resumed: the seed log replays onto the initial prefix
    assert main(["train", *common, "--steps", "2", "--output-dir", str(part)]) == 0
    assert not _same_bits(_tensors(part / "adapter"), trained)
    assert main(["train", *common, "--steps", "4", "--output-dir", str(part), "--resume"]) == 0
    assert _same_bits(_tensors(part / "adapter"), trained)
    # replay rebuilds the trained prefix bit for bit from the initial one and seeds.jsonl
    assert main(["replay", "--run", str(full)]) == 0
    assert _same_bits(_tensors(full / "replayed"), trained)
    assert main(["replay", "--run", str(full), "--step", "0", "--output", str(tmp_path / "init")]) == 0
    assert not _same_bits(_tensors(tmp_path / "init"), trained)          # the steps did move the prefix
    # eval loads the saved adapter: the run's final evaluation again
    capsys.readouterr()
    assert main(["eval", "--model", model, "--data-dir", data_dir, "--k", "8", "--eval-max", "8",
                 "--adapter", str(full / "adapter")]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["n"] == summary["after"]["n"] == 8
    assert got["accuracy"] == summary["after"]["accuracy"]
    assert got["loss"] == pytest.approx(summary["after"]["loss"], abs=1e-6)


def test_engine_on_and_off_train_the_same(tmp_path, data_dir):
    runs = []
    for flag in ([], ["--no-prefix-reuse"]):
        out = tmp_path / ("plain" if flag else "reuse")
        assert main(["train", "--model", "tiny-llama", "--data-dir", data_dir, "--output-dir", str(out), "--k", "8",
                     "--steps", "4", "--eval-every", "2", "--eval-max", "8", "--no-progress", "--prefix-tokens", "2",
                     "--lr", "5e-2", *flag]) == 0
        runs.append(([json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()],
                     json.loads((out / "summary.json").read_text())))
    (reuse, s_reuse), (plain, s_plain) = runs
    assert s_reuse["forward"]["fallback"] is None and s_plain["forward"]["fallback"] == "reuse is off"
    assert len(reuse) == len(plain) == 4
    for r, p in zip(reuse, plain):
        assert r["loss_plus"] == pytest.approx(p["loss_plus"], abs=1e-5)
        assert r["loss_minus"] == pytest.approx(p["loss_minus"], abs=1e-5)
    assert s_reuse["after"]["accuracy"] == s_plain["after"]["accuracy"]


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw, why", [
    (dict(prefix_tokens=0), "prefix_tokens must be an int >= 1"),
    (dict(prefix_tokens=-2), "prefix_tokens must be an int >= 1"),
    (dict(prefix_tokens=True), "prefix_tokens must be an int >= 1"),
    (dict(prefix_tokens=2, lora=False), "full-parameter"),
    (dict(prefix_tokens=2, lora_r=4), "lora_r=4"),
    (dict(prefix_tokens=2, lora_targets=["q_proj"]), "lora_targets"),
    (dict(prefix_tokens=2, lora_first_layer=1), "lora_first_layer=1"),
    (dict(prefix_tokens=2, batched_pm=True), "batched_pm"),
])
def test_bad_prefix_settings_are_value_errors(kw, why):
    with pytest.raises(ValueError, match=why):
        TrainConfig(**kw)


@pytest.mark.parametrize("flags, why", [
    (["--prefix-tokens", "3", "--full-param"], "cannot be combined with --full-param"),
    (["--prefix-tokens", "3", "--lora-r", "8"], "cannot be combined with --lora-r"),   # the default, typed
    (["--lora-alpha", "16", "--prefix-tokens", "3"], "--lora-alpha"),
    (["--prefix-tokens", "0"], "prefix_tokens must be an int >= 1"),
])
def test_cli_refuses_prefix_with_full_param_or_lora_options(flags, why, tmp_path, capsys):
    assert main(["train", "--model", "tiny-llama", "--output-dir", str(tmp_path / "r"), "--no-progress",
                 *flags]) == 2
    assert why in capsys.readouterr().err
    assert not (tmp_path / "r").exists()                  # refused before anything ran


def test_config_file_with_prefix_and_a_lora_field_is_refused(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: tiny-llama\nprefix_tokens: 4\nlora_r: 8\n")
    from mezo_kernels.train.config_files import config_from_cli
    with pytest.raises(ValueError, match=r"prefix_tokens in .*c\.yaml .* lora_r in"):
        config_from_cli({"config": str(cfg)}, set())
    cfg.write_text("model: tiny-llama\nlora_r: 4\n")
    assert main(["train", "--config", str(cfg), "--prefix-tokens", "2", "--output-dir", str(tmp_path / "r")]) == 2
    assert "--prefix-tokens (MeZO-prefix) replaces LoRA" in capsys.readouterr().err


def test_add_prefix_and_loading_refuse_what_does_not_fit(tmp_path):
    m, _, _ = models.load_model("tiny-roberta")
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="prefix tokens must be an int >= 1"):
            add_prefix(m, bad)
    pm = add_prefix(m, 2, seed=0)
    pm.save_pretrained(tmp_path / "a")
    other, _, _ = models.load_model("tiny-llama")
    with pytest.raises(ValueError, match="BERT-style self-attention"):
        PrefixMaskedLM.from_pretrained(other, tmp_path / "a")
    fresh, _, _ = models.load_model("tiny-roberta", seed=1)
    loaded = PrefixMaskedLM.from_pretrained(fresh, tmp_path / "a")
    assert torch.equal(loaded.prefix.weight, pm.prefix.weight)
    meta = json.loads((tmp_path / "a" / "mezo_prefix.json").read_text())
    (tmp_path / "a" / "mezo_prefix.json").write_text(json.dumps({**meta, "tokens": 3}))
    with pytest.raises(ValueError, match=r"does not fit .* \(3, 256\)"):
        PrefixMaskedLM.from_pretrained(models.load_model("tiny-roberta")[0], tmp_path / "a")
