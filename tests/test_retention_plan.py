"""Unit tier: the retention decision (mount.policies.plan_retention), a pure function, no mount."""

from hypothesis import given, strategies as st

from mount.policies import (BestN, CheckpointInfo, EveryNSeconds, KeepAll, LatestN, plan_retention,
                            protected_steps)


def infos(*steps, times=None, metrics=None):
    return [CheckpointInfo(s, float(times[i] if times else s), metrics[i] if metrics else {})
            for i, s in enumerate(steps)]


def test_a_superseded_checkpoint_below_the_newest_durable_is_deleted_before_its_upload():
    # 1 was uploaded, then the drain went for the newest (6): 2..5 are still local only
    plan = plan_retention(infos(1, 2, 3, 4, 5, 6), LatestN(2), {1, 6}.__contains__)
    assert plan.newest_durable == 6
    assert plan.delete == (1, 2, 3, 4)
    assert plan.superseded == (2, 3, 4)  # deleted locally: the gateway never uploads them
    assert plan.owed == (5,)  # kept by LatestN(2): still uploaded, although 6 is newer


def test_the_newest_durable_and_everything_newer_are_never_deleted():
    plan = plan_retention(infos(1, 2, 3, 4, 5), LatestN(1), {2}.__contains__)
    assert plan.newest_durable == 2
    assert plan.delete == (1,) and plan.superseded == (1,)
    assert plan.owed == (3, 4, 5)  # 3 and 4 wait for the drain: nothing newer than 2 is durable


def test_nothing_goes_before_anything_is_durable():
    plan = plan_retention(infos(1, 2, 3), LatestN(1), lambda s: False, incomplete=[0, 4])
    assert plan.newest_durable is None
    assert plan.delete == plan.superseded == plan.incomplete == ()
    assert plan.owed == (1, 2, 3)


def test_every_n_seconds_keeps_its_checkpoint_even_when_newer_ones_are_durable():
    ck = infos(1, 2, 3, 4, 5, times=[0, 1000, 3600, 3700, 3800])
    plan = plan_retention(ck, EveryNSeconds(3600) | LatestN(1), {5}.__contains__)
    assert plan.delete == (2, 4) and plan.superseded == (2, 4)
    assert plan.owed == (1, 3)  # the first of each hour reaches the bucket


def test_best_n_keeps_its_checkpoints_even_when_newer_ones_are_durable():
    ck = infos(1, 2, 3, 4, metrics=[{"loss": 0.1}, {"loss": 0.9}, {"loss": 0.2}, {"loss": 0.5}])
    plan = plan_retention(ck, BestN("loss", 2) | LatestN(1), {4}.__contains__)
    assert plan.delete == (2,)
    assert plan.owed == (1, 3)


def test_incomplete_directories_go_only_below_the_newest_durable():
    plan = plan_retention(infos(2, 5), KeepAll(), {2}.__contains__, incomplete=[1, 3, 6])
    assert plan.incomplete == (1,)
    assert plan.delete == ()


def test_the_probe_is_asked_newest_first_and_stops_at_the_first_durable_for_protection():
    asked = []

    def durable(step):
        asked.append(step)
        return step <= 7

    assert protected_steps(infos(*range(1, 11)), durable) == {7, 8, 9, 10}
    assert asked == [10, 9, 8, 7]


def settle(steps, keep):
    """Passes as the drain makes every checkpoint durable, newest first: what stays in the end."""
    local = infos(*steps)
    durable: set[int] = set()
    for info in reversed(local):
        durable.add(info.step)
        plan = plan_retention(local, keep, durable.__contains__)
        local = [i for i in local if i.step not in plan.delete]
        for step in plan.owed:  # the drain uploads what is kept, older ones after the newest
            durable.add(step)
    return [i.step for i in local], durable


def test_once_the_drain_settles_exactly_the_kept_set_remains():
    remaining, _ = settle(range(1, 12), LatestN(3))
    assert remaining == [9, 10, 11]


@given(st.lists(st.integers(0, 200), unique=True, min_size=1, max_size=25).map(sorted),
       st.sets(st.integers(0, 200)), st.integers(0, 4), st.sets(st.integers(0, 200)))
def test_plan_invariants(steps, durable_set, n, partial):
    ck = infos(*steps)
    keep = LatestN(n)
    plan = plan_retention(ck, keep, durable_set.__contains__, incomplete=sorted(partial - set(steps)))
    durable_steps = [s for s in steps if s in durable_set]
    newest = durable_steps[-1] if durable_steps else None
    assert plan.newest_durable == newest
    below = [s for s in steps if newest is not None and s < newest]
    assert plan.delete == tuple(s for s in below if s not in keep.keep(ck))
    assert plan.superseded == tuple(s for s in plan.delete if s not in durable_set)
    assert plan.owed == tuple(s for s in steps if s not in plan.delete and s not in durable_set)
    assert all(newest is not None and s < newest for s in plan.incomplete)
