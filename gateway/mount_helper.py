"""`mount.ckptfs`: the helper behind ``mount -t fuse.ckptfs`` and fstab lines.

mount(8) runs ``/sbin/mount.fuse.ckptfs SOURCE MOUNTPOINT [-n] [-s] [-f] [-v] -o OPTIONS`` (install
the console script under that name, and as /sbin/mount.ckptfs for ``-t ckptfs``). The helper turns
the options into ``ckptfs mount SOURCE MOUNTPOINT --flags...`` and execs it; ``ckptfs mount``
daemonizes and returns once the file system is ready. Example fstab line::

    s3://bucket/prefix /mnt/ckpt fuse.ckptfs cache_dir=/var/cache/ckptfs,allow_other,_netdev,nofail 0 0

Options are ckptfs option names (``cache_dir``, ``endpoint_url``, ``drain_timeout_s``...; dashes
allowed), ``config=PATH``, or generic mount options, which are ignored. ``hold_patterns`` takes
``:``-separated globs (commas separate mount options).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from collections.abc import Mapping

from gateway.config import LIST_OPTIONS, Config, env_name

USAGE = "usage: mount.ckptfs s3://BUCKET[/PREFIX] MOUNTPOINT [-nsfv] [-o OPTION[,OPTION...]]"
EXIT_USAGE, EXIT_FAIL = 1, 32  # mount(8) conventions

# Generic options that mount(8), fstab or systemd use and that mean nothing to ckptfs.
GENERIC = {
    "rw", "defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser", "owner", "group",
    "suid", "nosuid", "dev", "nodev", "exec", "noexec", "async", "sync", "atime", "noatime", "relatime",
    "strictatime", "nodiratime", "diratime", "lazytime", "nolazytime", "silent", "loud", "foreground",
}
GENERIC_PREFIXES = ("x-", "comment=", "_netdev", "user=", "helper=")
FROM_SOURCE = {"bucket", "prefix", "mountpoint"}
FIELDS = {name: type(default) for name, default in Config().public().items()}


class HelperError(Exception):
    """Bad invocation or option; printed as one line."""


def mount_flags() -> dict[str, str] | None:
    """{option name: flag} of `ckptfs mount` (e.g. drain_delay_s: --drain-delay), or None if the
    mount command is not available."""
    try:
        module = importlib.import_module("gateway.cmd_mount")
    except ImportError:
        return None
    subparsers = argparse.ArgumentParser().add_subparsers()
    module.register(subparsers)
    flags: dict[str, str] = {}
    for action in subparsers.choices["mount"]._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs and not isinstance(action, argparse._AppendAction):
            flags.setdefault(action.dest, longs[0])
    return flags


def parse_args(argv: list[str]) -> tuple[list[str], list[str], set[str]]:
    """mount's calling convention -> (positionals, options, single-letter switches)."""
    positionals, options, switches = [], [], set[str]()
    args = iter(argv)
    for arg in args:
        if arg == "-o":
            value = next(args, None)
            if value is None:
                raise HelperError("-o needs a value")
            options += [o for o in value.split(",") if o]
        elif arg.startswith("-o"):
            options += [o for o in arg[2:].split(",") if o]
        elif arg == "-t":
            next(args, None)  # file system type, e.g. fuse.ckptfs
        elif arg.startswith("-") and len(arg) > 1 and not arg.startswith("--"):
            switches.update(arg[1:])
        else:
            positionals.append(arg)
    return positionals, options, switches


def translate(
    source: str, mountpoint: str, options: list[str], flags: Mapping[str, str] | None = None, sloppy: bool = False
) -> tuple[list[str], dict[str, str]]:
    """Mount options -> (arguments after ``ckptfs mount``, extra environment).

    An option becomes its flag when `flags` ({option: flag} of the mount command, see
    `mount_flags`) has one, else its CKPTFS_* environment variable (same precedence over the file).
    """
    argv, env = [source, mountpoint], {}
    flags = flags or {}

    for option in options:
        name, eq, value = option.partition("=")
        key = name.replace("-", "_")
        if option in GENERIC or option.startswith(GENERIC_PREFIXES):
            continue
        if option == "ro":
            raise HelperError("ckptfs mounts are read-write; remove 'ro'")
        if key == "config":
            if not value:
                raise HelperError("config= needs a path")
            if "config" in flags:
                argv += [flags["config"], value]
            else:
                env["CKPTFS_CONFIG"] = value
            continue
        if key in FROM_SOURCE:
            raise HelperError(f"{name}: comes from the mount source and target, not from -o")
        if key not in FIELDS:
            if sloppy:
                continue
            raise HelperError(f"unknown option {option!r}")
        if FIELDS[key] is bool:
            enabled = not eq or value.lower() in ("1", "true", "yes", "on")
            if enabled and key in flags:
                argv.append(flags[key])
            else:
                env[env_name(key)] = "true" if enabled else "false"
            continue
        if not eq or not value:
            raise HelperError(f"{name}: needs a value ({name}=...)")
        if key in LIST_OPTIONS:
            env[env_name(key)] = value.replace(":", ",")
        elif key in flags:
            argv += [flags[key], value]
        else:
            env[env_name(key)] = value
    return argv, env


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        positionals, options, switches = parse_args(argv)
        if "h" in switches or len(positionals) != 2:
            raise HelperError(USAGE)
        source, mountpoint = positionals
        if not source.startswith("s3://"):
            raise HelperError(f"source {source!r} must look like s3://BUCKET[/PREFIX]")
        args, env = translate(source, mountpoint, options, mount_flags(), sloppy="s" in switches)
    except HelperError as exc:
        print(f"mount.ckptfs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    command = [sys.executable, "-m", "gateway.cli", "mount", *args]
    if "v" in switches or "f" in switches:
        shown = " ".join(f"{k}={v}" for k, v in env.items())
        print(f"mount.ckptfs: {shown + ' ' if shown else ''}{' '.join(command)}", file=sys.stderr)
    if "f" in switches:  # fake: validate and print only
        return 0
    try:
        os.execve(sys.executable, command, {**os.environ, **env})
    except OSError as exc:
        print(f"mount.ckptfs: cannot run {sys.executable}: {exc.strerror}", file=sys.stderr)
    return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
