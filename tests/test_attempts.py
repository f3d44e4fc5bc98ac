"""Redone steps: each metric / eval row knows its attempt (the stage's launch); reads show each step once
(the latest attempt), the history stays queryable. The end-to-end kill -9 of a trainer past a checkpoint
is in tests/test_default_checkpoints.py."""

from __future__ import annotations

from cpt_tui.store import Store


def _recs(stage, steps, seq0, resumed_at=None):
    out = []
    if resumed_at is not None:
        out.append({"stage": stage, "seq": seq0, "ts": float(seq0), "type": "status", "state": "running",
                    "step": resumed_at})
    for i, s in enumerate(steps, 1):
        out.append({"stage": stage, "seq": seq0 + i, "ts": float(seq0 + i), "type": "metric", "step": s,
                    "tokens": s * 10, "loss": 10.0 - s / 10, "lr": 1e-3, "tokens_per_s": 1.0})
        if s % 5 == 0:
            out.append({"stage": stage, "seq": seq0 + 500 + i, "ts": float(seq0 + i), "type": "eval", "step": s,
                        "tokens": s * 10, "domain": "d", "loss": 5.0 - s / 100})
    return out


def _store(tmp_path):
    st = Store(tmp_path / "x.db")
    st.create_run("r", "p", "p.yaml", str(tmp_path), {"stages": [{"index": 0, "name": "s1", "kind": "cpt", "steps": 30,
                                                                    "tokens": 300}]}, "host")
    return st


def test_each_step_once_latest_attempt_wins(tmp_path):
    st = _store(tmp_path)
    st.ingest("r", _recs("s1", range(1, 18), 0, resumed_at=0), stage_idx=0, offset=10, attempt=1)
    # attempt 2 resumed from the checkpoint at step 10: steps 11.. are redone (attempt 1 got to 17)
    st.ingest("r", _recs("s1", range(11, 31), 1000, resumed_at=10), stage_idx=0, offset=20, attempt=2)
    rows = st.metrics("r")
    assert [m.step for m in rows] == list(range(1, 31))
    assert {m.step: m.attempt for m in rows} == {**{s: 1 for s in range(1, 11)}, **{s: 2 for s in range(11, 31)}}
    hist = st.metrics("r", history=True)
    assert len(hist) == 30 + 7 and sorted({m.attempt for m in hist}) == [1, 2]
    assert [e.step for e in st.evals("r")] == [5, 10, 15, 20, 25, 30] and len(st.evals("r", history=True)) == 7
    b = st.metric_buckets("r", "s1", 1, 30, 30)
    assert [x.n for x in b] == [1] * 30 and [x.step for x in b] == list(range(1, 31))
    assert st.metric_extent("r", "s1") == {"first_step": 1, "last_step": 30, "last_tokens": 300}
    assert [a["start_step"] for a in st.attempts("r")] == [0, 10]
    # re-ingesting (a new supervisor from an older offset) changes nothing
    st.ingest("r", _recs("s1", range(11, 31), 1000, resumed_at=10), stage_idx=0, offset=20, attempt=2)
    assert len(st.metrics("r", history=True)) == 37


def test_a_running_attempt_shows_where_training_really_is(tmp_path):
    st = _store(tmp_path)
    st.ingest("r", _recs("s1", range(1, 18), 0), attempt=1)  # no status: an attempt that never resumed
    assert [m.step for m in st.metrics("r")] == list(range(1, 18))
    st.ingest("r", _recs("s1", [], 1000, resumed_at=10), attempt=2)  # resumed at 10, no step yet
    assert [m.step for m in st.metrics("r")] == list(range(1, 11))  # 11..17 are being redone
    st.ingest("r", _recs("s1", [11, 12], 2000), attempt=2)
    assert [(m.step, m.attempt) for m in st.metrics("r")][9:12] == [(10, 1), (11, 2), (12, 2)]
    assert len(st.metrics("r")) == 12  # 13..17 of attempt 1 are redone by the running attempt 2


def test_rows_of_an_old_database_are_attempt_1(tmp_path):
    st = _store(tmp_path)
    st.ingest("r", _recs("s1", range(1, 4), 0))
    assert [m.attempt for m in st.metrics("r")] == [1, 1, 1]
