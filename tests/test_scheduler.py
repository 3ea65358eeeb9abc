"""Unit tier: the drain's scheduler (a pure function) and its priority limiter, without a mount."""

from __future__ import annotations

import dataclasses

import pytest
import trio

from gateway.priority import PriorityLimiter
from gateway.scheduler import Row, plan, plan_deletes
from gateway.scopes import ScopeRules

RULES = ScopeRules()
ROOT = 1


class Tree:
    """Builds scheduler rows for a small tree: directories get inode numbers as they appear."""

    def __init__(self):
        self.dirs: dict[str, int] = {"": ROOT}
        self.rows: list[Row] = []
        self.next_ino = 100

    def _dir(self, path: str) -> int:
        if path not in self.dirs:
            self.dirs[path] = self.next_ino
            self.next_ino += 1
        return self.dirs[path]

    def ancestors(self, path: str) -> tuple[int, ...]:
        parts = path.split("/")[:-1]
        chain = [self._dir("/".join(parts[:i])) for i in range(len(parts), 0, -1)]
        return (*chain, ROOT)

    def file(self, path: str, seq: int | None, *, startable: bool = True, held: bool = False) -> int:
        ino = self.next_ino
        self.next_ino += 1
        self.rows.append(Row(ino, path, self.ancestors(path), seq, False, held, startable and seq is not None))
        return ino

    def ino(self, path: str) -> int:
        return next(r.ino for r in self.rows if r.path == path)


def test_data_files_start_in_parallel_and_the_marker_waits_for_them():
    t = Tree()
    shards = [t.file(f"step_1/shard{i}", i) for i in range(3)]
    marker = t.file("step_1/COMMIT", 10)
    p = plan(t.rows, {}, RULES)
    assert set(p.start) == set(shards)
    assert set(p.waiting[marker]) == set(shards)


def test_marker_starts_once_its_scope_is_durable_and_ignores_files_closed_after_it():
    t = Tree()
    marker = t.file("step_1/.metadata", 10)
    later = t.file("step_1/extra", 11)
    other = t.file("step_2/shard", 5)  # another scope: not the marker's business
    p = plan(t.rows, {}, RULES)
    assert marker in p.start and later in p.start and other in p.start
    assert marker not in p.waiting


def test_marker_does_not_wait_for_held_or_still_written_files():
    t = Tree()
    t.file("step_1/x.tmp", 1, held=True)
    t.file("step_1/open_file", None)
    marker = t.file("step_1/commit_success.txt", 5)
    assert marker in plan(t.rows, {}, RULES).start


def test_a_marker_scope_names_its_newest_marker():
    """The drain counts a finished marker scope durable only while that marker is still linked:
    retention unlinks COMMIT first, and a checkpoint being deleted is not a durable one."""
    t = Tree()
    t.file("step_1/state.pt", 1)
    t.file("step_1/COMMIT", 2)
    newer = t.file("step_1/.metadata", 5)  # a second marker name in the same directory
    t.file("step_2/state.pt", 3)
    marker2 = t.file("step_2/COMMIT", 4)
    scopes = plan(t.rows, {}, RULES).scopes
    assert scopes[t.dirs["step_1"]].marker == newer and scopes[t.dirs["step_1"]].committed_seq == 5
    assert scopes[t.dirs["step_2"]].marker == marker2 and scopes[t.dirs["step_2"]].by_marker
    assert plan(t.rows, {t.dirs["step_2"]: 9}, RULES).scopes[t.dirs["step_2"]].marker == marker2


def test_newest_committed_scope_is_selected_and_keeps_its_rank():
    t = Tree()
    old = [t.file(f"step_1/s{i}", i) for i in range(2)]
    t.file("step_1/COMMIT", 3)
    new = [t.file(f"step_2/s{i}", 10 + i) for i in range(2)]
    t.file("step_2/COMMIT", 13)
    p = plan(t.rows, {}, RULES)
    step2, step1 = t.dirs["step_2"], t.dirs["step_1"]
    assert p.selected == step2
    assert all(p.priority[n] < p.priority[o] for n in new for o in old)
    # a newer commit arrives while step_2 is selected: step_2 is not preempted
    newest = t.file("step_3/s0", 20)
    t.file("step_3/COMMIT", 21)
    p2 = plan(t.rows, {}, RULES, selected=p.selected, prefer_old=p.prefer_old)
    assert p2.selected == step2
    assert all(p2.priority[n] < p2.priority[newest] for n in new)
    # no second scope is started alongside (superseded before selected, its parts would be waste)
    assert newest not in p2.start and old[0] not in p2.start
    assert p2.priority[newest] < p2.priority[old[0]]
    assert step1 != p2.selected


