"""Object-store client: aiobotocore on trio through its httpx backend.

The store knows keys and bytes, nothing about inodes. Every failure is a `StoreError` marked
transient (retry can help) or permanent; the drain owns the one retry layer, so botocore's own
retries are off. Keys passed in are relative to the mount's prefix.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import AsyncIterator
from typing import Any

import botocore.auth
import botocore.exceptions
import h11
import httpcore._async.http11
import httpx
from aiobotocore.config import AioConfig
from aiobotocore.httpxsession import HttpxSession
from aiobotocore.session import get_session

from gateway.digest import crc32_b64
from gateway.errors import NoSuchKey, StoreError
from gateway.keys import PRIVATE_DIR, UPLOAD_TAGGING

log = logging.getLogger(__name__)

TRANSIENT_CODES = {
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed",
    "Throttling", "ThrottlingException", "OperationAborted", "BadDigest", "IncompleteBody",
    "XAmzContentSHA256Mismatch", "ConditionalRequestConflict",
}
MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
METADATA_DIGEST = "ckptfs-xxh3"
METADATA_SIZE = "ckptfs-size"
METADATA_MTIME = "ckptfs-mtime-ns"
METADATA_MODE = "ckptfs-mode"
METADATA_TYPE = "ckptfs-type"


def _tagging(key: str) -> dict[str, str]:
    """Checkpoint objects are uploaded tagged ckptfs-keep=false; keys under .ckptfs/ are not."""
    return {} if key.split("/", 1)[0] == PRIVATE_DIR else {"Tagging": UPLOAD_TAGGING}


def _over_tls(url: str) -> bool:
    return url.lower().startswith("https://")


class _PrecomputedPayloadS3Auth(botocore.auth.S3SigV4Auth):
    """SigV4 for S3 that takes the payload SHA-256 from a `Body` that carries one, and signs no
    payload over https.

    Over plain http botocore always hashes the payload while signing, on the event loop (~9 ms per
    16 MiB part); the drain computes it in a worker thread with the part's other checksums.
    """

    def _should_sha256_sign_payload(self, request):
        # Over https our bodies go unsigned (TLS carries them, and data bodies carry a CRC32 the
        # server verifies); botocore would otherwise hash each part on the event loop.
        if isinstance(request.body, Body) and _over_tls(request.url):
            return False
        return super()._should_sha256_sign_payload(request)

    def payload(self, request):
        body = request.body
        if isinstance(body, Body) and body.sha256 and self._should_sha256_sign_payload(request):
            return body.sha256
        return super().payload(request)


# Process-wide, but only different for bodies that carry their own hash.
botocore.auth.AUTH_TYPE_MAPS["s3v4"] = _PrecomputedPayloadS3Auth


def _send_body_chunks_without_copying() -> None:
    """httpcore sends each body chunk through `h11.Connection.send`, which joins the pieces of an
    event into new `bytes`: every byte of every part was copied once more on the event loop
    (~9 % of its time in a DCP-shaped drain). `send_with_data_passthrough` hands back the chunk
    itself (a memoryview of the part buffer), so it goes to the socket as it is. Process-wide; only
    `h11.Data` events change. Skipped if httpcore's internals are not the ones this was written for."""
    connection = httpcore._async.http11.AsyncHTTP11Connection
    original = getattr(connection, "_send_event", None)
    if original is None or getattr(original, "passes_data_through", False):
        return

    async def _send_event(self, event: h11.Event, timeout: float | None = None) -> None:
        if type(event) is not h11.Data:
            return await original(self, event, timeout=timeout)
        for piece in self._h11_state.send_with_data_passthrough(event) or ():
            await self._network_stream.write(piece, timeout=timeout)

    _send_event.passes_data_through = True  # type: ignore[attr-defined]
    connection._send_event = _send_event  # type: ignore[method-assign]


_send_body_chunks_without_copying()


