"""Issue 12: `ckptfs checkpoints`, the checkpoint catalog, against a real mount and its bucket.

A real daemon on the moto server holds checkpoints written by the real frameworks (the shim with
torch and DCP, a torch file renamed into place, plain DCP, Orbax), some of them broken afterwards
through the mount. The real CLI lists them from the bucket URL and from the mount.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil

import pytest

from gateway import catalog, markers
from tests.conftest import ckptfs_cli
from tests.support.terminal import run_on_pty

pytestmark = pytest.mark.timeout(600)


def _fuse_usable() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


def _rel(entry: dict, base: str) -> str:
    return entry["path"][len(base):].lstrip("/")


def _by_rel(out: dict, base: str) -> dict[str, dict]:
    return {_rel(c, base): c for c in out["checkpoints"]}


def write_checkpoints(root):
    """Every kind of checkpoint the catalog knows, complete and broken, written through the mount."""
    import torch
    import torch.distributed.checkpoint as dcp

    from mount import ContinuousCheckpointer

    state = lambda step: {"w": torch.arange(1000.0) + step, "step": torch.tensor(step)}  # noqa: E731
    with ContinuousCheckpointer(root / "shim") as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, state(step))
    os.unlink(root / "shim/step_2/state.pt")  # a file the COMMIT lists is gone
    with open(root / "shim/step_3/state.pt", "ab") as f:  # grew after the commit
        f.write(b"extra")
    (root / "shim/step_4").mkdir()  # a save that never committed
    torch.save(state(4), root / "shim/step_4/state.pt")
    with ContinuousCheckpointer(root / "shim2") as ckpt:
        ckpt.save(9, state(9))
    data = bytearray((root / "shim2/step_9/state.pt").read_bytes())
    data[-30] ^= 0xFF  # same size, different content
    (root / "shim2/step_9/state.pt").write_bytes(bytes(data))
    with ContinuousCheckpointer(root / "shimdcp", format="dcp") as ckpt:
        ckpt.save(5, {"w": torch.ones(64)})
    (root / "torchfiles").mkdir()
    torch.save(state(7), root / "torchfiles/model_step7.pt.tmp")
    os.rename(root / "torchfiles/model_step7.pt.tmp", root / "torchfiles/model_step7.pt")
    for step in (10, 11):
        dcp.save({"w": torch.ones(32) * step}, checkpoint_id=str(root / f"dcp/step-{step}"), no_dist=True)
    os.unlink(root / "dcp/step-11/.metadata")  # marker gone: not a checkpoint any more

    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(str(root / "orbax"))
    mngr.save(20, args=ocp.args.StandardSave({"w": jnp.arange(16.0)}))
    mngr.wait_until_finished()
    mngr.close()


@pytest.mark.skipif(not _fuse_usable(), reason="FUSE is not available")
def test_catalog_of_a_real_mount(make_mount, s3_server, bucket):
    pytest.importorskip("orbax.checkpoint")
    mount = make_mount(prefix="run")
    write_checkpoints(mount.path)
    mount.wait(timeout=300)
    ckptfs_cli("promote", str(mount.path / "shim/step_1"))

    url = f"s3://{bucket}/run"
    from_bucket = json.loads(ckptfs_cli("checkpoints", url, "--endpoint-url", s3_server.endpoint_url,
                                        "--json").stdout)
    from_mount = json.loads(ckptfs_cli("checkpoints", str(mount.path), "--json").stdout)
    bucket_cps, mount_cps = _by_rel(from_bucket, url), _by_rel(from_mount, str(mount.path))

    # the same catalog either way, only the paths differ
    strip = lambda c: {k: v for k, v in c.items() if k not in ("path", "age_s", "local_state")}  # noqa: E731
    assert {r: strip(c) for r, c in bucket_cps.items()} == {r: strip(c) for r, c in mount_cps.items()}
    assert set(bucket_cps) == {"shim/step_1", "shim/step_2", "shim/step_3", "shim/step_4", "shim2/step_9",
                               "shimdcp/step_5", "torchfiles/model_step7.pt", "dcp/step-10", "dcp/step-11",
                               "orbax/20"}, sorted(bucket_cps)
    cps = bucket_cps

    def check(rel, framework, step, complete, missing=()):
        c = cps[rel]
        assert (c["framework"], c["step"], c["complete"], c["durable"]) == (framework, step, complete, complete), c
        for needle in missing:
            assert any(needle in m for m in c["missing"]), (rel, needle, c["missing"])
        assert bool(c["missing"]) != complete

    check("shim/step_1", "shim", 1, True)
    check("shim/step_2", "shim", 2, False, ["state.pt: missing"])
    committed = json.loads((mount.path / "shim/step_3/COMMIT").read_text())["files"][0]["size"]
    check("shim/step_3", "shim", 3, False, [f"state.pt: {committed + 5} bytes, COMMIT says {committed}"])
    check("shim/step_4", "shim", 4, False, ["COMMIT (no completion marker)"])
    check("shim2/step_9", "shim", 9, False, ["state.pt: digest differs from COMMIT"])
    check("shimdcp/step_5", "shim", 5, True)
    check("torchfiles/model_step7.pt", "torch", 7, True)
    check("dcp/step-10", "dcp", 10, True)
    check("dcp/step-11", "dcp", 11, False, [".metadata (no completion marker)"])
    check("orbax/20", "orbax", 20, True)
    assert cps["shimdcp/step_5"]["format"] == "dcp" and cps["shim/step_1"]["format"] == "torch"
    assert cps["torchfiles/model_step7.pt"]["kind"] == "file"

    keys = mount.keys()
    step1 = {k: v for k, v in keys.items() if k.startswith("shim/step_1/")}
    assert cps["shim/step_1"]["files"] == len(step1) == 2  # state.pt and COMMIT
    assert cps["shim/step_1"]["size_bytes"] == sum(step1.values())
    assert cps["orbax/20"]["files"] == sum(1 for k in keys if k.startswith("orbax/20/"))
    assert all(c["storage_class"] == "STANDARD" for c in cps.values())
    assert cps["shim/step_1"]["promoted"] and not cps["shim/step_3"]["promoted"]
    assert all(c["age_s"] is not None and 0 <= c["age_s"] < 600 for c in cps.values())
    assert mount_cps["shim/step_1"]["local_state"] == "durable"

    # --latest-complete over the shim's directory names what ContinuousCheckpointer.restore() loads
    from mount import ContinuousCheckpointer

    with ContinuousCheckpointer(mount.path / "shim") as ckpt:
        restored_step, _ = ckpt.restore()
        restored_dir = ckpt.step_dir(restored_step)
    assert restored_step == 1
    latest = ckptfs_cli("checkpoints", str(mount.path / "shim"), "--latest-complete").stdout.strip()
    assert latest == restored_dir
    latest_url = ckptfs_cli("checkpoints", f"{url}/shim", "--latest-complete",
                            "--endpoint-url", s3_server.endpoint_url).stdout.strip()
    assert latest_url == f"{url}/shim/step_1"
    # over everything: the highest complete step
    assert from_bucket["latest_complete"] == f"{url}/orbax/20"

    # plain text off a terminal: one row per checkpoint, what is missing under it
    text = ckptfs_cli("checkpoints", str(mount.path)).stdout
    assert "missing: state.pt: missing" in text and f"latest complete: {mount.path}/orbax/20" in text
    assert len([line for line in text.splitlines() if line.startswith(str(mount.path))]) == len(cps)
    # a table on a terminal
    rc, drawn = run_on_pty("checkpoints", str(mount.path / "shim"))
    drawn = re.sub(r"\x1b\[[0-9;]*m", "", drawn)
    assert rc == 0 and "┃ checkpoint" in drawn and "missing: state.pt: missing" in drawn, drawn
    assert re.search(r"│ step_1 +│ +1 │ shim/torch │ yes ", drawn), drawn
    assert drawn.split("latest complete:")[1].strip() == f"{mount.path}/shim/step_1"


@pytest.mark.skipif(not _fuse_usable(), reason="FUSE is not available")
def test_latest_complete_fails_cleanly_without_one(make_mount, s3_server, bucket):
    mount = make_mount(prefix="empty")
    (mount.path / "step_3").mkdir()
    (mount.path / "step_3" / "state.pt").write_bytes(b"x" * 10)
    mount.wait()
    result = ckptfs_cli("checkpoints", str(mount.path), "--latest-complete", check=False)
    assert result.returncode == 1 and result.stderr.strip() == \
        f"ckptfs checkpoints: no complete checkpoint under {mount.path}"
    result = ckptfs_cli("checkpoints", f"s3://{bucket}-missing/x", "--endpoint-url", s3_server.endpoint_url,
                        check=False)
    assert result.returncode == 3 and "NoSuchBucket" in result.stderr and len(result.stderr.splitlines()) == 1


@pytest.mark.skipif(not _fuse_usable(), reason="FUSE is not available")
def test_catalog_of_a_stopped_mount_comes_from_the_config(make_mount, s3_server, bucket, tmp_path):
    """No daemon serves the path any more: bucket, prefix and endpoint come from the configuration."""
    import torch

    mount = make_mount(prefix="cfg")
    torch.save({"w": torch.ones(8)}, mount.path / "final.pt")
    mount.unmount()
    config = tmp_path / "ckptfs.toml"
    config.write_text(f'[bucket]\nbucket = "{bucket}"\nprefix = "cfg"\nendpoint_url = "{s3_server.endpoint_url}"\n'
                      f'[filesystem]\nmountpoint = "{mount.path}"\n')
    out = json.loads(ckptfs_cli("checkpoints", str(mount.path), "--config", str(config), "--json").stdout)
    assert [(c["path"], c["framework"], c["complete"]) for c in out["checkpoints"]] == \
        [(f"{mount.path}/final.pt", "torch", True)]
    env = dict(os.environ, AWS_ENDPOINT_URL=s3_server.endpoint_url)  # credentials and endpoint, nothing else
    env.pop("CKPTFS_ENDPOINT_URL", None)
    out = json.loads(ckptfs_cli("checkpoints", f"s3://{bucket}/cfg", "--json", env=env).stdout)
    assert [c["path"] for c in out["checkpoints"]] == [f"s3://{bucket}/cfg/final.pt"]
    elsewhere = ckptfs_cli("checkpoints", str(tmp_path), "--config", str(config), check=False)
    assert elsewhere.returncode == 2 and "not inside a ckptfs mount" in elsewhere.stderr


# -- markers and grouping, without a mount ------------------------------------------------------


def test_dcp_metadata_is_read_without_running_code(tmp_path):
    torch = pytest.importorskip("torch")
    import torch.distributed.checkpoint as dcp

    dcp.save({"a": torch.ones(10), "b": {"c": torch.zeros(100)}}, checkpoint_id=str(tmp_path), no_dist=True)
    info = markers.read_dcp_metadata((tmp_path / ".metadata").read_bytes())
    on_disk = {p.name: p.stat().st_size for p in tmp_path.glob("*.distcp")}
    assert {e.name: e.min_size for e in info.expected} == on_disk

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    with pytest.raises(markers.MarkerError):
        markers.read_dcp_metadata(pickle.dumps({"x": Evil()}))
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(markers.MarkerError):
        markers.read_dcp_metadata(b"not a pickle")


def test_shim_commit_reader_matches_the_checkpointer():
    good = {"version": 1, "step": 3, "time": 1.5, "format": "dcp",
            "files": [{"name": "a", "size": 2, "xxh3_128": "ff", "rank": 0}]}
    info = markers.read_shim_commit(json.dumps(good).encode())
    assert (info.step, info.time, info.format) == (3, 1.5, "dcp")
    assert info.expected == (markers.ExpectedFile("a", 2, xxh3_128="ff"),)
    for bad in (b"{", b"[]", json.dumps({"step": 1}).encode(), json.dumps({"files": [{"name": "a"}]}).encode()):
        with pytest.raises(markers.MarkerError):
            markers.read_shim_commit(bad)


def test_grouping_claims_subtrees_and_step_dirs():
    obj = lambda rel: catalog.Obj(rel, 1, 0.0, "STANDARD")  # noqa: E731
    rels = ["5/_CHECKPOINT_METADATA", "5/commit_success.txt", "5/default/commit_success.txt",
            "5/default/d/x", "a/step_2/state.pt", "a/step_2/COMMIT", "a/step_3/state.pt",
            "final.pt", "a/step_2/extra.pt", "notes/readme.txt", "dcp/x/__0_0.distcp"]
    found = {c.rel: c for c in catalog.find_checkpoints({r: obj(r) for r in rels})}
    assert set(found) == {"5", "a/step_2", "a/step_3", "final.pt", "dcp/x"}
    assert (found["5"].framework, found["5"].marker, len(found["5"].objects)) == ("orbax", "_CHECKPOINT_METADATA", 4)
    assert (found["a/step_3"].framework, found["a/step_3"].marker) == ("shim", None)
    assert found["final.pt"].kind == "file" and found["dcp/x"].framework == "dcp"
    assert len(found["a/step_2"].objects) == 3  # extra.pt belongs to the checkpoint, not a torch file


def test_inspect_checks_against_the_marker_without_s3():
    obj = lambda rel, size=10: catalog.Obj(rel, size, 100.0, "STANDARD")  # noqa: E731
    commit = json.dumps({"step": 3, "files": [{"name": "a.pt", "size": 10, "xxh3_128": "d1"},
                                              {"name": "b.pt", "size": 10, "xxh3_128": "d2"}]}).encode()
    target = catalog.Target("bkt", "run", None)
    cand = catalog._Candidate("step_3", "directory", "shim", "COMMIT",
                              {"step_3/COMMIT": obj("step_3/COMMIT"), "step_3/a.pt": obj("step_3/a.pt"),
                               "step_3/b.pt": obj("step_3/b.pt")})
    heads = {"step_3/COMMIT": {}, "step_3/a.pt": {"ckptfs-xxh3": "d1", "ckptfs-size": "10"},
             "step_3/b.pt": {"ckptfs-xxh3": "d2", "ckptfs-size": "12"}}
    cp = catalog.inspect(target, cand, heads, {"step_3/a.pt": "true"}, commit, now=160.0)
    assert (cp.path, cp.step, cp.files, cp.size_bytes, cp.age_s) == ("s3://bkt/run/step_3", 3, 3, 30, 60.0)
    assert cp.missing == ["b.pt: 10 bytes in the bucket, 12 uploaded"] and not cp.complete and not cp.durable
    assert (cp.promoted, cp.promoted_files) == (False, 1)
    heads["step_3/b.pt"]["ckptfs-size"] = "10"
    assert catalog.inspect(target, cand, heads, {}, commit, now=160.0).complete
    tmp = catalog._Candidate("7.orbax-checkpoint-tmp-12", "directory", "orbax", "_CHECKPOINT_METADATA",
                             {"7.orbax-checkpoint-tmp-12/_CHECKPOINT_METADATA": obj("x"),
                              "7.orbax-checkpoint-tmp-12/commit_success.txt": obj("y")})
    cp = catalog.inspect(target, tmp, {k: {} for k in tmp.objects}, {}, b'{"item_handlers": {}}', now=0)
    assert cp.missing == ["7.orbax-checkpoint-tmp-12: a temporary name (the save was never renamed into place)"]


def _cp(step, complete, uploaded):
    return catalog.Checkpoint(path=f"p{step}-{uploaded}", key="", kind="directory", framework="shim", step=step,
                              complete=complete, missing=[], durable=complete, size_bytes=0, files=0, age_s=0,
                              storage_class="STANDARD", promoted=False, promoted_files=0, newest_upload=uploaded)


def test_latest_complete_is_the_highest_complete_step():
    cps = [_cp(3, True, 5.0), _cp(9, False, 9.0), _cp(7, True, 1.0), _cp(None, True, 99.0)]
    assert catalog.latest_complete(cps).path == "p7-1.0"
    assert catalog.latest_complete([_cp(None, True, 2.0), _cp(None, True, 3.0)]).path == "pNone-3.0"
    assert catalog.latest_complete([_cp(1, False, 0.0)]) is None