def test_files_outside_committed_scopes_go_after_the_selected_scope_in_fifo_order():
    t = Tree()
    loose = [t.file(f"logs/l{i}", 50 + i) for i in range(3)]
    data = t.file("step_1/shard", 60)
    t.file("step_1/COMMIT", 61)
    p = plan(t.rows, {}, RULES)
    assert p.priority[data] < p.priority[loose[0]] < p.priority[loose[1]] < p.priority[loose[2]]
    assert p.start.index(data) < p.start.index(loose[0])


def test_rename_scope_counts_as_committed():
    t = Tree()
    a = t.file("5/state/chunk0", 1)
    b = t.file("6/state/chunk0", 2)
    p = plan(t.rows, {t.dirs["5"]: 30, t.dirs["6"]: 40}, RULES)
    assert p.selected == t.dirs["6"]
    assert p.priority[b] < p.priority[a]


def test_rename_scope_under_a_temporary_name_is_not_committed():
    t = Tree()
    t.file("5.orbax-checkpoint-tmp-1/chunk", 1, held=True, startable=False)
    p = plan(t.rows, {t.dirs["5.orbax-checkpoint-tmp-1"]: 30}, RULES)
    assert p.scopes == {}


@pytest.mark.parametrize("how", ["held", "written"])
def test_a_held_or_still_written_file_does_not_keep_its_rename_scope_selected(how):
    t = Tree()
    t.file("5/state/chunk0.tmp", 1 if how == "held" else None, held=how == "held", startable=False)
    newer = t.file("model.pt", 2)
    scopes = {t.dirs["5"]: 30, t.ino("model.pt"): 40}
    # 5 was selected and started before model.pt was committed; all that is left of it waits
    p = plan(t.rows, scopes, RULES, selected=t.dirs["5"], started=True)
    assert set(p.scopes) == {newer}
    assert p.selected == newer and newer in p.start


def test_single_file_renamed_into_place_inside_a_marker_scope_belongs_to_the_marker_scope():
    t = Tree()
    state = t.file("step_1/state.pt", 5)
    t.file("step_1/COMMIT", 6)
    p = plan(t.rows, {state: 5}, RULES)
    assert p.selected == t.dirs["step_1"]
    assert p.priority[state][0] == 0


def test_pinned_older_scope_is_selected_alternately_others_only_when_nothing_newer_is_pending():
    t = Tree()
    old = t.file("step_1/s", 1)
    t.file("step_1/COMMIT", 2)
    t.file("step_3/s", 10)
    t.file("step_3/COMMIT", 11)
    step1, step3 = t.dirs["step_1"], t.dirs["step_3"]
    # step_2 (seq 5) is durable; step_1 is older: not before retention had its chance (old_ok)
    p = plan(t.rows, {}, RULES, newest_durable_seq=5, old_ok=frozenset(), pinned={step1}, prefer_old=True)
    assert p.selected == step3
    # kept by retention but not pinned (LatestN's second newest): only once nothing newer is pending
    p = plan(t.rows, {}, RULES, newest_durable_seq=5, old_ok={step1}, prefer_old=True)
    assert p.selected == step3
    # pinned (one checkpoint an hour): every other pick
    p = plan(t.rows, {}, RULES, newest_durable_seq=5, old_ok={step1}, pinned={step1}, prefer_old=True)
    assert p.selected == step1 and old in p.start and p.prefer_old is False
    p = plan(t.rows, {}, RULES, newest_durable_seq=5, old_ok={step1}, pinned={step1}, prefer_old=False)
    assert p.selected == step3
    only_old = [r for r in t.rows if r.path.startswith("step_1/")]
    assert plan(only_old, {}, RULES, newest_durable_seq=5, old_ok={step1}).selected == step1


