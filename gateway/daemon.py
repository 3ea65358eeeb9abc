"""The gateway daemon: recover the journal, check the bucket, mount, serve, drain on the way out.

Start-up order (DESIGN.md invariant 5): lock the cache dir, replay the journal, check the bucket,
and only then mount, so the first request sees the recovered namespace. Shutdown (unmount or
SIGTERM): leave the FUSE loop, unmount, drain for up to `drain_timeout_s` (not with `no_drain`),
and exit; whatever is left stays in the journal for the next mount.
"""

from __future__ import annotations

import ctypes
import dataclasses
import faulthandler
import fcntl
import logging
import os
import signal
from pathlib import Path
from collections.abc import Callable

import pyfuse3
import trio

from gateway import content
from gateway.cache import CacheFiles
from gateway.cache_dir import UnsafeCacheDir, secure_cache_dir
from gateway.config import Config, cache_size_bytes
from gateway.control import DRAIN_STATUS_FILE, Control
from gateway.drain import Drain
from gateway.errors import CliError, JournalError, StoreError
from gateway.fs import Operations
from gateway.journal import Journal
from gateway.listing import BucketListing
from gateway.namespace import Namespace
from gateway.page_cache import drop_kernel_pages
from gateway.reader import Reader
from gateway.remote_ns import forget_kernel_entry
from gateway.retry import retrying
from gateway.space import SpaceGuard
from gateway.store import Store

log = logging.getLogger(__name__)
M_TRIM_THRESHOLD = -1  # glibc mallopt parameters
M_MMAP_THRESHOLD = -3
# Just above one FUSE write request (1 MiB of data plus its header): those buffers are reused from
# the heap; upload parts (>= 5 MiB) stay mmap'd. Larger values (4 MiB / 8 MiB) cost ~100 MiB of
# peak RSS while draining 4 GiB (docs/PERFORMANCE.md).
MMAP_THRESHOLD_BYTES = 2 << 20
TRIM_THRESHOLD_BYTES = 2 << 20
RESTART_S = 1.0  # pause before a background service that failed is started again
MOUNT_ATTEMPTS = 4  # bucket check and listing at mount: ~3.5 s of retries before a one-line error


