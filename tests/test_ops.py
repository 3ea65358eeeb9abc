"""Issue 7 (operations): lifecycle, promote, config, mount helper, metrics, deploy files, docs.

S3 tests run the real CLI against a moto server on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest

from gateway import cli, config as cfg, lifecycle, mount_helper, promote, s3ops
from gateway.metrics import start_metrics_server

try:
    from tests.support import S3Server
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from support import S3Server

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    with S3Server() as srv:
        yield srv


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No CKPTFS_* leaks in; fake credentials for boto3; no /etc config."""
    for name in list(os.environ):
        if name.startswith(("CKPTFS_", "AWS_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config-none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-creds-none"))
    monkeypatch.setattr(cfg, "DEFAULT_CONFIG_PATH", tmp_path / "no-such-ckptfs.toml")


@pytest.fixture
def bkt(server):
    """A fresh bucket on this module's moto server (conftest's `bucket` is on its own server)."""
    return server.make_bucket(f"t7-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def s3(server):
    return server.boto3_client()


def run(capsys, *argv):
    """Run the ckptfs CLI in-process; returns (rc, stdout, stderr)."""
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def lc(capsys, server, *argv):
    return run(capsys, "lifecycle", *argv, "--endpoint-url", server.endpoint_url)


def rules_of(s3, bucket):
    return s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]


def matches(rule, key, tags):
    """Does a lifecycle rule's filter select object `key` with `tags` (S3 semantics)?"""
    flt = rule.get("Filter", {"Prefix": rule.get("Prefix", "")})
    cond = flt.get("And", flt)
    want = cond.get("Tags", []) + ([cond["Tag"]] if "Tag" in cond else [])
    have = {t["Key"]: t["Value"] for t in tags}
    return key.startswith(cond.get("Prefix", "")) and all(have.get(t["Key"]) == t["Value"] for t in want)


APPLY = ["--transition-after", 7, "--storage-class", "GLACIER", "--expire-after", 30, "--abort-multipart-after", 2]


# -- lifecycle ----------------------------------------------------------------------------------