def test_deleted_scope_disappears_and_the_next_one_is_selected():
    t = Tree()
    t.file("step_1/s", 1)
    t.file("step_1/COMMIT", 2)
    p = plan(t.rows, {}, RULES)
    assert p.selected == t.dirs["step_1"]
    t.rows.clear()  # rmtree: nothing of it is pending any more
    b = t.file("step_2/s", 5)
    t.file("step_2/COMMIT", 6)
    p2 = plan(t.rows, {}, RULES, selected=p.selected)
    assert p2.selected == t.dirs["step_2"] and b in p2.start


def test_pointer_waits_for_everything_before_it_in_its_directory():
    t = Tree()
    shard = t.file("run/iter_100/shard", 1)
    marker = t.file("run/iter_100/.metadata", 2)
    pointer = t.file("run/latest_checkpointed_iteration.txt", 3)
    p = plan(t.rows, {}, RULES)
    assert set(p.waiting[pointer]) == {shard, marker}
    assert pointer not in p.start


def test_gate_holds_the_marker_until_other_nodes_agree():
    t = Tree()
    marker = t.file("step_1/.metadata", 2)
    asked = []
    p = plan(t.rows, {}, RULES, gate=lambda scope, m: asked.append((scope, m)) or False)
    assert asked == [("step_1", "step_1/.metadata")]
    assert p.gated == {marker: "step_1"} and marker not in p.start
    assert marker in plan(t.rows, {}, RULES, gate=lambda scope, m: True).start


def test_room_bounds_what_starts_highest_priority_first():
    t = Tree()
    loose = t.file("loose", 1)
    data = [t.file(f"step_1/s{i}", 10 + i) for i in range(5)]
    t.file("step_1/COMMIT", 20)
    p = plan(t.rows, {}, RULES, room=2)
    assert p.start == data[:2] and loose not in p.start


def test_deletes_take_markers_and_pointers_first():
    stale = ["step_1/shard0", "step_1/sub/x", "step_1/COMMIT", "other/file", "latest", "step_2/a"]
    first = plan_deletes(stale, RULES)
    assert set(first) == {"step_1/COMMIT", "latest"}
    assert set(plan_deletes(["step_1/shard0", "other/file", "step_1/sub/x"], RULES)) == {
        "step_1/shard0", "other/file", "step_1/sub/x"}


@pytest.mark.trio
async def test_limiter_serves_lowest_priority_first_and_follows_reprioritize():
    limiter = PriorityLimiter(1)
    order: list[str] = []
    ranks = {"a": (5,), "b": (1,), "c": (3,)}

    async def worker(name: str):
        async with limiter.slot(lambda: ranks[name]):
            order.append(name)
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        await limiter.acquire(lambda: (0,))
        for name in "abc":
            nursery.start_soon(worker, name)
        await trio.sleep(0.01)
        ranks["a"] = (0,)  # "a" became the selected checkpoint's work
        limiter.reprioritize()
        limiter.release()
    assert order == ["a", "b", "c"]


@pytest.mark.trio
async def test_limiter_slot_is_not_leaked_by_a_cancellation_at_acquire():
    limiter = PriorityLimiter(1)
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await limiter.acquire(lambda: (0,))
    assert limiter.free == 1
    with trio.move_on_after(0.05):
        await limiter.acquire(lambda: (0,))  # the fast path: free slot, cancelled at its checkpoint
    assert limiter.free == 0
    limiter.release()
    assert limiter.free == 1


def test_markers_renamed_into_place_inside_their_directory_do_not_split_the_checkpoint():
    """DCP's `.metadata.tmp` and the shim's `COMMIT.tmp` are renamed into step_3: the renames are
    part of step_3's scope, so the shard they wait for is started (this deadlocked once)."""
    t = Tree()
    shard = t.file("run/step_3/__0_0.distcp", 6)
    metadata = t.file("run/step_3/.metadata", 11)
    commit = t.file("run/step_3/COMMIT", 17)
    p = plan(t.rows, {metadata: 12, commit: 18}, RULES)
    assert set(p.scopes) == {t.dirs["run/step_3"]}
    assert shard in p.start
    assert set(p.waiting[commit]) == {shard, metadata}


