"""The `ckptfs` command: mount, unmount, status, wait, verify, checkpoints, and the operations commands.

Every failure a user can cause prints one line on stderr and exits non-zero; tracebacks are for bugs.
Subcommands from other modules register themselves through `register(subparsers)`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from gateway.config import ConfigError
from gateway.errors import CliError

# Modules that add subcommands with a `register(subparsers)` function.
COMMAND_MODULES = (
    "gateway.cmd_mount",
    "gateway.cmd_status",
    "gateway.lifecycle",
    "gateway.promote",
    "gateway.cmd_config",
    "gateway.cmd_catalog",
)


def version() -> str:
    """The installed distribution's version (pyproject.toml's)."""
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("ckptfs")
    except PackageNotFoundError:
        return "0+unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckptfs",
        description="Write-back checkpoint gateway: a FUSE filesystem on local NVMe that drains to S3.",
    )
    parser.add_argument("--version", action="version", version=f"ckptfs {version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # optional command module not present in this build
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="ckptfs: %(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except (CliError, ConfigError) as exc:
        print(f"ckptfs {args.command}: {exc}", file=sys.stderr)
        return getattr(exc, "code", 2)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `ckptfs status | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
