"""bench.pairs: directions parsed as the README says, and several rounds of one direction taken together."""

from __future__ import annotations

import pytest

from bench.pairs import REFERENCE, over_rounds, parse_pairs


def _record(pull: float, forward: float, idle: int, peak: int) -> dict:
    nbytes = 1000
    return {"from": "torch", "to": "keras", "set_bytes": nbytes,
            "start_rss_bytes": {"sender": 10, "receiver": 20}, "idle_rss_bytes": {"sender": 10 + idle, "receiver": 20 + idle},
            "peak_rss_bytes": {"sender": 10 + peak, "receiver": 20 + peak},
            "sender_idle_over_set": idle / nbytes, "sender_peak_over_set": peak / nbytes,
            "receiver_idle_over_set": idle / nbytes, "receiver_peak_over_set": peak / nbytes,
            "pull": {"path": "pull", "gb_per_second": pull}, "forward": {"path": "forward", "gb_per_second": forward}}


def test_over_rounds_takes_each_paths_fastest_move_and_the_largest_memory():
    rounds = [_record(0.7, 0.5, idle=900, peak=2000), _record(0.9, 0.4, idle=1100, peak=1900)]
    merged = over_rounds(rounds)
    assert merged["pull"] is rounds[1]["pull"] and merged["forward"] is rounds[0]["forward"]
    assert merged["receiver_idle_over_set"] == rounds[1]["receiver_idle_over_set"]
    assert merged["receiver_peak_over_set"] == rounds[0]["receiver_peak_over_set"]
    assert merged["idle_rss_bytes"] == rounds[1]["idle_rss_bytes"] and merged["peak_rss_bytes"] == rounds[0]["peak_rss_bytes"]
    assert [r["pull_gb_per_second"] for r in merged["rounds"]] == [0.7, 0.9]
    assert [r["forward_gb_per_second"] for r in merged["rounds"]] == [0.5, 0.4]
    assert "rounds" not in rounds[0]  # the rounds' own records are left as they were


def test_one_round_is_that_round():
    record = _record(0.8, 0.6, idle=1000, peak=2500)
    merged = over_rounds([record])
    assert {k: v for k, v in merged.items() if k != "rounds"} == record


def test_pairs_put_the_reference_first_and_refuse_what_is_not_installed():
    assert parse_pairs("keras:jax", ["torch", "keras", "jax"]) == [REFERENCE, ("keras", "jax")]
    assert parse_pairs("all", ["torch", "keras"]) == [REFERENCE, ("torch", "keras"), ("keras", "torch")]
    with pytest.raises(SystemExit, match="jax not installed"):
        parse_pairs("torch:jax", ["torch", "keras"])
    with pytest.raises(SystemExit, match="is not FROM:TO"):
        parse_pairs("torch-keras", ["torch", "keras"])
