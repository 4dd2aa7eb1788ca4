"""seeds.jsonl: round trip, torn final line, malformed lines named by number, resume checks."""
import json

import pytest

from mezo_kernels.optim.seedlog import SeedLogWriter, read_log

CFG = {"lr": 1e-3, "eps": 1e-2, "seed": 0}
RECS = [{"step": i, "seed": 2**63 + i, "g": -0.1 * i, "lr": 1e-3, "wd": 0.0} for i in range(5)]


def test_round_trip_keeps_exact_values(tmp_path):
    p = str(tmp_path / "s.jsonl")
    w = SeedLogWriter(p, CFG, {"model": "m"})
    w.append(RECS[:2]); w.append(RECS[2:] + [{**RECS[0], "step": 5, "skip": "plus"}]); w.close()
    head, recs = read_log(p)
    assert head["config"] == CFG and head["model"] == "m"
    assert recs[:5] == RECS and recs[5]["skip"] == "plus"


def test_torn_last_line_is_dropped_and_resume_appends_cleanly(tmp_path):
    p = tmp_path / "s.jsonl"
    w = SeedLogWriter(str(p), CFG); w.append(RECS[:3]); w.close()
    with open(p, "a") as f:
        f.write('{"step": 3, "se')
    assert len(read_log(str(p))[1]) == 3
    w = SeedLogWriter(str(p), CFG, resume=True); w.append(RECS[3:]); w.close()
    assert read_log(str(p))[1] == RECS


def test_malformed_lines_are_named(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps({"mezo_seed_log": 1, "config": CFG}) + "\n" + json.dumps(RECS[0]) + "\nnot json\n"
                 + json.dumps(RECS[1]) + "\n")
    with pytest.raises(ValueError, match=r"s.jsonl:3"):
        read_log(str(p))
    p.write_text(json.dumps({"mezo_seed_log": 1, "config": CFG}) + '\n{"step": 1}\n')
    with pytest.raises(ValueError, match=r":2: malformed"):
        read_log(str(p))
    p.write_text("")
    with pytest.raises(ValueError, match="empty"):
        read_log(str(p))
    p.write_text('{"hello": 1}\n')
    with pytest.raises(ValueError, match="not a mezo seed log"):
        read_log(str(p))


def test_resume_refuses_a_different_config(tmp_path):
    p = str(tmp_path / "s.jsonl")
    SeedLogWriter(p, CFG).close()
    with pytest.raises(ValueError, match="differs"):
        SeedLogWriter(p, {**CFG, "lr": 2e-3}, resume=True)


def test_group_records_round_trip_and_every_log_form_loads(tmp_path):
    from mezo_kernels.optim.seedlog import load
    p = str(tmp_path / "s.jsonl")
    rec = {**RECS[0], "groups": [[1e-3, 0.1], [5e-4, 0.0]]}
    w = SeedLogWriter(p, CFG); w.append([rec]); w.close()
    assert read_log(p)[1] == [rec]
    assert load(p) == (CFG, [rec])
    assert load(({"mezo_seed_log": 1, "config": CFG}, [rec])) == (CFG, [rec])
    assert load((CFG, [rec])) == (CFG, [rec])
    assert load({"config": CFG, "log": [rec], "step": 1}) == (CFG, [rec])
    assert load(iter(RECS)) == (None, RECS)
    with pytest.raises(ValueError, match="state_dict"):
        load({"log": []})
    with pytest.raises(ValueError, match="records must be dicts"):
        load([{"step": 0}])
    with pytest.raises(TypeError, match="seeds.jsonl path"):
        load(3)


def test_header_spells_out_the_modes_and_old_configs_read_as_in_place(tmp_path):
    from mezo_kernels.optim.seedlog import modes
    p = str(tmp_path / "s.jsonl")
    SeedLogWriter(p, {**CFG, "perturb": "virtual", "distribution": "rademacher"}).close()
    head, _ = read_log(p)
    assert (head["perturb"], head["distribution"], head["rounding"]) == ("virtual", "rademacher", "stochastic")
    assert modes(CFG) == {"perturb": "inplace", "distribution": "gaussian", "rounding": "nearest"}


def test_check_modes_names_the_differing_mode():
    from mezo_kernels.optim.seedlog import check_modes
    check_modes(CFG, {**CFG, "distribution": "gaussian"})           # the default spelled out: same modes
    with pytest.raises(ValueError, match="distribution='rademacher'.*distribution='gaussian'"):
        check_modes({**CFG, "distribution": "rademacher"}, CFG)
    with pytest.raises(ValueError, match="rounding='nearest'"):
        check_modes({**CFG, "perturb": "virtual", "rounding": "nearest"}, {**CFG, "perturb": "virtual"})