def test_what_a_chosen_marker_waits_for_inherits_its_priority():
    t = Tree()
    inner = t.file("step_3/model/shard", 1)
    t.file("step_3/model/.metadata", 2)
    commit = t.file("step_3/COMMIT", 3)
    for step in (4, 5):  # newer checkpoints take the selected and next ranks
        t.file(f"step_{step}/s", 10 * step)
        t.file(f"step_{step}/COMMIT", 10 * step + 1)
    p = plan(t.rows, {}, RULES, selected=t.dirs["step_3"])
    assert p.selected == t.dirs["step_3"]
    assert inner in p.start and p.priority[inner] <= p.priority[commit]


def test_a_selected_scope_nothing_of_which_was_sent_yields_to_a_newer_commit():
    """Under load two renames can land in different passes: the first scope is selected while its
    files still wait for the drain delay; the newer commit takes over until a job has started."""
    t = Tree()
    t.file("1/shard", 1, startable=False)
    p = plan(t.rows, {t.dirs["1"]: 10}, RULES)
    assert p.selected == t.dirs["1"] and p.start == []
    t.file("2/shard", 2, startable=False)
    scopes = {t.dirs["1"]: 10, t.dirs["2"]: 20}
    assert plan(t.rows, scopes, RULES, selected=p.selected, started=False).selected == t.dirs["2"]
    t.rows[0] = dataclasses.replace(t.rows[0], running=True)  # a job of 1 was started and runs
    assert plan(t.rows, scopes, RULES, selected=p.selected, started=True).selected == t.dirs["1"]


def test_a_selected_scope_that_cannot_move_yields_to_the_newest_that_can():
    """Nothing of the selected scope runs and nothing can start (a file backing off after errors,
    a marker waiting for a lost node): the newest scope that can move is selected, not the stuck
    one, and not a newer scope that is stuck too."""
    t = Tree()
    stuck = t.file("1/shard", 1, startable=False)  # backing off
    older = t.file("0/shard", 0)
    t.file("2/shard", 2, startable=False)  # within the drain delay
    scopes = {t.dirs["0"]: 5, t.dirs["1"]: 10, t.dirs["2"]: 20}
    p = plan(t.rows, scopes, RULES, selected=t.dirs["1"], started=True)
    assert p.selected == t.dirs["0"] and p.start == [older] and stuck not in p.start
    kept = plan(t.rows, scopes, RULES, selected=t.dirs["0"], started=True)
    assert kept.selected == t.dirs["0"]  # it moves: kept


def test_a_selected_scope_whose_marker_waits_on_running_files_is_kept():
    t = Tree()
    shard = t.file("1/shard", 1, startable=False)
    t.rows[-1] = dataclasses.replace(t.rows[-1], running=True)
    t.file("1/COMMIT", 2)
    t.file("2/shard", 3)
    t.file("2/COMMIT", 4)
    p = plan(t.rows, {}, RULES, selected=t.dirs["1"], started=True)
    assert p.selected == t.dirs["1"] and shard not in p.start


def test_several_nodes_a_renamed_directory_publishes_its_closing_file_last_and_through_the_gate():
    t = Tree()
    shard = t.file("step_5/shard_a", 10)
    closing = t.file("step_5/meta.json", 11)  # the renaming node's newest file of the scope
    scopes = {t.dirs["step_5"]: 9}
    asked = []
    gate = lambda scope, m: asked.append((scope, m)) or False  # noqa: E731
    p = plan(t.rows, scopes, RULES, gate=gate, gate_renames=True)
    assert p.start == [shard] and p.waiting == {closing: [shard]} and asked == []
    t.rows = [r for r in t.rows if r.ino != shard]  # its shard is durable: now the gate decides
    p = plan(t.rows, scopes, RULES, gate=gate, gate_renames=True)
    assert asked == [("step_5", "step_5/meta.json")] and p.gated == {closing: "step_5"} and p.start == []
    assert plan(t.rows, scopes, RULES, gate=lambda s, m: True, gate_renames=True).start == [closing]
    assert plan(t.rows, scopes, RULES).start == [closing]  # one node: a rename scope is not gated


def test_several_nodes_a_single_file_renamed_into_place_is_not_gated():
    t = Tree()
    single = t.file("model.pt", 12)
    p = plan(t.rows, {single: 12}, RULES, gate=lambda s, m: False, gate_renames=True)
    assert p.start == [single] and p.gated == {}