def test_lifecycle_apply_writes_prefix_scoped_rules(capsys, server, bkt, s3):
    rc, out, err = lc(capsys, server, "apply", f"s3://{bkt}/team/run", *APPLY)
    assert rc == 0, err
    rules = {r["ID"]: r for r in rules_of(s3, bkt)}
    assert set(rules) == {"ckptfs:team/run/:ephemeral", "ckptfs:team/run/:multipart"}
    eph = rules["ckptfs:team/run/:ephemeral"]
    assert eph["Filter"] == {"And": {"Prefix": "team/run/", "Tags": [{"Key": "ckptfs-keep", "Value": "false"}]}}
    assert eph["Transitions"] == [{"Days": 7, "StorageClass": "GLACIER"}]
    assert eph["Expiration"] == {"Days": 30}
    mpu = rules["ckptfs:team/run/:multipart"]
    assert mpu["Filter"] == {"Prefix": "team/run/"}
    assert mpu["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 2}
    # show: human and JSON
    rc, out, _ = lc(capsys, server, "show", f"s3://{bkt}/team/run")
    assert rc == 0 and out.count("\n* ") == 2 and "ckptfs-keep=false" in out
    rc, out, _ = lc(capsys, server, "show", f"s3://{bkt}/team/run", "--json")
    assert json.loads(out)["Rules"] == rules_of(s3, bkt)


def test_lifecycle_rules_exempt_promoted_and_respect_prefix_boundary():
    eph, mpu = lifecycle.ckptfs_rules("run", transition_after=1, storage_class="GLACIER", expire_after=2,
                                      abort_multipart_after=3)
    ephemeral = [{"Key": "ckptfs-keep", "Value": "false"}]
    kept = [{"Key": "ckptfs-keep", "Value": "true"}, {"Key": "owner", "Value": "x"}]
    assert matches(eph, "run/step-1/model.pt", ephemeral)
    assert not matches(eph, "run/step-1/model.pt", kept)
    assert not matches(eph, "run/step-1/model.pt", [])  # untagged (foreign) objects are never expired
    assert not matches(eph, "run2/model.pt", ephemeral)  # 'run' must not cover 'run2'
    assert "Tags" not in json.dumps(mpu)  # S3 rejects AbortIncompleteMultipartUpload with tag filters
    whole, _ = lifecycle.ckptfs_rules("", expire_after=2, abort_multipart_after=1)
    assert whole["Filter"] == {"Tag": {"Key": "ckptfs-keep", "Value": "false"}}


def test_lifecycle_merge_keeps_other_rules(capsys, server, bkt, s3):
    others = [
        {"ID": "logs", "Status": "Enabled", "Filter": {"Prefix": "logs/"}, "Expiration": {"Days": 3}},
        {"ID": "legacy", "Status": "Enabled", "Prefix": "old/", "Expiration": {"Days": 9}},
    ]
    s3.put_bucket_lifecycle_configuration(Bucket=bkt, LifecycleConfiguration={"Rules": others})
    assert lc(capsys, server, "apply", f"s3://{bkt}/a", *APPLY)[0] == 0
    assert lc(capsys, server, "apply", f"s3://{bkt}/b", "--expire-after", 5)[0] == 0
    rules = rules_of(s3, bkt)
    assert [r["ID"] for r in rules] == ["logs", "legacy", "ckptfs:a/:ephemeral", "ckptfs:a/:multipart",
                                        "ckptfs:b/:ephemeral"]
    assert rules[:2] == others
    # re-applying a with new values replaces a's rules in place, leaves b's alone
    assert lc(capsys, server, "apply", f"s3://{bkt}/a", "--expire-after", 60, "--abort-multipart-after", 1)[0] == 0
    after = rules_of(s3, bkt)
    assert [r["ID"] for r in after] == [r["ID"] for r in rules]
    assert after[2]["Expiration"] == {"Days": 60} and "Transitions" not in after[2]
    assert after[4] == rules[4]


def test_lifecycle_apply_is_idempotent(capsys, server, bkt, s3):
    url = f"s3://{bkt}/ckpt"
    assert lc(capsys, server, "apply", url, *APPLY)[0] == 0
    first = rules_of(s3, bkt)
    rc, out, _ = lc(capsys, server, "apply", url, *APPLY)
    assert rc == 0 and "already up to date" in out
    assert rules_of(s3, bkt) == first


def test_lifecycle_apply_is_declarative(capsys, server, bkt, s3):
    url = f"s3://{bkt}/ckpt"
    assert lc(capsys, server, "apply", url, *APPLY)[0] == 0
    assert lc(capsys, server, "apply", url, "--abort-multipart-after", 4)[0] == 0
    assert [r["ID"] for r in rules_of(s3, bkt)] == ["ckptfs:ckpt/:multipart"]


def test_lifecycle_dry_run_writes_nothing(capsys, server, bkt, s3):
    rc, out, err = lc(capsys, server, "apply", f"s3://{bkt}/p", *APPLY, "--dry-run")
    assert rc == 0, err
    assert [r["ID"] for r in json.loads(out)["Rules"]] == ["ckptfs:p/:ephemeral", "ckptfs:p/:multipart"]
    with pytest.raises(Exception, match="NoSuchLifecycleConfiguration"):
        rules_of(s3, bkt)
    rc, out, _ = lc(capsys, server, "show", f"s3://{bkt}/p")
    assert rc == 0 and "no lifecycle rules" in out


@pytest.mark.parametrize("args, needle", [
    (["--transition-after", 30, "--storage-class", "GLACIER", "--expire-after", 30], "greater than"),
    (["--transition-after", 3], "go together"),
    (["--expire-after", 0], "at least 1 day"),
    ([], "nothing to apply"),
])
def test_lifecycle_apply_rejects_bad_options(capsys, server, bkt, args, needle):
    rc, out, err = lc(capsys, server, "apply", f"s3://{bkt}/p", *args)
    assert rc == 2 and needle in err and err.count("\n") == 1 and out == ""


def test_lifecycle_missing_bucket_is_one_line(capsys, server):
    rc, _, err = lc(capsys, server, "show", "s3://no-such-bkt-t7")
    assert rc == 3 and "NoSuchBucket" in err and err.count("\n") == 1


# -- promote ------------------------------------------------------------------------------------


def upload(s3, bucket, keys, tagging=s3ops.UPLOAD_TAGGING):
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode(), Tagging=tagging)


def keep_of(s3, bucket, key):
    return {t["Key"]: t["Value"] for t in s3.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]}


def test_promote_directory_tags_its_objects_only(capsys, server, bkt, s3):
    step1 = ["p/run/step-1/model.pt", "p/run/step-1/optim/0.pt", "p/run/step-1/optim/1.pt"]
    others = ["p/run/step-10/model.pt", "p/run/step-1.json", "p/.ckptfs/journal"]
    upload(s3, bkt, step1 + others, tagging=s3ops.UPLOAD_TAGGING + "&owner=alice")
    rc, out, err = run(capsys, "promote", f"s3://{bkt}/p/run/step-1", "--endpoint-url", server.endpoint_url)
    assert rc == 0, err
    assert "3 object(s), 3 newly tagged" in out
    for key in step1:
        assert keep_of(s3, bkt, key) == {"ckptfs-keep": "true", "owner": "alice"}
    for key in others:
        assert keep_of(s3, bkt, key)["ckptfs-keep"] == "false"
    rc, out, _ = run(capsys, "promote", f"s3://{bkt}/p/run/step-1", "--endpoint-url", server.endpoint_url)
    assert rc == 0 and "0 newly tagged" in out  # idempotent
    # the lifecycle rule now spares step-1 but not step-10
    eph = lifecycle.ckptfs_rules("p", expire_after=3)[0]
    tags = lambda k: s3.get_object_tagging(Bucket=bkt, Key=k)["TagSet"]  # noqa: E731
    assert not any(matches(eph, k, tags(k)) for k in step1)
    assert matches(eph, "p/run/step-10/model.pt", tags("p/run/step-10/model.pt"))


