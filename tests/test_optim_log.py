"""``opt.log`` carries its config: ``replay(params, opt.log)`` rebuilds the trained weights bit for bit; every other
form of a log still replays; the log stays a list of records (and ``seeds.jsonl`` keeps its bytes); the constructor
checks the seed and parses the distribution once; the optimizer layer imports no model library."""
import ast
import copy
import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import mezo_kernels as mk
from mezo_kernels import rng
from mezo_kernels.optim import MeZO, replay
from mezo_kernels.optim.seedlog import SeedLog, SeedLogWriter, read_log

OPTIM = Path(mk.__file__).parent / "optim"


class Tiny(nn.Module):
    def __init__(self, dtype=torch.float32, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a, self.b = nn.Linear(5, 7), nn.Linear(7, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.to(dtype)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


X = torch.linspace(-1, 1, 20).view(4, 5)


def _train(model, steps, **kw):
    dtype = next(model.parameters()).dtype
    kw = {"lr": 0.05, "eps": 1e-2, "seed": 5, "weight_decay": 0.1, "n_directions": 2, **kw}
    if kw.get("perturb") == "virtual":
        kw["model"] = model
    opt = MeZO(list(model.named_parameters()), **kw)
    calls = [0]

    def loss():
        calls[0] += 1                       # one non-finite loss: a skipped direction is logged and replayed too
        return float("nan") if calls[0] == 3 else float(model(X.to(dtype)).float().square().mean())
    with torch.no_grad():
        for _ in range(steps):
            opt.step(loss)
    return opt


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("perturb", ["inplace", "virtual"])
def test_replay_of_opt_log_alone_is_bit_exact(dtype, distribution, perturb):
    trained = Tiny(dtype)
    opt = _train(trained, 5, distribution=distribution, perturb=perturb)
    assert opt.skipped_directions == 1 and opt.log.config == opt.config()
    fresh = Tiny(dtype)
    assert not _same(trained, fresh)
    rep = replay(list(fresh.named_parameters()), opt.log)        # no config=, no model=: the log says it all
    assert _same(trained, fresh) and rep.step_count == 5 and rep.log == opt.log
    assert (rep.perturb, rep.distribution) == (perturb, distribution)


@pytest.mark.parametrize("perturb", ["inplace", "virtual"])
def test_every_earlier_form_of_a_log_still_replays(tmp_path, perturb):
    trained = Tiny(torch.bfloat16)
    opt = _train(trained, 4, perturb=perturb, distribution="rademacher")
    path = str(tmp_path / "seeds.jsonl")
    w = SeedLogWriter(path, opt.config()); w.append(opt.log); w.close()
    header = {"mezo_seed_log": 1, "config": opt.config()}
    forms = [opt.state_dict(), (header, opt.log), (opt.config(), list(opt.log)), path]
    for log, config in [(f, None) for f in forms] + [(list(opt.log), opt.config()), (opt.log, opt.config())]:
        fresh = Tiny(torch.bfloat16)
        replay(list(fresh.named_parameters()), log, config=config)
        assert _same(trained, fresh), type(log)
    with pytest.raises(ValueError, match="carries no config"):
        replay(list(Tiny(torch.bfloat16).parameters()), list(opt.log))
    with pytest.raises(ValueError, match="distribution='rademacher'"):   # the log's own config guards the modes
        replay(list(Tiny(torch.bfloat16).parameters()), opt.log, config={**opt.config(), "distribution": "gaussian"})


def test_a_prefix_of_opt_log_replays_the_first_steps():
    trained = Tiny()
    opt = _train(trained, 3, n_directions=1, weight_decay=0.0)
    at1 = Tiny()
    _train(at1, 1, n_directions=1, weight_decay=0.0)
    fresh = Tiny()
    replay(list(fresh.named_parameters()), opt.log[:1])           # a slice keeps the config
    assert _same(at1, fresh) and not _same(trained, fresh)


def test_opt_log_is_a_list_of_records_and_seeds_jsonl_keeps_its_bytes(tmp_path):
    opt = _train(Tiny(), 3)
    log = opt.log
    assert isinstance(log, list) and isinstance(log, SeedLog) and all(isinstance(r, dict) for r in log)
    assert log == list(log) and log[0] == list(log)[0] and log[-2:] == list(log)[-2:]
    assert log[-2:].config == opt.config() and [r["step"] for r in log] == [0, 0, 1, 1, 2, 2]
    for other in (pickle.loads(pickle.dumps(log)), copy.deepcopy(log)):     # e.g. all_gather_object of the log
        assert other == log and other.config == log.config
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    for path, recs in ((a, log), (b, list(log))):
        w = SeedLogWriter(path, opt.config())
        for t in range(3):
            w.append(recs[2 * t:2 * t + 2])                     # as the CLI appends opt.log[-n_directions:]
        w.close()
    assert Path(a).read_bytes() == Path(b).read_bytes() and read_log(a)[1] == list(log)
    sd = opt.state_dict()
    assert type(sd["log"]) is list                              # torch.load(weights_only=True) reads it
    torch.save({"sd": sd, "log": log}, tmp_path / "opt.pt")
    back = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert back["sd"]["log"] == log and back["log"] == log and back["log"].config == opt.config()


def test_loaded_state_gives_the_log_the_loaded_config():
    model = Tiny()
    opt = _train(model, 2, schedule="linear", total_steps=10)
    other = MeZO(list(Tiny().named_parameters()), lr=0.05, eps=1e-2, seed=5, weight_decay=0.1, n_directions=2)
    other.load_state_dict(opt.state_dict())
    assert other.log == opt.log and other.log.config == opt.config() == other.config()
    assert other.step_count == 2 and other.skipped_directions == 1
    with pytest.raises(AttributeError):
        other.schedule = "constant"                             # fixed: the log's config would go stale


def test_seed_and_distribution_are_checked_once_at_the_constructor():
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(TypeError, match="seed must be an int"):
        MeZO([p], lr=0.1, seed="3")
    with pytest.raises(TypeError, match="seed must be an int"):
        MeZO([p], lr=0.1, seed=True)
    with pytest.raises(ValueError, match="seed must be in"):
        MeZO([p], lr=0.1, seed=2**64)
    with pytest.raises(ValueError, match="unknown distribution"):
        MeZO([p], lr=0.1, distribution="uniform")
    opt = MeZO([p], lr=0.1, seed=-1, distribution="rademacher")
    assert opt.seed == 2**64 - 1 and opt.distribution == "rademacher"
    assert opt.param_sets[0].distribution == "rademacher"
    with pytest.raises(AttributeError):
        opt.seed = 3
    bad = [{"step": 0, "seed": -(2**64), "g": 0.0, "lr": 0.1, "wd": 0.0}]
    with pytest.raises(ValueError, match="step 0 of the log: seed must be in"):
        opt.replay_(bad)
    # the seed and distribution enter only at the constructor (and a log's seeds where replay reads them)
    calls: dict = {}
    for f in sorted(OPTIM.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            if name in ("check_seed", "distribution_code") and f.name not in calls.get(name, []):
                calls.setdefault(name, []).append(f.name)
    assert calls == {"check_seed": ["settings.py", "state.py"], "distribution_code": ["settings.py"]}


def test_the_optimizer_layer_imports_no_model_library():
    found = []
    for f in sorted(OPTIM.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{f.name}: {n}" for n in names if n.split(".")[0] in ("transformers", "peft")]
    assert found == []


def test_config_round_trips_through_the_constructor():
    model = Tiny(torch.bfloat16)
    opt = _train(model, 1, perturb="virtual", distribution="rademacher", rounding="nearest", exact_restore=False)
    cfg = opt.config()
    assert (cfg["perturb"], cfg["distribution"], cfg["rounding"], cfg["exact_restore"]) == \
        ("virtual", "rademacher", "nearest", False)
    again = MeZO(list(model.named_parameters()), model=model, **cfg)
    assert again.config() == cfg and json.loads(json.dumps(cfg)) == cfg
    assert rng.seed_for(cfg["seed"], 0, 1, 2) == opt.log[1]["seed"]