class Body(io.BytesIO):
    """A request body over any bytes-like object, streamed in 1 MiB slices without copying.

    aiobotocore's httpx session iterates a BytesIO body, and plain BytesIO iterates by *lines*:
    random binary data became thousands of tiny writes with an event-loop yield each (16 MiB PUT:
    2.1 s instead of 0.05 s against moto). Iterating in large chunks removes that; the chunks are
    memoryview slices of `data` (bytes, bytearray or a memoryview of a reused part buffer), so a
    part is not copied again on its way to the socket. A BytesIO only for aiobotocore's type check:
    the position and the content live here, `data` is never copied into the BytesIO.
    """

    CHUNK = 1 << 20

    def __init__(self, data, sha256: str | None = None):
        super().__init__()
        self._view = memoryview(data).cast("B")
        self._pos = 0
        self.sha256 = sha256

    def __len__(self) -> int:
        return len(self._view)

    def __bool__(self) -> bool:
        return True  # a body, even an empty one (botocore tests `if body`)

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        data = self._view[self._pos:end].tobytes()
        self._pos = max(self._pos, end)
        return data

    def getvalue(self) -> bytes:
        return self._view.tobytes()

    def __iter__(self):
        while self._pos < len(self._view):
            chunk = self._view[self._pos:self._pos + self.CHUNK]
            self._pos += len(chunk)
            yield chunk


