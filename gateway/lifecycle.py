"""`ckptfs lifecycle show|apply`: bucket lifecycle rules scoped to one ckptfs prefix.

`apply` writes (at most) two rules with IDs derived from the prefix and leaves every other rule
of the bucket untouched:

* ``ckptfs:<prefix>/:ephemeral`` - filter: prefix AND tag ``ckptfs-keep=false`` (set by the drain
  on every upload); transition and expiry. Promoted objects carry ``ckptfs-keep=true`` instead, so
  they never match. S3 filters cannot negate a tag, hence the positive "false" tag.
* ``ckptfs:<prefix>/:multipart`` - filter: prefix only; aborts incomplete multipart uploads
  (S3 refuses AbortIncompleteMultipartUpload in a rule that filters on tags).

`apply` is declarative: the options given describe the whole desired state for the prefix.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from typing import Any

from gateway import s3ops
from gateway.errors import CliError

log = logging.getLogger(__name__)

STORAGE_CLASSES = ("STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER_IR", "GLACIER", "DEEP_ARCHIVE")


def rule_ids(prefix: str) -> tuple[str, str]:
    """The (ephemeral, multipart) rule IDs for `prefix` (IDs are limited to 255 characters)."""
    if len(prefix) <= 200:
        base = f"ckptfs:{prefix}/"
    else:
        base = "ckptfs:sha256-" + hashlib.sha256(prefix.encode()).hexdigest()[:24]
    return f"{base}:ephemeral", f"{base}:multipart"


def ckptfs_rules(
    prefix: str,
    *,
    transition_after: int | None = None,
    storage_class: str | None = None,
    expire_after: int | None = None,
    abort_multipart_after: int | None = None,
) -> list[dict[str, Any]]:
    """The rules `apply` wants for `prefix` (an empty list removes ckptfs's rules)."""
    key_prefix = f"{prefix}/" if prefix else ""
    tag = {"Key": s3ops.KEEP_TAG, "Value": "false"}
    ephemeral_id, multipart_id = rule_ids(prefix)
    rules = []
    if transition_after is not None or expire_after is not None:
        rule: dict[str, Any] = {
            "ID": ephemeral_id,
            "Status": "Enabled",
            "Filter": {"And": {"Prefix": key_prefix, "Tags": [tag]}} if key_prefix else {"Tag": tag},
        }
        if transition_after is not None:
            rule["Transitions"] = [{"Days": transition_after, "StorageClass": storage_class}]
        if expire_after is not None:
            rule["Expiration"] = {"Days": expire_after}
        rules.append(rule)
    if abort_multipart_after is not None:
        rules.append({
            "ID": multipart_id,
            "Status": "Enabled",
            "Filter": {"Prefix": key_prefix},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": abort_multipart_after},
        })
    return rules


def merge(existing: list[dict[str, Any]], prefix: str, wanted: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`existing` with ckptfs's rules for `prefix` replaced in place by `wanted` (others kept)."""
    ours = set(rule_ids(prefix))
    by_id = {rule["ID"]: rule for rule in wanted}
    merged = []
    for rule in existing:
        if rule.get("ID") in ours:
            if rule["ID"] in by_id:
                merged.append(by_id.pop(rule["ID"]))
        else:
            merged.append(rule)
    return merged + [rule for rule in wanted if rule["ID"] in by_id]


def get_rules(s3: Any, bucket: str) -> list[dict[str, Any]]:
    """The bucket's lifecycle rules ([] when it has none)."""
    from botocore.exceptions import ClientError

    try:
        return s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    except ClientError as exc:
        if s3ops.error_code(exc) == "NoSuchLifecycleConfiguration":
            return []
        raise


def _rule_prefix(rule: dict[str, Any]) -> str:
    flt = rule.get("Filter", {})
    return rule.get("Prefix", flt.get("Prefix", flt.get("And", {}).get("Prefix", "")))


def describe(rule: dict[str, Any]) -> str:
    """One line: scope and actions of a rule."""
    flt = rule.get("Filter", {})
    tags = flt.get("And", {}).get("Tags", []) + ([flt["Tag"]] if "Tag" in flt else [])
    scope = f"prefix {_rule_prefix(rule)!r}" + "".join(f" + tag {t['Key']}={t['Value']}" for t in tags)
    actions = [f"to {t.get('StorageClass')} after {t.get('Days', t.get('Date'))}d"
               for t in rule.get("Transitions", [])]
    if "Expiration" in rule:
        exp = rule["Expiration"]
        actions.append(f"expire after {exp['Days']}d" if "Days" in exp else f"expire {exp}")
    if "AbortIncompleteMultipartUpload" in rule:
        actions.append(f"abort multipart after {rule['AbortIncompleteMultipartUpload']['DaysAfterInitiation']}d")
    known = {"ID", "Status", "Filter", "Prefix", "Transitions", "Expiration", "AbortIncompleteMultipartUpload"}
    actions += sorted(set(rule) - known)
    return f"{rule.get('ID', '(no id)')} [{rule.get('Status')}] {scope}: {', '.join(actions) or 'no actions'}"


def _canon(rules: list[dict[str, Any]]) -> str:
    return json.dumps(rules, sort_keys=True, default=str)


def cmd_show(args: argparse.Namespace) -> int:
    bucket, prefix = s3ops.split_url(args.url)
    endpoint, region = s3ops.endpoint_from(args)
    with s3ops.s3_errors(f"reading lifecycle of s3://{bucket}"):
        rules = get_rules(s3ops.client(endpoint, region), bucket)
    if args.json:
        print(json.dumps({"Rules": rules}, indent=2, default=str))
        return 0
    if not rules:
        print(f"s3://{bucket}: no lifecycle rules")
        return 0
    ours = set(rule_ids(prefix))
    key_prefix = f"{prefix}/" if prefix else ""
    print(f"s3://{bucket}: {len(rules)} lifecycle rule(s); * = written by ckptfs for "
          f"{key_prefix or '(whole bucket)'}, ! = another rule that also covers it")
    for rule in rules:
        other = _rule_prefix(rule)
        overlaps = key_prefix.startswith(other) or other.startswith(key_prefix)
        mark = "*" if rule.get("ID") in ours else "!" if overlaps else " "
        print(f"{mark} {describe(rule)}")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    bucket, prefix = s3ops.split_url(args.url)
    for name in ("transition_after", "expire_after", "abort_multipart_after"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CliError(f"--{name.replace('_', '-')}: must be at least 1 day", code=2)
    if (args.transition_after is None) != (args.storage_class is None):
        raise CliError("--transition-after and --storage-class go together", code=2)
    if None not in (args.transition_after, args.expire_after) and args.expire_after <= args.transition_after:
        raise CliError("--expire-after must be greater than --transition-after", code=2)
    if args.transition_after is None and args.expire_after is None and args.abort_multipart_after is None:
        raise CliError("nothing to apply: give --transition-after/--storage-class, --expire-after "
                       "and/or --abort-multipart-after", code=2)
    wanted = ckptfs_rules(
        prefix,
        transition_after=args.transition_after,
        storage_class=args.storage_class,
        expire_after=args.expire_after,
        abort_multipart_after=args.abort_multipart_after,
    )
    endpoint, region = s3ops.endpoint_from(args)
    s3 = s3ops.client(endpoint, region)
    with s3ops.s3_errors(f"reading lifecycle of s3://{bucket}"):
        existing = get_rules(s3, bucket)
    rules = merge(existing, prefix, wanted)
    if args.dry_run:
        print(json.dumps({"Rules": rules}, indent=2, default=str))
        return 0
    if _canon(rules) == _canon(existing):
        print(f"s3://{bucket}: lifecycle already up to date ({len(rules)} rule(s))")
        return 0
    with s3ops.s3_errors(f"writing lifecycle of s3://{bucket}"):
        s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": rules})
    print(f"s3://{bucket}: wrote {len(wanted)} ckptfs rule(s) for {prefix or '(whole bucket)'}; "
          f"bucket has {len(rules)} rule(s)")
    for rule in wanted:
        print(f"* {describe(rule)}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("lifecycle", help="show or apply the bucket's lifecycle rules for a ckptfs prefix")
    sub = parser.add_subparsers(dest="lifecycle_command", metavar="ACTION", required=True)

    show = sub.add_parser("show", help="print the bucket's lifecycle rules")
    show.add_argument("url", metavar="s3://BUCKET[/PREFIX]")
    show.add_argument("--json", action="store_true", help="print the raw configuration as JSON")
    s3ops.add_endpoint_args(show)
    show.set_defaults(func=cmd_show)

    apply = sub.add_parser(
        "apply",
        help="write ckptfs's rules for PREFIX, keeping the bucket's other rules",
        description="Expire/transition unpromoted checkpoint objects and abort stale multipart uploads "
        "under PREFIX. The options describe the whole desired state: an omitted action is removed.",
    )
    apply.add_argument("url", metavar="s3://BUCKET[/PREFIX]")
    days = dict(type=int, metavar="DAYS")
    apply.add_argument("--transition-after", **days, help="move unpromoted objects to --storage-class after DAYS")
    apply.add_argument("--storage-class", metavar="CLASS", help="target of the transition: on AWS one of "
                       + ", ".join(STORAGE_CLASSES) + "; other stores have their own names (MinIO: a tier name)")
    apply.add_argument("--expire-after", **days, help="delete unpromoted objects after DAYS")
    apply.add_argument("--abort-multipart-after", **days, help="abort incomplete multipart uploads after DAYS")
    apply.add_argument("--dry-run", action="store_true", help="print the resulting configuration, write nothing")
    s3ops.add_endpoint_args(apply)
    apply.set_defaults(func=cmd_apply)
