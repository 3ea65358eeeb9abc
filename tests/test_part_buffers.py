"""Part reads into reused buffers, their checksums, and request bodies that do not copy them."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import zlib

import pytest

from gateway import digest
from gateway.store import Body


@pytest.fixture
def data_file(tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)
    path = tmp_path / "f"
    path.write_bytes(data)
    return str(path), data


def test_read_into_sums_match_read_range_sums(data_file):
    path, data = data_file
    buffers = digest.PartBuffers(1 << 20, keep=2)
    for offset in (0, 1 << 20, 2 << 20):
        length = min(1 << 20, len(data) - offset)
        with buffers.lease(length) as view:
            crc, sha = digest.read_into_sums(path, offset, view)
            assert bytes(view) == data[offset:offset + length]
        body, crc_old, sha_old = digest.read_range_sums(path, offset, length)
        assert (crc, sha) == (crc_old, sha_old)
        assert crc == base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()
        assert sha == hashlib.sha256(body).hexdigest()


def test_buffers_are_reused_only_when_unreferenced(data_file):
    path, _ = data_file
    buffers = digest.PartBuffers(1 << 20, keep=2)
    for _ in range(5):
        with buffers.lease(1 << 20) as view:
            digest.read_into(path, 0, view)
    assert buffers.allocated == 1
    with buffers.lease(1000) as view:
        kept = view[:10]  # a slice outlives the lease: that buffer must not be handed out again
    with buffers.lease(1000) as other:
        other[:10] = b"x" * 10
    assert buffers.allocated == 2
    assert bytes(kept) != b"x" * 10


def test_read_into_past_the_end_is_eoferror(data_file):
    path, data = data_file
    with pytest.raises(EOFError):
        digest.read_into(path, len(data) - 5, memoryview(bytearray(10)))
    with pytest.raises(ValueError):
        with digest.PartBuffers(16, keep=1).lease(17):
            pass


def test_body_streams_slices_of_its_data_and_rewinds():
    data = bytearray(os.urandom(Body.CHUNK * 2 + 5))
    body = Body(memoryview(data), "sha")
    assert len(body) == len(data) and body.tell() == 0
    chunks = list(body)
    assert [len(c) for c in chunks] == [Body.CHUNK, Body.CHUNK, 5]
    assert all(isinstance(c, memoryview) and c.obj is data for c in chunks)  # no copies
    assert b"".join(chunks) == data
    assert body.seek(0) == 0 and body.read(3) == data[:3] and body.tell() == 3
    assert body.seek(0, io.SEEK_END) == len(data) and body.read() == b""
    body.seek(0)
    assert body.read() == data and body.getvalue() == data
    assert isinstance(body, io.BytesIO) and bool(Body(b""))


def test_a_buffer_a_failed_request_still_refers_to_is_reused_after_collection():
    """A traceback keeps a view of the part's buffer in a reference cycle until the collector
    runs; the pool must reuse that buffer rather than allocate one more per failed part."""
    import gc

    buffers = digest.PartBuffers(1 << 20, keep=2)

    class Cycle:
        pass

    was_enabled = gc.isenabled()
    gc.disable()  # the cycle must survive until the pool itself collects
    try:
        for _ in range(6):
            with buffers.lease(1 << 20) as view:
                cycle = Cycle()
                cycle.me = cycle
                cycle.view = view[:4]  # what a failed request's frames keep
            del cycle
    finally:
        if was_enabled:
            gc.enable()
    assert buffers.allocated <= 2
    assert buffers.collections >= 1


def test_payloads_are_hashed_for_the_signature_only_over_plain_http():
    """Over http SigV4 covers the body's SHA-256, taken from the Body (computed in a thread);
    over https the body goes UNSIGNED-PAYLOAD and no SHA-256 is computed at all."""
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from gateway.store import Store, _PrecomputedPayloadS3Auth

    assert Store("b", endpoint_url="http://127.0.0.1:9000").signs_payload
    assert not Store("b", endpoint_url="https://s3.example.com").signs_payload
    assert not Store("b").signs_payload  # AWS's own endpoints: https
    auth = _PrecomputedPayloadS3Auth(Credentials("AKID", "SECRET"), "s3", "us-east-1")
    data = b"x" * 1000
    plain = AWSRequest("PUT", "http://127.0.0.1:9000/b/k", data=Body(data, "precomputed"))
    assert auth.payload(plain) == "precomputed"
    tls = AWSRequest("PUT", "https://s3.example.com/b/k", data=Body(data))
    assert auth.payload(tls) == "UNSIGNED-PAYLOAD"
    path = "/dev/null"
    assert digest.read_range_sums(path, 0, 0, sha256=False)[2] is None
    assert digest.read_into_sums(path, 0, memoryview(bytearray(0)), sha256=False)[1] is None


def test_buffers_are_anonymous_maps_whose_pages_come_on_first_touch():
    """A new buffer costs no zero-fill on the event loop: it is an mmap, filled by the read."""
    import mmap

    buffers = digest.PartBuffers(16 << 20, keep=1)
    with buffers.lease(5) as view:
        assert isinstance(view.obj, mmap.mmap) and len(view.obj) == 16 << 20
        view[:] = b"hello"
    with buffers.lease(5) as view:
        assert bytes(view) == b"hello"  # the same buffer again, not a fresh one
    assert buffers.allocated == 1


@pytest.mark.trio
async def test_a_put_body_goes_to_the_socket_as_a_view_of_its_buffer(s3_server, bucket, monkeypatch):
    """httpcore's h11 send joined every body chunk into new bytes (a copy of every part); with
    `_send_body_chunks_without_copying` the socket is handed views of the part buffer itself."""
    import httpcore._backends.trio

    from gateway.store import Store

    written: list[object] = []
    original = httpcore._backends.trio.TrioStream.write

    async def recording_write(self, buffer, timeout=None):
        written.append(buffer)
        return await original(self, buffer, timeout)

    monkeypatch.setattr(httpcore._backends.trio.TrioStream, "write", recording_write)
    buffers = digest.PartBuffers(3 << 20, keep=1)
    data = os.urandom((2 << 20) + 3)
    async with Store(bucket, "p", endpoint_url=s3_server.endpoint_url) as store:
        with buffers.lease(len(data)) as view:
            view[:] = data
            await store.put_object("body", view, {})
            chunks = [w for w in written if isinstance(w, memoryview) and w.obj is view.obj]
            assert sum(len(c) for c in chunks) == len(data)
            assert not [w for w in written if isinstance(w, bytes) and len(w) >= Body.CHUNK]
        got, _ = await store.get_record("body")
    assert got == data
