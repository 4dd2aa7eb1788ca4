"""bench/bench_scale.py: its pure functions (predicted bytes, TP fit, classification of collectives, the table), and
its smallest configuration (the tiny Llama shape, FSDP2 on 2 gloo processes, one step): FSDP2 all-gathers every
layer and the root once per forward, MeZO exchanges one (L+, L-) pair, and each rank holds half the weights. A
check of the harness, not a timing."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_scale as bs  # noqa: E402


def test_shape_bytes_of_the_1b_shape():
    s = bs.shape_bytes("llama-1b-rand")
    assert s["params"] == 1_235_814_400 and s["layers"] == 16
    assert s["layer_params"] == 60_821_504 and s["root_params"] == 128256 * 2048 + 2048
    assert s["bytes"] == 2 * s["params"]


def test_predicted_bytes_and_tp_fit():
    s = bs.shape_bytes("llama-1b-rand")
    assert bs.predicted_bytes("llama-1b-rand", "fsdp", 4) == s["bytes"] // 4
    assert bs.predicted_bytes("llama-1b-rand", "tp", 1) == s["bytes"]
    tp2 = bs.predicted_bytes("llama-1b-rand", "tp", 2)
    assert s["bytes"] // 2 < tp2 < s["bytes"]                 # the embedding and norms stay whole
    assert bs.tp_fits("llama-1b-rand", 4) and bs.tp_fits("llama-1b-rand", 8) and not bs.tp_fits("llama-1b-rand", 3)


def test_classify():
    recs = [("all_gather_single", 100), ("all_gather_single", 300), ("functional.all_reduce", 64),
            ("all_reduce", 16), ("broadcast", 8)]
    c = bs.classify(recs, "fsdp")
    assert (c["ag_bytes"], c["ag_calls"], c["ag_max"]) == (400, 2, 300)
    assert (c["tp_bytes"], c["tp_calls"], c["scalar_bytes"], c["scalar_calls"]) == (64, 1, 16, 1)
    assert (c["other_bytes"], c["other_calls"]) == (8, 1)


def test_smallest_config_fsdp_two_processes():
    r = bs.run("llama-tiny-rand", "fsdp", 2, steps=1, warmup=0, batch=1, seq=16)
    s = bs.shape_bytes("llama-tiny-rand")
    assert r["ag_calls"] == 2 * (s["layers"] + 1)             # every unit gathered once per forward, 2 forwards
    assert r["ag_max"] == max(s["root_bytes"], s["layer_bytes"])  # the largest unit in flight
    assert r["ag_bytes"] == 2 * s["bytes"]
    assert (r["scalar_calls"], r["scalar_bytes"]) == (1, 16)    # one (L+, L-) pair in float64
    assert r["tp_calls"] == 0 and r["other_calls"] == 0
    assert abs(r["param_bytes_after"] - s["bytes"] / 2) <= 64 * 2 * 4   # rounding of uneven shards
    assert r["loss_group"] and r["time_med"] > 0
    assert "| llama-tiny-rand | fsdp | 2 |" in bs.table([r])
