"""The `ckptfs` command: mount, unmount, status, wait, verify, checkpoints, and the operations commands.

Every failure a user can cause prints one line on stderr and exits non-zero; tracebacks are for bugs.
Subcommands from other modules register themselves through `register(subparsers)`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from gateway.errors import CliError, ConfigError

# Modules that add subcommands with a `register(subparsers)` function, and the commands each adds.
# A command line naming one of these commands imports only its module: `ckptfs wait` starts in
# half the time when the mount, config and catalog modules are not imported for it.
COMMAND_MODULES = {
    "gateway.cmd_mount": ("mount", "unmount"),
    "gateway.cmd_status": ("status", "wait", "verify"),
    "gateway.lifecycle": ("lifecycle",),
    "gateway.promote": ("promote",),
    "gateway.cmd_config": ("config",),
    "gateway.cmd_catalog": ("checkpoints",),
}


def version() -> str:
    """The installed distribution's version (pyproject.toml's)."""
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("ckptfs")
    except PackageNotFoundError:
        return "0+unknown (not installed)"


class _VersionAction(argparse.Action):
    """`--version`, looked up only when asked for (importlib.metadata costs 25 ms at start)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"ckptfs {version()}")
        parser.exit()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or (given a known command) one with that command's module only."""
    parser = argparse.ArgumentParser(
        prog="ckptfs",
        description="Write-back checkpoint gateway: a FUSE filesystem on local NVMe that drains to S3.",
    )
    parser.add_argument("--version", action=_VersionAction, help="show the version and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = [m for m, commands in COMMAND_MODULES.items() if command in commands] or list(COMMAND_MODULES)
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # optional command module not present in this build
        module.register(subparsers)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named on the command line, if it is the first argument."""
    return argv[0] if argv and not argv[0].startswith("-") else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_command_of(argv))
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