def test_promote_single_file_and_undo(capsys, server, bkt, s3):
    upload(s3, bkt, ["p/a.pt", "p/a.pt.bak"])
    ep = ["--endpoint-url", server.endpoint_url]
    assert run(capsys, "promote", f"s3://{bkt}/p/a.pt", *ep)[0] == 0
    assert keep_of(s3, bkt, "p/a.pt")["ckptfs-keep"] == "true"
    assert keep_of(s3, bkt, "p/a.pt.bak")["ckptfs-keep"] == "false"
    assert run(capsys, "promote", "--undo", f"s3://{bkt}/p/a.pt", *ep)[0] == 0
    assert keep_of(s3, bkt, "p/a.pt")["ckptfs-keep"] == "false"


def test_promote_list_compacts_directories(capsys, server, bkt, s3):
    upload(s3, bkt, ["p/r/s1/a", "p/r/s1/b", "p/r/s2/a", "p/r/s2/b", "p/r/x.json"])
    ep = ["--endpoint-url", server.endpoint_url]
    assert run(capsys, "promote", f"s3://{bkt}/p/r/s1", f"s3://{bkt}/p/r/s2/a", *ep)[0] == 0
    rc, out, _ = run(capsys, "promote", "--list", f"s3://{bkt}/p", *ep)
    assert rc == 0
    assert [line.split("\t")[0] for line in out.splitlines()] == [f"s3://{bkt}/p/r/s1/", f"s3://{bkt}/p/r/s2/a"]
    assert "2 object(s)" in out.splitlines()[0]
    rc, out, _ = run(capsys, "promote", "--list", "--json", f"s3://{bkt}/p", *ep)
    assert [row["key"] for row in json.loads(out)] == ["p/r/s1/a", "p/r/s1/b", "p/r/s2/a"]


def test_promote_nothing_there_fails(capsys, server, bkt):
    rc, _, err = run(capsys, "promote", f"s3://{bkt}/p/missing", "--endpoint-url", server.endpoint_url)
    assert rc == 1 and "no objects" in err


def test_promote_mount_path_uses_status_xattr(capsys, monkeypatch, server, bkt, s3, tmp_path):
    """A mount path maps to PREFIX/<rel>; files not yet uploaded make promote refuse."""
    mnt = tmp_path / "mnt"
    (mnt / "run" / "step-5").mkdir(parents=True)
    (mnt / "run" / "step-5" / "w.pt").write_bytes(b"p/run/step-5/w.pt")
    (mnt / "run" / "step-5" / "meta.json").write_bytes(b"p/run/step-5/meta.json")
    status = {"bucket": bkt, "prefix": "p", "endpoint_url": server.endpoint_url, "mountpoint": str(mnt)}
    monkeypatch.setattr(promote.os.path, "ismount", lambda p: os.path.abspath(p) in (str(mnt), "/"))
    monkeypatch.setattr(promote, "read_status", lambda root: status if root == str(mnt) else None)
    target = promote.resolve_target(str(mnt / "run" / "step-5"), None, None)
    assert (target.bucket, target.key, target.endpoint_url) == (bkt, "p/run/step-5", server.endpoint_url)
    upload(s3, bkt, ["p/run/step-5/w.pt"])
    rc, _, err = run(capsys, "promote", mnt / "run" / "step-5")
    assert rc == 4 and "ckptfs wait" in err and "meta.json" in err
    assert keep_of(s3, bkt, "p/run/step-5/w.pt")["ckptfs-keep"] == "false"  # nothing tagged
    upload(s3, bkt, ["p/run/step-5/meta.json"])
    rc, out, err = run(capsys, "promote", mnt / "run" / "step-5")
    assert rc == 0, err
    assert keep_of(s3, bkt, "p/run/step-5/meta.json")["ckptfs-keep"] == "true"
    rc, out, _ = run(capsys, "promote", "--list", mnt)
    assert out.split("\t")[0] == f"{mnt}/"  # everything under the prefix is promoted
    upload(s3, bkt, ["p/other.pt"])
    rc, out, _ = run(capsys, "promote", "--list", mnt)
    assert out.split("\t")[0] == f"{mnt}/run/"
    with pytest.raises(Exception, match="not inside a ckptfs mount"):
        promote.resolve_target(str(tmp_path), None, None)