def lock_cache_dir(cache_dir: Path) -> int:
    """Take an exclusive lock on the cache dir, or explain who holds it."""
    try:
        warning = secure_cache_dir(cache_dir)
        if warning:
            log.warning("%s", warning)
        fd = os.open(cache_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    except UnsafeCacheDir as exc:
        raise CliError(str(exc), code=2) from None
    except OSError as exc:
        raise CliError(f"cache dir {cache_dir} is not usable: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise CliError(f"cache dir {cache_dir} is in use by a running ckptfs daemon (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def recover(ns: Namespace, cache: CacheFiles, journal: Journal) -> dict:
    """Replay what a crash left: rows against data files, readiness, unlinked inodes, stray data."""
    checked = content.check_data_files(ns, cache)
    requeued = ns.requeue_interrupted_uploads()  # their jobs died with the old daemon
    unready = [r[0] for r in journal.all("SELECT id FROM inodes WHERE state='dirty' AND nlink>0 ORDER BY changed_at")]
    for ino in unready:
        ns.mark_ready(ino)  # its writers died with the old daemon: it is closed now
    purged = ns.purge_unlinked()
    known = {r[0] for r in journal.all("SELECT id FROM inodes")}
    strays = 0
    for sub in cache.root.iterdir():
        for entry in os.scandir(sub):
            if entry.name.isdigit() and int(entry.name) not in known:
                cache.remove(int(entry.name))
                strays += 1
    summary = {**checked, "requeued": len(requeued), "made_ready": len(unready), "purged": len(purged),
               "stray_data": strays}
    if any(summary.values()):
        log.info("recovered the journal: %s", summary)
    return summary


def mount_options(config: Config) -> set[str]:
    options = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    options.add("fsname=ckptfs")
    options.add("subtype=ckptfs")
    if config.allow_other:
        options.add("allow_other")
    return options


async def serve(config: Config, on_ready: Callable[[], None]) -> None:
    """Run one mount until it is unmounted or the daemon is signalled."""
    cache_dir = Path(config.cache_dir)
    lock_fd = lock_cache_dir(cache_dir)
    journal = Journal(cache_dir / "journal.db")
    try:
        await _serve_locked(config, journal, on_ready)
    finally:
        journal.close()
        os.close(lock_fd)


async def _serve_locked(config: Config, journal: Journal, on_ready: Callable[[], None]) -> None:
    cache = CacheFiles(Path(config.cache_dir))
    ns = Namespace(journal, uid=os.getuid(), gid=os.getgid(), on_purge=cache.remove)
    recover(ns, cache, journal)
    async with Store(config.bucket, config.prefix, endpoint_url=config.endpoint_url, region=config.region,
                     max_connections=config.upload_concurrency + config.put_concurrency + 8) as store:
        await _at_mount(f"cannot use s3://{config.bucket}", store.check_bucket, timeout_s=30)
        listing = BucketListing(ns, store, config.metadata_ttl_s, follow_bucket=config.cluster,
                                on_stale_entry=forget_kernel_entry)
        cluster = _cluster(config, ns, store, journal, listing)
        if cluster is not None:  # our lease exists before any write of ours: commits wait for us
            await _at_mount(f"cannot register in s3://{config.bucket}/{config.prefix}", cluster.register,
                            timeout_s=60)
        # one node: objects the journal has but the bucket lacks are uploaded again (a power loss
        # undid a delete); several nodes: the bucket is the truth (another node deleted them)
        await _at_mount(f"cannot list s3://{config.bucket}/{config.prefix}",
                        lambda: listing.sync_once(reconcile=not config.cluster), timeout_s=300)
        drain = Drain(ns, cache, store, journal, config, gate=cluster)  # sets cluster.wake = drain.wake
        if cluster is not None:
            drain.staging = cluster.staging
        control = Control(ns, cache, drain, journal, config)
        control.cluster = cluster
        if cluster is not None:
            wake_drain, poke_cluster = ns.on_change, cluster.poke

            def wake_drain_and_cluster(delayed: bool = True) -> None:
                wake_drain(delayed=delayed)
                poke_cluster()
            ns.on_change = wake_drain_and_cluster
        space = SpaceGuard(ns, cache, drain, limit_bytes=cache_size_bytes(config, _disk_bytes(cache)),
                           high=config.cache_high_watermark, low=config.cache_low_watermark,
                           timeout_s=config.backpressure_timeout_s)
        control.backpressure = space
        control.background = errors = BackgroundErrors()
        async with trio.open_nursery() as fetch_nursery:
            reader = Reader(ns, cache, store, fetch_nursery, space)
            space.reader = reader
            ns.purge_listeners += [space.forget, reader.forget]
            ops = Operations(ns, cache, control, reader=reader, space=space)
            ops.foreground = drain.publisher.foreground
            ops.drop_kernel_pages = drop_kernel_pages
            control.ops = ops
            control.reader = reader
            fetch_nursery.start_soon(supervised, "bucket listing", listing.run, errors)
            fetch_nursery.start_soon(supervised, "spare data files", cache.spares.run, errors)
            if cluster is not None:
                ops.remote_lookup = cluster.lookup_remote
                ops.before_readdir = cluster.before_readdir
                await fetch_nursery.start(supervised, "cluster", cluster.run, errors)
            await _run_mounted(config, ops, drain, on_ready, errors, cluster)
            fetch_nursery.cancel_scope.cancel()


@dataclasses.dataclass
class BackgroundErrors:
    """Exceptions that escaped a background service (shown in status); the mount stays up."""

    count: int = 0
    last: str | None = None
    journal_failed: set[str] = dataclasses.field(default_factory=set)

    def record(self, name: str, exc: Exception) -> None:
        self.count += 1
        self.last = f"{name}: {exc!r}"
        if isinstance(exc, JournalError):
            if name not in self.journal_failed:  # once per service: it retries every RESTART_S
                self.journal_failed.add(name)
                log.error("%s: the journal cannot be written (%s); the mount stays up, read-only", name, exc)
        else:
            log.exception("%s failed unexpectedly; restarting it in %.0f s", name, RESTART_S)


async def supervised(name: str, service, errors: BackgroundErrors, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run a background service (drain, listing) for the life of the mount: an exception that
    escapes it is logged and counted and the service starts again, instead of ending the nursery
    and with it the mount. Cancellation (unmount) still ends it."""
    kwargs = {} if task_status is trio.TASK_STATUS_IGNORED else {"task_status": task_status}
    while True:
        try:
            await service(**kwargs)
            return
        except Exception as exc:
            errors.record(name, exc)
        kwargs = {}  # started once: the mount does not wait for a restart
        await trio.sleep(RESTART_S)


def _cluster(config: Config, ns: Namespace, store: Store, journal: Journal, listing: BucketListing):
    """The cluster service when several nodes share the prefix (--cluster), else None."""
    if not config.cluster:
        return None
    from gateway.cluster import Cluster
    from gateway.remote_ns import RemoteNamespace

    cluster = Cluster(ns, store, journal, config, listing=listing)
    cluster.namespace = RemoteNamespace(ns, store, cluster.node)
    cluster.namespace.staging = cluster.staging
    listing.being_removed = cluster.namespace.being_removed
    listing.keeps_dir = cluster.keeps_dir
    log.info("cluster mode: node %s", cluster.member)
    return cluster


async def _at_mount(what: str, call, *, timeout_s: float, attempts: int = MOUNT_ATTEMPTS) -> None:
    """A request the mount depends on: transient errors are retried a few times, then one line."""
    try:
        with trio.fail_after(timeout_s):
            await retrying(what, call, attempts, base_s=0.5)
    except (StoreError, trio.TooSlowError) as exc:
        raise CliError(f"{what}: {exc or f'no answer within {timeout_s:.0f} s'}") from None


def _disk_bytes(cache: CacheFiles) -> int:
    vfs = os.statvfs(cache.root)
    return vfs.f_blocks * vfs.f_frsize


async def _run_mounted(config: Config, ops: Operations, drain: Drain, on_ready: Callable[[], None],
                       errors: BackgroundErrors, cluster=None) -> None:
    no_drain = {"set": config.no_drain}
    try:
        pyfuse3.init(ops, config.mountpoint, mount_options(config))
    except RuntimeError as exc:
        raise CliError(f"cannot mount at {config.mountpoint}: {exc}") from None
    clean = False
    async with trio.open_nursery() as nursery:
        await nursery.start(supervised, "drain", drain.run, errors)
        nursery.start_soon(_watch_signals, no_drain)
        _start_metrics(config, ops.control)
        on_ready()
        log.info("mounted s3://%s/%s at %s (cache %s)", config.bucket, config.prefix, config.mountpoint,
                 config.cache_dir)
        try:
            await pyfuse3.main()
            clean = True
        finally:
            pyfuse3.close(unmount=clean)
        if not no_drain["set"]:
            async with trio.open_nursery() as progress:  # `ckptfs unmount` shows it
                progress.start_soon(ops.control.publish_status, str(Path(config.cache_dir) / DRAIN_STATUS_FILE))
                drained = await _drain_before_exit(drain, config.drain_timeout_s)
                progress.cancel_scope.cancel()
            if drained and cluster is not None:
                await cluster.retire()  # everything of ours is durable: commits need not wait for us
        drain.stop()
        nursery.cancel_scope.cancel()


async def _drain_before_exit(drain: Drain, timeout_s: float) -> bool:
    log.info("unmounted; draining pending uploads for up to %.0fs", timeout_s)
    if await drain.wait_idle(timeout_s):
        log.info("everything is durable")
        return True
    else:
        v = drain.view
        log.warning("drain timeout: %d files (%d bytes) stay pending in the journal for the next mount",
                    v.dirty_files + v.queued_files + v.uploading_files, v.dirty_bytes)
        return False


async def _watch_signals(no_drain: dict) -> None:
    """SIGTERM/SIGINT end the FUSE loop (then drain); SIGUSR2 means: exit without draining."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR2) as signals:
        async for signum in signals:
            if signum == signal.SIGUSR2:
                no_drain["set"] = True
                log.info("SIGUSR2: will not drain on exit")
                continue
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()


def _start_metrics(config: Config, control: Control) -> None:
    if not config.metrics_addr:
        return
    try:
        from gateway.metrics import start_metrics_server
    except ImportError:
        log.warning("metrics requested but gateway.metrics is not available")
        return
    # status() reads trio-owned state: the scrape thread runs it on the trio loop through the token
    start_metrics_server(config.metrics_addr, control.status, trio_token=trio.lowlevel.current_trio_token())


def configure_logging(config: Config) -> None:
    handlers: list[logging.Handler] = []
    if config.log_file:
        handlers.append(logging.FileHandler(config.log_file))
        os.chmod(config.log_file, 0o600)  # it names files, the bucket and the prefix
    else:
        handlers.append(logging.StreamHandler())
    logging.basicConfig(level=config.log_level.upper(), handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "aiobotocore", "httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    faulthandler.enable()


def pin_mmap_threshold() -> None:
    """Serve large buffers (upload parts, fetched chunks) by mmap, so freeing them returns memory.

    glibc raises its mmap threshold after large frees, after which 16 MiB part buffers come from the
    heap and stay there: peak RSS while draining 4 GiB was 455 MiB, 230 MiB with the threshold
    pinned at 1 MiB (docs/PERFORMANCE.md, bench_rss). Pinned at 2 MiB, with the heap trimmed only
    above 2 MiB free, the 1 MiB buffer pyfuse3 copies each write request into is reused from the
    heap instead of being mmap'd, page-faulted and unmapped per request (most of the FUSE thread's
    CPU time per GiB written).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        log.debug("mallopt not available; RSS may stay higher after large uploads")


def run(config: Config, on_ready: Callable[[], None]) -> None:
    os.umask(0o077)  # the daemon's own files (journal, log, data) are its user's only
    configure_logging(config)
    pin_mmap_threshold()
    trio.run(serve, config, on_ready)