def classify(exc: BaseException, what: str) -> StoreError:
    """Map a botocore/httpx exception to a StoreError that says whether to retry."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        message = f"{what}: {code or status} {error.get('Message', '')}".strip()
        if code in MISSING_CODES:
            return StoreError(message, transient=False, code="NoSuchKey")
        transient = code in TRANSIENT_CODES or status >= 500 or status == 429
        return StoreError(message, transient=transient, code=code or str(status))
    if isinstance(exc, (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError)):
        return StoreError(f"{what}: no usable credentials ({type(exc).__name__})", transient=False,
                          code="NoCredentials")
    if isinstance(exc, (botocore.exceptions.BotoCoreError, httpx.HTTPError, OSError)):
        return StoreError(f"{what}: {type(exc).__name__}: {exc}", transient=True, code="Connection")
    return StoreError(f"{what}: {type(exc).__name__}: {exc}", transient=True, code="Unknown")


class Store:
    """One S3 client for one bucket/prefix. Use `async with Store(...) as store:`."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str | None = None, max_connections: int = 16,
                 connect_timeout_s: float = 5.0, read_timeout_s: float = 60.0):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        self._config = AioConfig(
            http_session_cls=HttpxSession,
            max_pool_connections=max_connections,
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            # aiobotocore's httpx session gives up on a send that waits 5 s for the socket, or on
            # a request that waits 5 s for a pooled connection, and reports either as a connect
            # timeout. A server busy for 5 s (moto completing a 1 GiB upload holds its GIL 5-25 s)
            # then failed every part in flight, after most of its bytes were sent; waiting is
            # bounded by the read timeout instead, and the drain's limiters keep the pool large
            # enough for every request it starts.
            connector_args={"write_timeout": read_timeout_s, "pool_timeout": read_timeout_s},
            retries={"total_max_attempts": 1},  # one retry layer: the drain's
            request_checksum_calculation="when_required",
        )
        self._stack = contextlib.AsyncExitStack()
        self.client: Any = None  # the aiobotocore S3 client (no stubs), from __aenter__ on

    async def __aenter__(self) -> Store:
        session = get_session()
        self.client = await self._stack.enter_async_context(
            session.create_client("s3", endpoint_url=self.endpoint_url, region_name=self.region or "us-east-1",
                                  config=self._config)
        )
        return self

    async def __aexit__(self, *exc) -> None:
        await self._stack.aclose()

    @property
    def signs_payload(self) -> bool:
        """Whether requests carry the payload's SHA-256 in their signature: only over plain http.
        Over https S3 takes UNSIGNED-PAYLOAD, and the CRC32 checksum the server verifies guards
        the bytes, so the drain does not spend 0.7 s of CPU per GiB hashing them a second time."""
        return not _over_tls(self.endpoint_url or "https://")  # no endpoint: AWS's, over https

    def full_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def relative_key(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1:] if self.prefix else full_key

    async def _call(self, what: str, method: str, **kwargs):
        try:
            return await getattr(self.client, method)(Bucket=self.bucket, **kwargs)
        except Exception as exc:  # classified for the caller's retry decision
            error = classify(exc, what)
            if error.code == "NoSuchKey":
                raise NoSuchKey(kwargs.get("Key", "")) from exc
            raise error from exc

    async def check_bucket(self) -> None:
        """Raise a StoreError with a one-line reason if the bucket cannot be used."""
        try:
            await self._call(f"bucket {self.bucket}", "head_bucket")
        except NoSuchKey:
            raise StoreError(f"bucket {self.bucket} does not exist", transient=False, code="NoSuchBucket") from None

    async def put_object(self, key: str, body: bytes | bytearray | memoryview, metadata: dict[str, str],
                         crc32: str | None = None, sha256: str | None = None) -> str:
        """PUT with a CRC32 checksum the server verifies (computed here unless given)."""
        resp = await self._call(f"PUT {key}", "put_object", Key=self.full_key(key), Body=Body(body, sha256),
                                Metadata=metadata, ChecksumCRC32=crc32 or crc32_b64(body), **_tagging(key))
        return resp["ETag"]

    async def put_record(self, key: str, body: bytes, *, if_none_match: bool = False,
                         if_match: str | None = None) -> str:
        """PUT a small private record, optionally conditional: `if_none_match` creates it only if the
        key is absent, `if_match` replaces it only if its ETag is still that one. A failed condition
        raises StoreError with code "PreconditionFailed" (or "NoSuchKey" for If-Match of a missing key)."""
        conditions = {}
        if if_none_match:
            conditions["IfNoneMatch"] = "*"
        if if_match is not None:
            conditions["IfMatch"] = if_match
        resp = await self._call(f"PUT {key}", "put_object", Key=self.full_key(key), Body=Body(body),
                                ContentType="application/json", **conditions)
        return resp["ETag"]

    async def get_record(self, key: str) -> tuple[bytes, str]:
        """A small private record's body and ETag (NoSuchKey if absent)."""
        resp = await self._call(f"GET {key}", "get_object", Key=self.full_key(key))
        try:
            async with resp["Body"] as body:
                return await body.read(), resp["ETag"]
        except Exception as exc:
            raise classify(exc, f"GET {key}") from exc

    async def create_multipart(self, key: str, metadata: dict[str, str]) -> str:
        resp = await self._call(f"create multipart {key}", "create_multipart_upload", Key=self.full_key(key),
                                Metadata=metadata, ChecksumAlgorithm="CRC32", **_tagging(key))
        return resp["UploadId"]

    async def upload_part(self, key: str, upload_id: str, number: int, body: bytes | bytearray | memoryview,
                          crc32: str | None = None, sha256: str | None = None) -> dict:
        crc32 = crc32 or crc32_b64(body)
        resp = await self._call(f"part {number} of {key}", "upload_part", Key=self.full_key(key),
                                UploadId=upload_id, PartNumber=number, Body=Body(body, sha256), ChecksumCRC32=crc32)
        return {"PartNumber": number, "ETag": resp["ETag"], "ChecksumCRC32": resp.get("ChecksumCRC32") or crc32}

    async def complete_multipart(self, key: str, upload_id: str, parts: list[dict]) -> str:
        resp = await self._call(f"complete {key}", "complete_multipart_upload", Key=self.full_key(key),
                                UploadId=upload_id, MultipartUpload={"Parts": parts})
        return resp["ETag"]

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            await self._call(f"abort {key}", "abort_multipart_upload", Key=self.full_key(key), UploadId=upload_id)
        except StoreError as exc:
            if exc.code not in ("NoSuchUpload", "NoSuchKey"):
                raise

    async def list_multipart_uploads(self, key: str) -> list[str]:
        """Upload ids of incomplete multipart uploads of exactly `key`."""
        full = self.full_key(key)
        return [u["UploadId"] for u in await self.incomplete_uploads(key) if u["Key"] == full]

    async def incomplete_uploads(self, prefix: str = "") -> list[dict]:
        """Incomplete multipart uploads under a relative prefix: Key (full), UploadId, Initiated."""
        full = self.full_key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        paginator = self.client.get_paginator("list_multipart_uploads")
        uploads = []
        try:
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                uploads.extend(page.get("Uploads", []))
        except Exception as exc:
            raise classify(exc, f"list uploads {prefix}") from exc
        return uploads

    async def copy_object(self, source: str, key: str) -> str:
        resp = await self._call(f"copy {source} -> {key}", "copy_object", Key=self.full_key(key),
                                CopySource={"Bucket": self.bucket, "Key": self.full_key(source)},
                                MetadataDirective="COPY")
        return resp["CopyObjectResult"]["ETag"]

    async def create_multipart_copy(self, key: str, metadata: dict[str, str]) -> str:
        """A multipart upload whose parts are copied from another object (`upload_part_copy`)."""
        resp = await self._call(f"create multipart {key}", "create_multipart_upload", Key=self.full_key(key),
                                Metadata=metadata, **_tagging(key))
        return resp["UploadId"]

    async def upload_part_copy(self, source: str, key: str, upload_id: str, number: int, start: int,
                               end: int) -> dict:
        """Part `number` of `key` is bytes [start, end) of `source`, copied by the server."""
        resp = await self._call(f"part {number} of {key} from {source}", "upload_part_copy", Key=self.full_key(key),
                                UploadId=upload_id, PartNumber=number,
                                CopySource={"Bucket": self.bucket, "Key": self.full_key(source)},
                                CopySourceRange=f"bytes={start}-{end - 1}")
        return {"PartNumber": number, "ETag": resp["CopyPartResult"]["ETag"]}

    async def delete_object(self, key: str, *, if_match: str | None = None) -> None:
        """DELETE; with `if_match`, only while the object's ETag is still that one (else StoreError
        "PreconditionFailed"). A server that ignores the condition deletes unconditionally."""
        conditions = {"IfMatch": if_match} if if_match else {}
        await self._call(f"DELETE {key}", "delete_object", Key=self.full_key(key), **conditions)

    async def head_object(self, key: str) -> dict:
        return await self._call(f"HEAD {key}", "head_object", Key=self.full_key(key))

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the object."""
        resp = await self._call(f"GET {key}", "get_object", Key=self.full_key(key), Range=f"bytes={start}-{end - 1}")
        try:
            async with resp["Body"] as body:
                return await body.read()
        except Exception as exc:
            raise classify(exc, f"GET {key}") from exc

    async def list_objects(self, prefix: str = "", delimiter: str | None = None, *,
                           start_after: str | None = None, max_keys: int | None = None) -> AsyncIterator[dict]:
        """Objects (and, with a delimiter, common prefixes as {'Prefix': ...}) under a relative prefix.

        `start_after` (relative) skips keys up to it; `max_keys` stops after one page of that size."""
        full = self.full_key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        paginator = self.client.get_paginator("list_objects_v2")
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        if start_after:
            kwargs["StartAfter"] = self.full_key(start_after)
        if max_keys:
            kwargs["PaginationConfig"] = {"MaxItems": max_keys, "PageSize": max_keys}
        try:
            async for page in paginator.paginate(**kwargs):
                for item in page.get("CommonPrefixes", []):
                    yield item
                for item in page.get("Contents", []):
                    yield item
        except Exception as exc:
            raise classify(exc, f"LIST {prefix}") from exc