# -- configuration ------------------------------------------------------------------------------


def write_toml(path, text):
    path.write_text(text)
    return path


def test_config_precedence_toml_env_flags(tmp_path):
    toml = write_toml(tmp_path / "c.toml", '[drain]\ndrain_delay_s = 1\nupload_concurrency = 4\npart_size_bytes = "32MiB"\n'
                      '[cache]\ncache_size = "50%"\n')
    env = {"CKPTFS_DRAIN_DELAY_S": "2", "CKPTFS_UPLOAD_CONCURRENCY": "5"}
    config, sources = cfg.resolve_with_sources({"drain_delay_s": 3.0}, toml, env)
    assert (config.drain_delay_s, config.upload_concurrency, config.part_size_bytes, config.cache_size) == \
        (3.0, 5, 32 * 2**20, "50%")
    assert sources["drain_delay_s"] == "flag"
    assert sources["upload_concurrency"] == "env CKPTFS_UPLOAD_CONCURRENCY"
    assert sources["cache_size"] == f"file {toml}"
    assert sources["log_level"] == "default"
    assert cfg.resolve({}, None, {"CKPTFS_CONFIG": str(toml)}).upload_concurrency == 4
    assert cfg.resolve({}, toml, {"CKPTFS_HOLD_PATTERNS": "*.a, *.b"}).hold_patterns == ("*.a", "*.b")


@pytest.mark.parametrize("toml, env, needle", [
    ('[drain]\nupload_concurrency = "many"\n', {}, "upload_concurrency"),
    ("[drain]\nupload_concurrency = true\n", {}, "upload_concurrency"),
    ("[drain]\ndrain_delay_s = -1\n", {}, "drain_delay_s: must be >= 0"),
    ("[drain]\nupload_concurency = 3\n", {}, "did you mean upload_concurrency"),
    ("[cache]\ncache_dir = '/x'\n", {}, "cache.cache_dir (it belongs in [filesystem])"),
    ("[bogus]\nx = 1\n", {}, "unknown section [bogus]"),
    ('cache_dir = "/x"\n', {}, "key cache_dir must be inside section [filesystem]"),
    ("[drain\n", {}, "not valid TOML"),
    ("", {"CKPTFS_PART_SIZE_BYTES": "huge"}, "part_size_bytes (from env CKPTFS_PART_SIZE_BYTES)"),
    ("", {"CKPTFS_METRICS_ADDR": "localhost"}, "metrics_addr"),
    ("", {"CKPTFS_ENDPOINT_URL": "minio:9000"}, "endpoint_url"),
    ("", {"CKPTFS_CACHE_SIZE": "lots"}, "cache_size"),
])
def test_bad_config_is_one_line_naming_the_key(capsys, monkeypatch, tmp_path, toml, env, needle):
    path = write_toml(tmp_path / "c.toml", toml)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    rc, out, err = run(capsys, "config", "show", "--config", path)
    assert rc == 2 and out == ""
    assert needle in err and err.count("\n") == 1, err


def test_missing_explicit_config_file(capsys, tmp_path):
    rc, _, err = run(capsys, "config", "show", "--config", tmp_path / "nope.toml")
    assert rc == 2 and "does not exist" in err


def test_config_show_redacts_secrets(capsys, monkeypatch, tmp_path):
    toml = write_toml(tmp_path / "c.toml", '[bucket]\nendpoint_url = "https://user:pw@minio.local:9000"\n')
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-xyz")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "t0ken-value-xyz")
    monkeypatch.setenv("CKPTFS_LOG_LEVEL", "DEBUG")
    rc, out, _ = run(capsys, "config", "show", "--config", toml)
    assert rc == 0
    assert "s3cr3t" not in out and "t0ken" not in out and "pw@" not in out
    assert "AWS_SECRET_ACCESS_KEY: set (redacted)" in out
    assert re.search(r'log_level = "DEBUG"\s+# env CKPTFS_LOG_LEVEL', out)
    body = "\n".join(line.split(" #")[0] for line in out.splitlines() if not line.startswith("#"))
    import tomllib
    assert tomllib.loads(body)["bucket"]["endpoint_url"] == "https://***@minio.local:9000"  # valid TOML
    rc, out, _ = run(capsys, "config", "show", "--config", toml, "--json")
    data = json.loads(out)
    assert data["credentials"]["AWS_SESSION_TOKEN"] == "set (redacted)" and "t0ken" not in out
    assert data["sources"]["endpoint_url"] == f"file {toml}"


