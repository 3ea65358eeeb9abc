"""`ckptfs config show`: the effective configuration and where each value came from.

Precedence: defaults < TOML file (--config, CKPTFS_CONFIG, /etc/ckptfs/ckptfs.toml) < CKPTFS_*
environment < flags. Credentials are not part of the configuration; for the AWS variables that
botocore reads, only whether they are set is shown, never their values.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from typing import Any

from gateway.config import SECTIONS, config_file_path, resolve_with_sources

log = logging.getLogger(__name__)

SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
PLAIN_ENV = ("AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
             "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN")


def redact_url(url: Any) -> Any:
    """Hide user:password@ in a URL."""
    return re.sub(r"(://)[^/@\s]+@", r"\1***@", url) if isinstance(url, str) else url


def credentials_summary(env: dict[str, str]) -> dict[str, str]:
    """The AWS variables botocore will see: secrets only as 'set (redacted)'."""
    out = {name: "set (redacted)" for name in SECRET_ENV if env.get(name)}
    out.update({name: redact_url(env[name]) for name in PLAIN_ENV if env.get(name)})
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def render_toml(values: dict[str, Any], sources: dict[str, str], config_file: str) -> str:
    """The effective configuration as a TOML file, with the source of each value as a comment."""
    lines = [f"# effective ckptfs configuration (defaults < {config_file} < CKPTFS_* env < flags)"]
    for section, keys in SECTIONS.items():
        lines.append(f"\n[{section}]")
        for key in keys:
            value = values[key]
            line = f"# {key} = (unset)" if value is None else f"{key} = {_toml_value(value)}"
            lines.append(f"{line:<60} # {sources[key]}")
    return "\n".join(lines)


def cmd_show(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    config, sources = resolve_with_sources({}, args.config, env)
    values = config.public()
    values["endpoint_url"] = redact_url(values["endpoint_url"])
    path, _explicit = config_file_path(args.config, env)
    file_note = str(path) if path.exists() else f"{path} (not present)"
    creds = credentials_summary(env)
    if args.json:
        print(json.dumps({"config_file": file_note, "config": values, "sources": sources, "credentials": creds},
                         indent=2, default=list))
        return 0
    print(render_toml(values, sources, file_note))
    print("\n# credentials (botocore chain; values of secrets are never shown)")
    for name, state in creds.items() or [("(none in environment)", "profile, web identity or instance role")]:
        print(f"# {name}: {state}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("config", help="inspect the effective configuration")
    sub = parser.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="print the effective configuration (secrets redacted)")
    show.add_argument("--config", help="TOML file (default: CKPTFS_CONFIG or /etc/ckptfs/ckptfs.toml)")
    show.add_argument("--json", action="store_true", help="print JSON with the source of each value")
    show.set_defaults(func=cmd_show)
