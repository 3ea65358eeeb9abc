"""t6 unit: save and retention policies of mount/ (no I/O)."""

from hypothesis import given, strategies as st

from mount.policies import (AnyOf, BestN, CheckpointInfo, Continuous, EveryNSeconds, EveryNSteps,
                            FixedInterval, KeepAll, LatestN, protected_steps, steps_to_delete)


def infos(*steps, times=None, metrics=None):
    return [CheckpointInfo(s, float(times[i] if times else s),
                           metrics[i] if metrics else {}) for i, s in enumerate(steps)]


def test_continuous_waits_for_the_save_in_flight_and_the_min_interval():
    p = Continuous()
    assert p.should_save(5, 100.0, None, None, busy=False)
    assert not p.should_save(5, 100.0, 4, 99.0, busy=True)
    assert p.should_save(5, 100.0, 4, 100.0, busy=False)
    p = Continuous(min_interval_s=10)
    assert not p.should_save(5, 105.0, 4, 100.0, busy=False)
    assert p.should_save(5, 110.0, 4, 100.0, busy=False)


def test_fixed_interval_steps_defers_a_due_save_until_the_writer_is_free():
    p = FixedInterval(steps=10)
    assert p.should_save(0, 0, None, None, busy=False)
    assert not p.should_save(9, 0, 0, 0, busy=False)
    assert not p.should_save(10, 0, 0, 0, busy=True)      # due but busy: skipped for now
    assert p.should_save(12, 0, 0, 0, busy=False)         # still due after the writer is free
    assert not p.should_save(15, 0, 12, 0, busy=False)    # 10..19 already covered by 12


def test_fixed_interval_seconds():
    p = FixedInterval(seconds=60)
    assert not p.should_save(3, 159.0, 2, 100.0, busy=False)
    assert p.should_save(3, 160.0, 2, 100.0, busy=False)


def test_latest_n_keeps_the_newest():
    assert LatestN(2).keep(infos(1, 2, 3, 4)) == {3, 4}
    assert LatestN(5).keep(infos(1, 2)) == {1, 2}
    assert LatestN(0).keep(infos(1, 2)) == set()


def test_every_n_steps_keeps_the_first_per_window_and_is_stable():
    ck = infos(0, 3, 7, 10, 12, 19, 21)
    kept = EveryNSteps(10).keep(ck)
    assert kept == {0, 10, 21}
    remaining = [i for i in ck if i.step in kept]
    assert EveryNSteps(10).keep(remaining) == kept


def test_every_n_seconds_keeps_one_per_window():
    ck = infos(1, 2, 3, 4, 5, times=[0, 1000, 3600, 3700, 7300])
    assert EveryNSeconds(3600).keep(ck) == {1, 3, 5}


def test_best_n_min_max_and_missing_metric():
    ck = infos(1, 2, 3, 4, metrics=[{"loss": 0.5}, {"loss": 0.1}, {}, {"loss": 0.3}])
    assert BestN("loss", 2).keep(ck) == {2, 4}
    assert BestN("loss", 1, mode="max").keep(ck) == {1}


def test_or_combines_policies_and_plain_callables():
    ck = infos(1, 2, 3, 4, 5)
    policy = LatestN(1) | (lambda xs: [xs[0].step]) | EveryNSteps(100)
    assert isinstance(policy, AnyOf) and len(policy.policies) == 3
    assert policy(ck) == {1, 5}
    assert ((lambda xs: [2]) | LatestN(1))(ck) == {2, 5}


def test_safety_rule_protects_the_newest_durable_and_everything_newer():
    ck = infos(1, 2, 3, 4, 5)
    durable = {1, 2, 3}.__contains__
    assert protected_steps(ck, durable) == {3, 4, 5}
    assert steps_to_delete(ck, LatestN(1), durable) == [1, 2]


def test_nothing_is_deleted_before_something_is_durable():
    ck = infos(1, 2, 3)
    assert steps_to_delete(ck, LatestN(0), lambda s: False) == []
    assert steps_to_delete(ck, KeepAll(), lambda s: True) == []


@given(st.lists(st.integers(0, 1000), unique=True, min_size=1, max_size=30).map(sorted),
       st.sets(st.integers(0, 1000)), st.integers(0, 5))
def test_deletions_never_touch_the_newest_durable_or_newer(steps, durable_set, n):
    ck = infos(*steps)
    doomed = steps_to_delete(ck, LatestN(n), durable_set.__contains__)
    durable_steps = [s for s in steps if s in durable_set]
    floor = durable_steps[-1] if durable_steps else -1
    assert all(s < floor for s in doomed)
    assert set(doomed).isdisjoint(LatestN(n).keep(ck))