def test_example_toml_is_valid(tmp_path):
    config = cfg.resolve({}, ROOT / "deploy" / "ckptfs.toml", {})
    assert config.metrics_addr and config.allow_other


# -- mount helper -------------------------------------------------------------------------------

FLAGS = {"cache_dir": "--cache-dir", "endpoint_url": "--endpoint-url", "allow_other": "--allow-other",
         "drain_timeout_s": "--drain-timeout", "config": "--config", "foreground": "--foreground"}


def test_mount_helper_translation():
    positionals, options, switches = mount_helper.parse_args(
        ["s3://b/p", "/mnt/ckpt", "-n", "-o", "rw,cache_dir=/var/cache/ckptfs,endpoint_url=http://127.0.0.1:9000",
         "-oallow_other,nofail,_netdev,defaults,noauto,x-systemd.automount,x-systemd.mount-timeout=30,"
         "drain-timeout-s=900,upload_concurrency=32,config=/etc/ckptfs/a.toml,comment=x,hold_patterns=*.tmp:*.part",
         "-t", "fuse.ckptfs"])
    assert positionals == ["s3://b/p", "/mnt/ckpt"] and switches == {"n"}
    argv, env = mount_helper.translate(*positionals, options, FLAGS)
    assert argv == ["s3://b/p", "/mnt/ckpt", "--cache-dir", "/var/cache/ckptfs", "--endpoint-url",
                    "http://127.0.0.1:9000", "--allow-other", "--drain-timeout", "900", "--config",
                    "/etc/ckptfs/a.toml"]
    # options without a flag in `ckptfs mount` go through the environment
    assert env == {"CKPTFS_UPLOAD_CONCURRENCY": "32", "CKPTFS_HOLD_PATTERNS": "*.tmp,*.part"}
    argv, env = mount_helper.translate("s3://b", "/m", ["allow_other=false", "upload_concurrency=3", "config=/c"], None)
    assert argv == ["s3://b", "/m"]  # without the mount command's flags, everything goes by environment
    assert env == {"CKPTFS_ALLOW_OTHER": "false", "CKPTFS_UPLOAD_CONCURRENCY": "3", "CKPTFS_CONFIG": "/c"}


def test_mount_helper_uses_real_mount_flags():
    flags = mount_helper.mount_flags()
    if flags is None:
        pytest.skip("gateway.cmd_mount is not present")
    argv, env = mount_helper.translate("s3://b/p", "/m", ["cache_dir=/c", "drain_delay_s=2", "allow_other"], flags)
    parsed = cli.build_parser().parse_args(["mount", *argv])
    assert (parsed.cache_dir, float(parsed.drain_delay_s), parsed.allow_other) == ("/c", 2.0, True)


@pytest.mark.parametrize("options, needle", [
    (["ro"], "read-write"), (["bogus=1"], "unknown option"), (["bucket=x"], "mount source"),
    (["cache_dir"], "needs a value"), (["config="], "needs a path"),
])
def test_mount_helper_rejects(options, needle):
    with pytest.raises(mount_helper.HelperError, match=needle):
        mount_helper.translate("s3://b/p", "/m", options, FLAGS)


def test_mount_helper_main(capsys):
    assert mount_helper.main(["s3://b/p", "/mnt/x", "-fv", "-o", "cache_dir=/c,bogus", "-s"]) == 0
    err = capsys.readouterr().err
    assert "-m gateway.cli mount s3://b/p /mnt/x --cache-dir /c" in err and "bogus" not in err
    assert mount_helper.main(["/mnt/x"]) == 1
    assert mount_helper.main(["bucket", "/mnt/x", "-f"]) == 1
    assert mount_helper.main(["s3://b/p", "/mnt/x", "-f", "-o", "bogus"]) == 1
    assert "unknown option 'bogus'" in capsys.readouterr().err


