"""Small synchronous S3 helpers for the operations commands (lifecycle, promote).

These commands run outside the daemon, so they use plain boto3 with botocore's usual credential
chain. Errors become `CliError` one-liners; credentials are never printed.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from gateway.config import ConfigError, parse_s3_url, resolve
from gateway.errors import CliError
from gateway.keys import KEEP_TAG, PRIVATE_DIR, UPLOAD_TAGGING  # noqa: F401  (defined once, in keys)

log = logging.getLogger(__name__)



def add_endpoint_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint-url", help="S3 endpoint (default: config file, CKPTFS_ENDPOINT_URL, "
                        "AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, AWS)")
    parser.add_argument("--config", help="ckptfs TOML file to read endpoint_url/region from")


def endpoint_from(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(endpoint_url, region): --endpoint-url, else the ckptfs configuration, else botocore's."""
    try:
        config = resolve({}, getattr(args, "config", None))
    except ConfigError as exc:
        raise CliError(f"configuration: {exc}", code=2) from None
    return getattr(args, "endpoint_url", None) or config.endpoint_url, config.region


def split_url(url: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b'); one-line CliError if malformed."""
    try:
        return parse_s3_url(url)
    except ConfigError as exc:
        raise CliError(str(exc), code=2) from None


def client(endpoint_url: str | None, region: str | None = None) -> Any:
    """A boto3 S3 client (path-style addressing for custom endpoints, also those set by
    AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL)."""
    import boto3
    from botocore.config import Config as BotoConfig

    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None

    style = {"addressing_style": "path"} if endpoint_url else {}
    cfg = BotoConfig(s3=style, retries={"mode": "standard", "max_attempts": 5}, connect_timeout=10)
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=cfg)


def error_code(exc: Exception) -> str:
    return getattr(exc, "response", {}).get("Error", {}).get("Code", "")


@contextlib.contextmanager
def s3_errors(what: str) -> Iterator[None]:
    """Turn botocore failures into one-line CliErrors."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        yield
    except NoCredentialsError:
        raise CliError(f"{what}: no AWS credentials found (env, profile or instance role)", code=3) from None
    except ClientError as exc:
        err = exc.response.get("Error", {})
        raise CliError(f"{what}: {err.get('Code', '?')}: {err.get('Message', '')}".rstrip(": "), code=3) from None
    except BotoCoreError as exc:
        raise CliError(f"{what}: {exc}", code=3) from None


def list_objects(s3: Any, bucket: str, prefix: str) -> Iterator[dict]:
    """Every object under `prefix` (ListObjectsV2 pages), gateway-private keys excluded."""
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if PRIVATE_DIR not in obj["Key"].split("/"):
                yield obj
