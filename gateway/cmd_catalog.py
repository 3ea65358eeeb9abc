"""`ckptfs checkpoints TARGET [--json] [--latest-complete]`: the checkpoint catalog (gateway/catalog.py).

TARGET is ``s3://BUCKET[/PREFIX]`` (any machine with credentials) or a path in a ckptfs mount:
bucket, prefix and endpoint come from the mount's status xattr or, when no daemon serves the mount
(stopped, crashed), from the configuration whose `mountpoint` holds the path. A table on a
terminal, plain lines otherwise, one JSON object with --json. Exit 0; with --latest-complete, 1 if
there is none.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from gateway import s3ops
from gateway.config import ConfigError, resolve
from gateway.cmd_status import human_bytes
from gateway.errors import CliError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "checkpoints", help="list the checkpoints under a bucket prefix or mount path, complete or not",
        description="List checkpoints (shim COMMIT, DCP, Orbax, torch files) with completeness, size, age, "
        "storage class and promotion. TARGET is s3://BUCKET[/PREFIX] or a path in a ckptfs mount.")
    p.add_argument("target", metavar="TARGET")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--latest-complete", action="store_true",
                   help="print only the path of the newest complete checkpoint (what a restore uses)")
    s3ops.add_endpoint_args(p)
    p.set_defaults(func=checkpoints_command)


def checkpoints_command(args: argparse.Namespace) -> int:
    from gateway import catalog

    endpoint, region = s3ops.endpoint_from(args)
    result = catalog.build(catalog_target(args.target, args.config, endpoint, region))
    if args.latest_complete:
        latest = result.latest_complete
        if latest is None:
            raise CliError(f"no complete checkpoint under {result.source}", code=1)
        print(json.dumps({"latest_complete": latest.path}) if args.json else latest.path)
        return 0
    if args.json:
        print(json.dumps(result.as_json(), indent=1, sort_keys=True))
    elif sys.stdout.isatty():
        print_table(result)
    else:
        print(plain_text(result))
    return 0


def catalog_target(path: str, config_path: str | None, endpoint: str | None, region: str | None):
    """The Target of an s3:// URL or a mount path (status xattr first, then the configuration)."""
    from gateway.promote import Target, resolve_target

    try:
        return resolve_target(path, endpoint, region)
    except CliError as exc:
        if path.startswith("s3://"):
            raise
        try:
            config = resolve({}, config_path)
        except ConfigError:
            raise exc from None
        root, wanted = os.path.abspath(config.mountpoint or "/nonexistent"), os.path.abspath(path)
        if not config.bucket or os.path.commonpath([root, wanted]) != root:
            raise exc from None
        rel = os.path.relpath(wanted, root)
        prefix = config.prefix.strip("/")
        key = "/".join(p for p in (prefix, "" if rel == "." else rel) if p)
        return Target(config.bucket, key, endpoint or config.endpoint_url, region or config.region,
                      mountpoint=root, prefix=prefix)


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _row(c, base: str | None = None) -> list[str]:
    """A table row; with `base`, the path relative to it (the table's title names it)."""
    shown = c.path
    if base and c.path.startswith(base.rstrip("/") + "/"):
        shown = c.path[len(base.rstrip("/")) + 1:]
    return [shown, "-" if c.step is None else str(c.step), c.framework + (f"/{c.format}" if c.format else ""),
            "yes" if c.complete else "NO", "yes" if c.durable else "no", human_bytes(c.size_bytes), str(c.files),
            age(c.age_s), c.storage_class,
            "yes" if c.promoted else (f"{c.promoted_files}/{c.files}" if c.promoted_files else "no")]


HEADERS = ["checkpoint", "step", "framework", "complete", "durable", "size", "files", "age", "class", "promoted"]


def plain_text(result) -> str:
    if not result.checkpoints:
        return f"no checkpoints under {result.source}"
    rows = [HEADERS] + [_row(c) for c in result.checkpoints]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADERS))]
    lines = []
    for row, c in zip(rows, [None, *result.checkpoints], strict=True):
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        if c is not None:
            lines.extend(f"    missing: {m}" for m in c.missing)
    latest = result.latest_complete
    lines.append(f"latest complete: {latest.path if latest else '(none)'}")
    return "\n".join(lines)


def print_table(result) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    if not result.checkpoints:
        console.print(f"no checkpoints under {result.source}")
        return
    table = Table(title=f"checkpoints under {escape(result.source)}", title_justify="left")
    for h in HEADERS:
        table.add_column(h, justify="right" if h in ("step", "size", "files", "age") else "left",
                         overflow="fold")
    for c in result.checkpoints:
        row = _row(c, result.source)
        style = None if c.complete else "red"
        if c.missing:
            row[0] += "\n" + "\n".join(f"  missing: {m}" for m in c.missing)
        table.add_row(*map(escape, row), style=style)
    console.print(table)
    latest = result.latest_complete
    console.print(f"latest complete: [bold]{escape(latest.path)}[/bold]" if latest else "latest complete: (none)",
                  highlight=False)