def test_mount_helper_console_script():
    exe = ROOT / ".venv" / "bin" / "mount.ckptfs"
    if not exe.exists():
        exe = Path(shutil.which("mount.ckptfs") or "/nonexistent")
    if not exe.exists():
        pytest.skip("mount.ckptfs console script is not installed")
    proc = subprocess.run([str(exe), "s3://b/p", "/mnt/x", "-f", "-v", "-o", "cache_dir=/c,_netdev"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--cache-dir /c" in proc.stderr


# -- metrics ------------------------------------------------------------------------------------


def test_metrics_endpoint_scrape():
    stats = {"dirty_bytes": 123, "queued_files": 2, "uploading_files": 1, "uploaded_bytes_total": 4096,
             "upload_errors_total": 1, "retries_total": 3, "oldest_pending_age_s": 1.5,
             "newest_durable_age_s": 0.25, "backpressure_seconds_total": 0.5, "cache_used_bytes": 999,
             "evictions_total": 4, "fuse_ops_total": {"write": 10, "open": 2}}
    server, _ = start_metrics_server("127.0.0.1:0", lambda: stats)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        for line in ("ckptfs_dirty_bytes 123.0", "ckptfs_uploaded_bytes_total 4096.0",
                     "ckptfs_upload_errors_total 1.0", "ckptfs_retries_total 3.0",
                     "ckptfs_oldest_pending_age_seconds 1.5", "ckptfs_newest_durable_age_seconds 0.25",
                     "ckptfs_backpressure_seconds_total 0.5", "ckptfs_cache_used_bytes 999.0",
                     "ckptfs_evictions_total 4.0", 'ckptfs_fuse_ops_total{op="write"} 10.0',
                     "ckptfs_queued_files 2.0", "ckptfs_uploading_files 1.0", "ckptfs_stats_up 1.0"):
            assert line in text.splitlines(), line
        assert "# TYPE ckptfs_uploaded_bytes_total counter" in text
        assert "ckptfs_held_files" not in text  # absent keys are skipped
        stats["dirty_bytes"] = 7  # read live on every scrape
        stats["held_files"] = None
        assert "ckptfs_dirty_bytes 7.0" in urllib.request.urlopen(url, timeout=10).read().decode()
    finally:
        server.shutdown()
        server.server_close()


def test_metrics_accept_daemon_status_keys():
    """The daemon passes its status dict (errors_total, not upload_errors_total)."""
    server, _ = start_metrics_server("127.0.0.1:0", lambda: {"errors_total": 5, "held_files": 2, "last_error": "x"})
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10).read().decode()
        assert "ckptfs_upload_errors_total 5.0" in text.splitlines()
        assert "ckptfs_held_files 2.0" in text.splitlines()
    finally:
        server.shutdown()
        server.server_close()


def test_metrics_run_stats_fn_on_the_trio_thread():
    import threading

    import trio

    seen = []

    def stats():
        seen.append(threading.get_ident())
        return {"dirty_bytes": 1}

    async def main():
        server, _ = start_metrics_server("127.0.0.1:0", stats, trio_token=trio.lowlevel.current_trio_token())
        try:
            url = f"http://127.0.0.1:{server.server_port}/metrics"
            text = await trio.to_thread.run_sync(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
        finally:
            server.shutdown()
            server.server_close()
        return text

    text = trio.run(main)
    assert "ckptfs_dirty_bytes 1.0" in text and seen == [threading.get_ident()]


def test_metrics_survive_a_failing_stats_source():
    def broken():
        raise RuntimeError("boom")

    server, _ = start_metrics_server("127.0.0.1:0", broken)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10).read().decode()
        assert "ckptfs_stats_up 0.0" in text
    finally:
        server.shutdown()
        server.server_close()


# -- deploy files -------------------------------------------------------------------------------

UNIT = ROOT / "deploy" / "systemd" / "ckptfs@.service"


def unit_settings():
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_unit_drains_on_stop():
    s = unit_settings()
    assert any(" mount " in v and "--foreground" in v for v in s["ExecStart"])
    assert any(v.endswith("ckptfs unmount %f") for v in s["ExecStop"])
    assert int(s["TimeoutStopSec"][0]) > cfg.Config().drain_timeout_s
    assert "network-online.target" in s["After"][0]
    assert s["WantedBy"] == ["remote-fs.target"]


def test_systemd_unit_verifies(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    exe = str(ROOT / ".venv" / "bin" / "ckptfs") if (ROOT / ".venv" / "bin" / "ckptfs").exists() else shutil.which("ckptfs")
    text = UNIT.read_text().replace("/usr/local/bin/ckptfs", exe or "/bin/true")
    (tmp_path / "ckptfs@.service").write_text(text)
    instance = tmp_path / "ckptfs@mnt-ckpt.service"
    instance.write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", str(instance)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (proc.stdout + proc.stderr).splitlines() if "ckptfs@" in line]
    assert proc.returncode == 0 and not problems, proc.stdout + proc.stderr


def load_yaml(name):
    yaml = pytest.importorskip("yaml")
    return list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / name).read_text()))


