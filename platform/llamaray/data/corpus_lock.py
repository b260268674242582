"""One build of a corpus at a time: a lease object, `<corpus>/prepare.lock`.

Each build writes into a version folder of its own (`data.corpus_layout`), so two builds
can never mix their files; the lock keeps a second launch from spending hours on a build
that would race the first for the pointer, and keeps a prune from deleting the folder of
a build in progress.

The lock is a small JSON object: who holds it (user, host, pid), the version it builds, a
random token, when it started and when it was last renewed. It is created only if absent
(`storage.create_exclusive`: a hard link locally, `If-None-Match: *` on S3), read back to
check the token, and renewed by a daemon thread every quarter of the lease. A second launch
fails at once with `CorpusLocked`, naming the holder.

When a lock is stale (the clear rule, `stale_reason`): its holder ran on this host and its
process has exited, or it has not been renewed for `LEASE_S` (a launch killed on another
machine, a machine that died). The next launch then takes it over; among several, one
wins: each first creates `prepare.lock.takeover-<stale token>` only if absent. By hand,
delete the object: `rm <corpus>/prepare.lock` or `aws s3 rm s3://.../prepare.lock` (or
`llamaray corpus unlock <corpus>`), after making sure no build is running.

Limits: a store that ignores `If-None-Match` (some older S3-compatible ones) lets two
creates both succeed; the read-back catches most of these races, not all. Staleness by
time compares the holder's clock with the reader's: clocks must agree to well within the
lease. A holder that was paused past its lease and taken over notices on its next renewal
or before switching (`check`), and does not switch.
"""

from __future__ import annotations

import getpass
import json
import os
import secrets
import socket
import threading
import time
from datetime import UTC, datetime

import pyarrow.fs

from llamaray import storage
from llamaray.console import logger
from llamaray.data.corpus_layout import LOCK

log = logger("corpus-lock")

LEASE_S = 600.0
"""A lock not renewed for this long is stale (its holder renews every quarter of it)."""


class CorpusLocked(FileExistsError):
    """Another launch holds the corpus's build lock; the message names it."""

    def __init__(self, corpus: str, holder: dict):
        self.corpus, self.holder = corpus, holder
        lock = storage.join(corpus, LOCK)
        remove = f"aws s3 rm {lock}" if storage.is_s3(lock) else f"rm {lock}"
        super().__init__(
            f"corpus {corpus} is being prepared by {describe(holder)}; wait for it to "
            f"finish. If that launch is dead, the lock is taken over once it is stale (its "
            f"process gone on its host, or not renewed for {LEASE_S:.0f} s), or remove it "
            f"now with `{remove}`"
        )


class LockLost(RuntimeError):
    """The build's lock was taken over (it was not renewed in time): it must not switch."""


def describe(holder: dict) -> str:
    """A lock's holder in words: who, where, what and since when."""
    if "unreadable" in holder:
        return f"an unreadable lock ({holder['unreadable']!r})"
    started = _iso(holder.get("started_at"))
    renewed = holder.get("renewed_at")
    ago = f", renewed {time.time() - renewed:.0f} s ago" if renewed else ""
    return (
        f"{holder.get('owner', '?')} (pid {holder.get('pid', '?')} on host "
        f"{holder.get('host', '?')}), building version {holder.get('version', '?')} since "
        f"{started}{ago}"
    )


def stale_reason(holder: dict, now: float, lease_s: float = LEASE_S) -> str | None:
    """Why the lock `holder` may be taken over, or None while it is held. The lease is
    the one the holder recorded (it renews within it), else `lease_s`."""
    if holder.get("host") == socket.gethostname() and not _alive(holder.get("pid")):
        return f"its process {holder.get('pid')} on this host has exited"
    renewed = holder.get("renewed_at")
    if not isinstance(renewed, int | float):
        return "it records no renewal time"
    recorded = holder.get("lease_s")
    lease_s = float(recorded) if isinstance(recorded, int | float) and recorded > 0 else lease_s
    if now - renewed > lease_s:
        return f"it was not renewed for {now - renewed:.0f} s (lease {lease_s:.0f} s)"
    return None


def check_free(corpus: str, lease_s: float = LEASE_S) -> None:
    """CorpusLocked when a live launch holds the build lock of `corpus`: for a launcher
    to fail at once, before starting Ray; the build itself still takes the lock."""
    holder = BuildLock(corpus, "").read()
    if holder is not None and stale_reason(holder, time.time(), lease_s) is None:
        raise CorpusLocked(corpus, holder)


