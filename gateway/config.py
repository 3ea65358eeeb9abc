"""Effective configuration of one mount: defaults < TOML file < CKPTFS_* environment < command-line flags.

Every option has one name: the TOML key (in its section of `SECTIONS`) and, upper-cased, the
environment variable ``CKPTFS_<NAME>``; the flags of ``ckptfs mount`` set the same options (see
docs/CONFIGURATION.md). Bad values raise `ConfigError` naming the key and where the value came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
import tomllib
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from gateway.errors import ConfigError  # defined there, so that the CLI need not import this module
from gateway.scopes import DEFAULT_HOLD_PATTERNS, DEFAULT_MARKER_PATTERNS, DEFAULT_POINTER_PATTERNS

DEFAULT_CONFIG_PATH = Path("/etc/ckptfs/ckptfs.toml")
ENV_PREFIX = "CKPTFS_"
log = logging.getLogger(__name__)

# Temporary names are held back from the bucket until renamed (docs/SEMANTICS.md, "Temporary names");
# markers and pointers order publication (docs/SEMANTICS.md, "Commit scopes").
LIST_OPTIONS = ("hold_patterns", "marker_patterns", "pointer_patterns")


@dataclasses.dataclass(frozen=True)
class Config:
    """All options of a mount. Units are in the names: _s seconds, _bytes bytes."""

    # bucket
    bucket: str = ""
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    # file system
    mountpoint: str = ""
    cache_dir: str = ""
    allow_other: bool = False
    foreground: bool = False
    # drain
    drain_delay_s: float = 0.1
    drain_timeout_s: float = 600.0
    no_drain: bool = False
    part_size_bytes: int = 16 * 1024 * 1024
    upload_concurrency: int = 8
    put_concurrency: int = 32
    hold_patterns: tuple[str, ...] = DEFAULT_HOLD_PATTERNS
    hold_limit_s: float = 3600.0
    marker_patterns: tuple[str, ...] = DEFAULT_MARKER_PATTERNS
    pointer_patterns: tuple[str, ...] = DEFAULT_POINTER_PATTERNS
    # cache
    cache_size: str = "90%"
    cache_high_watermark: float = 0.90
    cache_low_watermark: float = 0.75
    metadata_ttl_s: float = 60.0
    backpressure_timeout_s: float = 300.0
    # several nodes on one prefix (docs/CLUSTER.md)
    cluster: bool = False
    node_id: str | None = None
    lease_interval_s: float = 5.0
    cluster_poll_s: float = 0.5
    remote_lookup_timeout_s: float = 1.0
    # observability
    metrics_addr: str | None = None
    log_level: str = "INFO"
    log_file: str | None = None

    def public(self) -> dict[str, Any]:
        """The options as a plain dict, safe to print (no credentials are ever part of Config)."""
        return dataclasses.asdict(self)


SECTIONS = {
    "bucket": ("bucket", "prefix", "endpoint_url", "region"),
    "filesystem": ("mountpoint", "cache_dir", "allow_other", "foreground"),
    "drain": (
        "drain_delay_s",
        "drain_timeout_s",
        "no_drain",
        "part_size_bytes",
        "upload_concurrency",
        "put_concurrency",
        "hold_patterns",
        "hold_limit_s",
        "marker_patterns",
        "pointer_patterns",
    ),
    "cache": ("cache_size", "cache_high_watermark", "cache_low_watermark", "metadata_ttl_s",
              "backpressure_timeout_s"),
    "cluster": ("cluster", "node_id", "lease_interval_s", "cluster_poll_s", "remote_lookup_timeout_s"),
    "observability": ("metrics_addr", "log_level", "log_file"),
}

_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}


def parse_size(text: str | int, key: str = "size") -> int:
    """Parse '64MiB', '1G', '4096' into bytes (KiB/MiB... are powers of 1024, K/M/G... of 1000)."""
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ConfigError(f"{key}: cannot parse size {text!r} (examples: 4096, 64MiB, 1G)")
    number, unit = match.groups()
    unit = (unit or "").upper()
    if "I" in unit:
        factor = 1024 ** ("KMGT".index(unit[0]) + 1)
    else:
        factor = _UNITS[unit.rstrip("B") if unit != "B" else "B"]
    return int(float(number) * factor)


def parse_s3_url(url: str) -> tuple[str, str]:
    """Split 's3://bucket/some/prefix' into ('bucket', 'some/prefix')."""
    if not url.startswith("s3://"):
        raise ConfigError(f"bucket URL {url!r} must look like s3://BUCKET[/PREFIX]")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket):
        raise ConfigError(f"bucket URL {url!r}: {bucket!r} is not a valid bucket name")
    prefix = prefix.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise ConfigError(f"bucket URL {url!r}: prefix must not contain empty, '.' or '..' components")
    return bucket, prefix


def env_name(key: str) -> str:
    """The environment variable of option `key`, e.g. CKPTFS_CACHE_DIR."""
    return ENV_PREFIX + key.upper()


def _kind(key: str) -> str:
    default = _FIELDS[key].default
    if key in LIST_OPTIONS:
        return "list"
    for kind in (bool, int, float):
        if isinstance(default, kind):
            return kind.__name__
    return "str"


def _coerce(key: str, value: Any, source: str = "") -> Any:
    """Convert a raw TOML/env/flag value to the field's type, or raise ConfigError naming the key."""
    kind = _kind(key)
    where = f" (from {source})" if source else ""

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{key}{where}: invalid value {value!r}, expected {expected}")

    if key == "part_size_bytes":
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise bad("a size such as 16MiB")
        try:
            return parse_size(value, key)
        except ConfigError:
            raise bad("a size such as 16MiB") from None
    if kind == "list":
        if isinstance(value, str):
            value = [p.strip() for p in value.split(",") if p.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
            raise bad("a list of glob patterns")
        return tuple(value)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        lowered = str(value).strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise bad("true or false")
    if kind in ("int", "float"):
        if isinstance(value, (bool, list, dict)):
            raise bad("an integer" if kind == "int" else "a number")
        try:
            number = int(value) if kind == "int" else float(value)
        except (TypeError, ValueError):
            raise bad("an integer" if kind == "int" else "a number") from None
        if kind == "float" and not math.isfinite(number):
            raise bad("a finite number")
        return number
    if value is None:
        return None
    if isinstance(value, (bool, list, dict, tuple)):
        raise bad("a string")
    return str(value)


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from exc
    values: dict[str, Any] = {}
    for section, body in data.items():
        if section in _FIELDS and not isinstance(body, dict):
            home = next(s for s, keys in SECTIONS.items() if section in keys)
            raise ConfigError(f"{path}: key {section} must be inside section [{home}]")
        if section not in SECTIONS or not isinstance(body, dict):
            raise ConfigError(f"{path}: unknown section [{section}] (known: {', '.join(SECTIONS)})")
        for key, value in body.items():
            if key not in SECTIONS[section]:
                homes = [s for s, keys in SECTIONS.items() if key in keys]
                hint = f" (it belongs in [{homes[0]}])" if homes else _did_you_mean(key)
                raise ConfigError(f"{path}: unknown key {section}.{key}{hint}")
            values[key] = value
    return values


def _did_you_mean(name: str, spell=lambda key: key) -> str:
    close = difflib.get_close_matches(name, list(_FIELDS), n=1, cutoff=0.75)
    return f" (did you mean {spell(close[0])}?)" if close else ""


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    values = {}
    for key in _FIELDS:
        if env_name(key) in env:
            values[key] = env[env_name(key)]
    for name in env:
        if name.startswith(ENV_PREFIX) and name != "CKPTFS_CONFIG":
            key = name[len(ENV_PREFIX):].lower()
            if key not in _FIELDS and (hint := _did_you_mean(key, env_name)):
                log.warning("ignoring unknown environment variable %s%s", name, hint)
    return values


def config_file_path(config_path: str | Path | None, env: Mapping[str, str]) -> tuple[Path, bool]:
    """The config file to read and whether it was named explicitly (then it must exist)."""
    explicit = config_path or env.get("CKPTFS_CONFIG")
    return (Path(explicit) if explicit else DEFAULT_CONFIG_PATH), bool(explicit)


def resolve_with_sources(
    flags: Mapping[str, Any],
    config_path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[Config, dict[str, str]]:
    """Like `resolve`, also returning where each option came from ('default', 'file PATH',
    'env CKPTFS_X' or 'flag')."""
    env = os.environ if env is None else env
    path, explicit = config_file_path(config_path, env)
    values: dict[str, Any] = {}
    sources = {key: "default" for key in _FIELDS}
    if path.exists():
        for key, value in _from_toml(path).items():
            values[key], sources[key] = value, f"file {path}"
    elif explicit:
        raise ConfigError(f"config file {path} does not exist")
    for key, value in _from_env(env).items():
        values[key], sources[key] = value, f"env {env_name(key)}"
    for key, value in flags.items():
        if value is None:
            continue
        if key not in _FIELDS:
            raise ConfigError(f"unknown option {key}{_did_you_mean(key)}")
        values[key], sources[key] = value, "flag"
    config = Config(**{k: _coerce(k, v, sources[k]) for k, v in values.items()})
    _validate(config)
    return config, sources


def resolve(
    flags: Mapping[str, Any],
    config_path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Build the effective Config. `flags` holds only the options given on the command line."""
    return resolve_with_sources(flags, config_path, env)[0]


def parse_addr(text: str, key: str = "metrics_addr") -> tuple[str, int]:
    """Split 'HOST:PORT' (or [::1]:PORT; ":PORT" = all interfaces, port 0 = any free port) into (host, port)."""
    host, sep, port = str(text).rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{key}: {text!r} is not HOST:PORT (example: 127.0.0.1:9464)")
    return host or "0.0.0.0", int(port)


def _validate(config: Config) -> None:
    for key in ("drain_delay_s", "drain_timeout_s", "hold_limit_s", "metadata_ttl_s", "backpressure_timeout_s"):
        if getattr(config, key) < 0:
            raise ConfigError(f"{key}: must be >= 0")
    if config.part_size_bytes < 5 * 1024 * 1024:
        raise ConfigError("part_size_bytes: S3 requires parts of at least 5 MiB")
    if config.part_size_bytes > 5 * 1024**3:
        raise ConfigError("part_size_bytes: S3 allows parts of at most 5 GiB")
    if not 1 <= config.upload_concurrency <= 256:
        raise ConfigError("upload_concurrency: must be between 1 and 256")
    if not 1 <= config.put_concurrency <= 1024:
        raise ConfigError("put_concurrency: must be between 1 and 1024")
    if not 0 < config.cache_low_watermark < config.cache_high_watermark <= 1:
        raise ConfigError("cache_low_watermark/cache_high_watermark: need 0 < low < high <= 1")
    if config.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"log_level: {config.log_level!r} is not DEBUG, INFO, WARNING or ERROR")
    if config.endpoint_url and not re.match(r"^https?://[^/\s]+", config.endpoint_url):
        raise ConfigError(f"endpoint_url: {config.endpoint_url!r} must start with http:// or https://")
    if config.bucket:
        parse_s3_url(f"s3://{config.bucket}/{config.prefix}")
    if config.metrics_addr:
        parse_addr(config.metrics_addr)
    if config.node_id is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", config.node_id):
        raise ConfigError(f"node_id: {config.node_id!r} must be 1-63 letters, digits, '.', '_' or '-'")
    for key in ("lease_interval_s", "cluster_poll_s", "remote_lookup_timeout_s"):
        if not getattr(config, key) > 0:
            raise ConfigError(f"{key}: must be > 0")
    cache_size_bytes(config, disk_bytes=1)  # parses or raises


def cache_size_bytes(config: Config, disk_bytes: int) -> int:
    """The cache size in bytes: an absolute size, or a percentage of the cache disk."""
    text = str(config.cache_size).strip()
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError as exc:
            raise ConfigError(f"cache_size: invalid percentage {text!r}") from exc
        if not 0 < percent <= 100:
            raise ConfigError("cache_size: percentage must be in (0, 100]")
        return int(disk_bytes * percent / 100)
    return parse_size(text, "cache_size")