def test_daemonset_yaml():
    ds = next(d for d in load_yaml("daemonset.yaml") if d["kind"] == "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["securityContext"]["privileged"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert volumes[mounts["fuse"]["name"]]["hostPath"]["path"] == "/dev/fuse"
    assert mounts["mnt"]["mountPropagation"] == "Bidirectional"
    assert "hostPath" in volumes["cache"] and "nvme" in volumes["cache"]["hostPath"]["path"]
    pre_stop = " ".join(c["lifecycle"]["preStop"]["exec"]["command"])
    stop_timeout = int(re.search(r"timeout (\d+) ckptfs unmount", pre_stop).group(1))
    grace = spec["terminationGracePeriodSeconds"]
    assert cfg.Config().drain_timeout_s < stop_timeout < grace
    assert "--cache-dir /cache" in " ".join(c["args"]) and "--foreground" in " ".join(c["args"])
    mnt_path = mounts["mnt"]["mountPath"]
    assert f"{mnt_path}/bucket" in " ".join(c["args"]) and f"unmount {mnt_path}/bucket" in pre_stop


def test_training_pod_yaml():
    (pod,) = load_yaml("training-pod.yaml")
    ds = next(d for d in load_yaml("daemonset.yaml") if d["kind"] == "DaemonSet")
    ds_host = next(v for v in ds["spec"]["template"]["spec"]["volumes"] if v["name"] == "mnt")["hostPath"]["path"]
    vol = pod["spec"]["volumes"][0]
    assert vol["hostPath"]["path"] == ds_host
    for c in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
        (m,) = [m for m in c["volumeMounts"] if m["name"] == vol["name"]]
        assert m["mountPropagation"] == "HostToContainer"


def test_iam_policy_is_least_privilege():
    policy = json.loads((ROOT / "deploy" / "iam-policy.json").read_text())
    statements = policy["Statement"]
    actions = lambda st: [st["Action"]] if isinstance(st["Action"], str) else st["Action"]  # noqa: E731
    everything = {a for st in statements for a in actions(st)}
    assert not any("*" in a for a in everything)
    assert everything == {
        "s3:ListBucket", "s3:ListBucketMultipartUploads", "s3:GetObject", "s3:PutObject", "s3:DeleteObject",
        "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts", "s3:GetObjectTagging", "s3:PutObjectTagging",
        "s3:GetLifecycleConfiguration", "s3:PutLifecycleConfiguration"}
    lifecycle_st = [st for st in statements if "s3:PutLifecycleConfiguration" in actions(st)]
    assert len(lifecycle_st) == 1 and set(actions(lifecycle_st[0])) == {
        "s3:GetLifecycleConfiguration", "s3:PutLifecycleConfiguration"}
    list_st = next(st for st in statements if actions(st) == ["s3:ListBucket"])
    assert list_st["Condition"]["StringLike"]["s3:prefix"] == ["PREFIX", "PREFIX/*"]
    obj_st = next(st for st in statements if "s3:PutObject" in actions(st))
    assert obj_st["Resource"] == "arn:aws:s3:::BUCKET/PREFIX/*"


def test_dockerfile():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\s*$", text, re.M)
    assert re.search(r"apt-get install .*\bfuse3\b", text)
    assert 'ENTRYPOINT ["ckptfs"]' in text
    assert "mount.fuse.ckptfs" in text


# -- docs ---------------------------------------------------------------------------------------


def mount_parser():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    return subparsers.choices.get("mount")


def test_configuration_md_documents_every_option():
    doc = (ROOT / "docs" / "CONFIGURATION.md").read_text()
    mount = mount_parser()
    real = {a.dest: a.option_strings for a in mount._actions} if mount else {}
    for section, keys in cfg.SECTIONS.items():
        assert f"## [{section}]" in doc, section
        for key in keys:
            body = doc.split(f"### `{key}`\n", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
            row = next(line for line in body.splitlines() if line.startswith("| ") and "---" not in line
                       and "Default" not in line)
            default, flag, env, toml = [c.strip() for c in row.strip("|").split("|")]
            assert f"`{cfg.env_name(key)}`" in env and toml.startswith(f"`[{section}] {key}`"), key
            documented = set(re.findall(r"--[a-z-]+", flag))
            if mount:
                assert documented == set(real.get(key, [])), (key, documented, real.get(key))


def test_operations_md_runbooks_use_real_commands():
    doc = (ROOT / "docs" / "OPERATIONS.md").read_text()
    for heading in ("Node lost before upload", "Cache disk full", "Endpoint down", "Gateway crash"):
        assert re.search(rf"^#+ .*{heading}", doc, re.M | re.I), heading
    known = {"mount", "unmount", "status", "wait", "verify", "lifecycle", "promote", "config", "checkpoints"}
    code = "\n".join(re.findall(r"```.*?```", doc, re.S) + re.findall(r"`[^`\n]+`", doc))
    used = set(re.findall(r"(?<![\w.-])ckptfs ([a-z-]+)", code))
    assert known - {"config"} <= used <= known, (used - known, known - used)
    assert "ckptfs-keep=false" in doc and "ckptfs-keep=true" in doc


# -- against a real mount (conftest's make_mount: a real daemon on conftest's s3_server) ---------


def _fuse_usable() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


@pytest.mark.skipif(not _fuse_usable(), reason="FUSE is not available")
def test_promote_through_a_real_mount(capsys, make_mount, s3_server, bucket):
    mount = make_mount(prefix="run")
    step = mount.path / "step-1"
    step.mkdir()
    (step / "model.pt").write_bytes(b"m" * 1000)
    (step / "optim.pt").write_bytes(b"o" * 500)
    (mount.path / "notes.txt").write_bytes(b"n")  # durable, not promoted
    (mount.path / "step-2.tmp").write_bytes(b"t")  # held by a temporary name: never durable
    mount.wait("step-1", "notes.txt")
    rc, out, err = run(capsys, "promote", step)
    assert rc == 0, err
    assert "2 object(s)" in out
    s3 = s3_server.boto3_client()
    for name in ("model.pt", "optim.pt"):
        assert keep_of(s3, bucket, f"run/step-1/{name}")["ckptfs-keep"] == "true"
    rc, out, _ = run(capsys, "promote", "--list", mount.path)
    assert out.split("\t")[0] == f"{mount.path}/step-1/"
    rc, _, err = run(capsys, "promote", mount.path / "step-2.tmp")
    assert rc == 4 and "held" in err and "ckptfs wait" in err


@pytest.mark.skipif(not _fuse_usable(), reason="FUSE is not available")
def test_drain_tags_uploads_as_ephemeral(make_mount, s3_server, bucket):
    """Contract with the drain: every uploaded object (PUT and multipart) carries ckptfs-keep=false,
    so the expiry rule of `lifecycle apply` matches exactly the unpromoted objects."""
    mount = make_mount(prefix="run", options=("--drain-delay", "0.2", "--part-size", "5MiB"))
    (mount.path / "small.bin").write_bytes(b"s" * 100)
    (mount.path / "big.bin").write_bytes(os.urandom(11 * 2**20))  # multipart
    mount.wait()
    os.rename(mount.path / "small.bin", mount.path / "renamed.bin")  # a server-side copy keeps tags
    mount.wait()
    s3 = s3_server.boto3_client()
    for key in ("run/renamed.bin", "run/big.bin"):
        assert keep_of(s3, bucket, key).get("ckptfs-keep") == "false", key


@pytest.mark.skipif(not _fuse_usable(), reason="FUSE is not available")
def test_mount_helper_mounts_for_real(tmp_path, s3_server, bucket):
    """`mount.ckptfs SOURCE DIR -o ...` (what mount(8) runs for fuse.ckptfs) gives a working mount."""
    exe = ROOT / ".venv" / "bin" / "mount.ckptfs"
    if not exe.exists():
        pytest.skip("mount.ckptfs console script is not installed")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    options = f"rw,cache_dir={tmp_path / 'cache'},endpoint_url={s3_server.endpoint_url},drain_delay_s=0.1,_netdev,nofail"
    proc = subprocess.run([str(exe), f"s3://{bucket}/fstab", str(mnt), "-o", options], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    try:
        assert proc.returncode == 0, proc.stderr
        assert os.path.ismount(mnt)
        status = json.loads(os.getxattr(mnt, "user.ckptfs.status"))
        assert (status["bucket"], status["prefix"], status["endpoint_url"]) == (bucket, "fstab", s3_server.endpoint_url)
        (mnt / "x.bin").write_bytes(b"hello")
    finally:
        if os.path.ismount(mnt):
            done = subprocess.run([sys.executable, "-m", "gateway.cli", "unmount", str(mnt)], cwd=ROOT,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr
    keys = s3_server.boto3_client().list_objects_v2(Bucket=bucket, Prefix="fstab/").get("Contents", [])
    assert [k["Key"] for k in keys] == ["fstab/x.bin"]  # unmount drained


@pytest.mark.skipif(not _fuse_usable(), reason="FUSE is not available")
def test_metrics_from_a_real_mount(make_mount):
    from tests.support.s3server import free_port

    port = free_port()
    mount = make_mount(prefix="run", options=("--drain-delay", "0.2", "--metrics-addr", f"127.0.0.1:{port}"))
    (mount.path / "a.bin").write_bytes(b"x" * 4096)
    mount.wait()
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    lines = text.splitlines()
    assert "ckptfs_stats_up 1.0" in lines, text
    assert "ckptfs_uploaded_bytes_total 4096.0" in lines
    assert any(line.startswith('ckptfs_fuse_ops_total{op="write"}') for line in lines)