class BuildLock:
    """The build lock of `corpus` for one build of `version`. Use as a context manager:
    `acquire` on entry (CorpusLocked when held), renewal in a thread, release on exit."""

    def __init__(self, corpus: str, version: str, lease_s: float = LEASE_S):
        self.corpus, self.version, self.lease_s = corpus, version, lease_s
        self.uri = storage.join(corpus, LOCK)
        self.token = secrets.token_hex(16)
        self.started_at = time.time()
        self._lost: dict | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def record(self) -> dict:
        return {
            "owner": _user(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "version": self.version,
            "token": self.token,
            "started_at": self.started_at,
            "renewed_at": time.time(),
            "lease_s": self.lease_s,
        }

    def acquire(self) -> BuildLock:
        """Hold the lock, taking over a stale one; CorpusLocked naming a live holder."""
        for _attempt in range(5):
            if storage.create_exclusive(self.uri, _dump(self.record())):
                return self._held()
            holder = self.read()
            if holder is None:  # released between our create and our read: try again
                continue
            if holder.get("token") == self.token:  # ours: a retried create was answered 412
                return self._held()
            why = stale_reason(holder, time.time(), self.lease_s)
            if why is None:
                raise CorpusLocked(self.corpus, holder)
            log.warning(f"taking over the lock of {self.corpus}: {describe(holder)}; {why}")
            if self._take_over(holder):
                return self._held()
        raise CorpusLocked(self.corpus, self.read() or {"unreadable": "(changing)"})

    def read(self) -> dict | None:
        """The lock's record now, or None when there is no lock."""
        try:
            text = storage.read_text(self.uri)
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
            if not isinstance(holder, dict):
                raise ValueError("not an object")
        except ValueError:
            # Not ours to parse: stale once its object is older than the lease.
            return {"unreadable": text[:200], "renewed_at": _mtime(self.uri)}
        return holder

    def check(self) -> None:
        """LockLost unless this build still holds the lock (called before switching)."""
        holder = self._lost or self.read()
        if holder is None or holder.get("token") != self.token:
            raise LockLost(
                f"the build of {self.corpus} version {self.version} lost its lock to "
                f"{describe(holder or {'unreadable': '(removed)'})}; it does not switch"
            )

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        holder = self.read()
        if holder is not None and holder.get("token") == self.token:
            storage.delete_tree(self.uri)

    def __enter__(self) -> BuildLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------------ internals

    def _held(self) -> BuildLock:
        holder = self.read()
        if holder is None or holder.get("token") != self.token:  # a store without If-None-Match
            raise CorpusLocked(self.corpus, holder or {"unreadable": "(removed)"})
        self._renewer = threading.Thread(target=self._renew, name="corpus-lock", daemon=True)
        self._renewer.start()
        return self

    def _take_over(self, stale: dict) -> bool:
        """Replace the stale lock `stale` with ours; False when another launch did first."""
        marker = f"{self.uri}.takeover-{stale.get('token', 'unreadable')}"
        if not storage.create_exclusive(marker, _dump({"at": time.time(), "token": self.token})):
            if time.time() - _mtime(marker) <= self.lease_s:
                return False  # another launch is taking it over right now
            storage.delete_tree(marker)  # left by a launch that died taking over
            if not storage.create_exclusive(marker, _dump({"at": time.time()})):
                return False
        try:
            now = self.read()
            if now is None or now.get("token") != stale.get("token"):
                return False  # replaced meanwhile: whoever did holds it
            storage.write_bytes(self.uri, _dump(self.record()))
            return True
        finally:
            storage.delete_tree(marker)

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                holder = self.read()
                if holder is None or holder.get("token") != self.token:
                    self._lost = holder or {"unreadable": "(removed)"}
                    log.error(f"lost the lock of {self.corpus} to {describe(self._lost)}")
                    return
                storage.write_bytes(self.uri, _dump(self.record()))
            except OSError as err:  # the lease leaves room for a few failed renewals
                log.warning(f"could not renew the lock of {self.corpus}: {err}")


def _dump(record: dict) -> bytes:
    return json.dumps(record, indent=1).encode()


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _mtime(uri: str) -> float:
    fs, path = storage.filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pyarrow.fs.FileType.NotFound or info.mtime is None:
        return 0.0
    return info.mtime.timestamp()


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def _iso(t) -> str:
    if not isinstance(t, int | float):
        return "an unknown time"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
