"""The hash-chained audit file: one JSON line per request, each line naming the hash of the one before.

With `privacy.audit_log` set, every request's audit record is also appended here, so an auditor can
check that no private request was served by a non-local backend and that no line was changed or
removed afterwards. A line is a compact JSON object: the record's fields plus `prev`, the lowercase
hex SHA-256 of the previous line's bytes without their newline (GENESIS on the first line). Changing,
removing or reordering a line breaks the `prev` of the line after it, and `verify` says where.

The chain cannot show on its own that lines were cut from the end of the file: only a head hash
written down earlier (`verify` prints the current one) can show that.

Several worker processes may append to one file. Each append holds an exclusive `flock` while it
reads the last line, from the end of the file, and writes its own line in one `write` on an O_APPEND
descriptor. On an event loop, an append never waits for the lock: see AuditLog.

A crash can leave a last line without its newline. The next append then starts on a new line and
chains to the torn line's bytes as they are, so every later line still verifies; `verify` reports
the torn line: as incomplete while it is last, as not valid JSON once a line follows it. (A torn
line that lost only its newline is a whole record, and once followed it verifies like any other.)
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

GENESIS = "0" * 64
TAIL_CHUNK = 4096
LOCK_RETRY = (0.001, 0.02)  # seconds between a waiting write's tries for the lock: first, most
CLOSE_GRACE = 5.0  # seconds close() gives records still waiting for the lock
# Records that may wait for the lock at once (about 75 MB): a lock held for good (a hung backup job)
# must not take the gateway's memory with it. More fail, and are counted, as on a full disk.
WAITING_LIMIT = 100_000
SHOWN = 20  # problems and requests listed by format_report before "and N more"


class AuditError(Exception):
    """The audit file cannot be opened, read or written."""


def line_hash(line: bytes) -> str:
    """What the next line's `prev` holds: `line` without its newline."""
    return hashlib.sha256(line).hexdigest()


class AuditLog:
    """Appends records to the chain at `path`, continuing whatever chain the file already holds.

    Safe to share between threads, and between processes that each open the file themselves.

    An append called on an event loop never waits there for another process's lock (a worker's, or
    a backup job's `flock`): while the lock is taken, the record and every one after it go to a
    thread that waits for the lock and writes them in order, up to WAITING_LIMIT of them (an append
    past that raises AuditError). What that thread cannot write is reported, on the loop, through
    `on_failure(error, records)`. Without a running loop, an append waits for the lock.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        on_failure: Callable[[AuditError, int], None] | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.on_failure = on_failure
        # Threads sharing this descriptor share its flock, so they need a lock of their own.
        self._lock = threading.Lock()
        self._waiting: list[dict[str, Any]] | None = None  # records handed to the writer thread
        self._give_up_at: float | None = None  # set by close() while the writer thread still waits
        self._writer: asyncio.Future[list[tuple[AuditError, int]]] | None = None  # its latest run
        try:
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as error:
            raise AuditError(f"cannot open audit log {self.path}: {error.strerror}") from error

    def append(self, record: Mapping[str, Any]) -> None:
        """Write `record` as the next line, with `ts` added if absent, or hand it to the writer
        thread (see the class). Raises AuditError when it is written here and that fails."""
        entry = dict(record)
        entry.setdefault("ts", _utc_now())
        with self._lock:
            fd = self._fd
            if fd is None or self._give_up_at is not None:
                raise AuditError(f"audit log {self.path} is closed")
            if self._waiting is not None:  # behind records already waiting for the lock, in order
                if len(self._waiting) >= WAITING_LIMIT:
                    raise AuditError(
                        f"cannot write audit log {self.path}: another process has held its lock while"
                        f" {WAITING_LIMIT} records came, and no more can wait"
                    )
                self._waiting.append(entry)
                return
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    loop = _running_loop()
                    if loop is not None:
                        self._waiting = [entry]
                        self._writer = loop.run_in_executor(None, self._write_waiting)
                        self._writer.add_done_callback(self._report)
                        return
                    fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    _write_all(fd, _chained(fd, [entry]))
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError as error:
                raise self._error(error) from error

    def close(self) -> None:
        """Close the file; records still waiting for the lock get CLOSE_GRACE seconds more."""
        with self._lock:
            if self._fd is None or self._give_up_at is not None:
                return
            if self._waiting is not None:  # the writer thread closes the file when it is done
                self._give_up_at = time.monotonic() + CLOSE_GRACE
                return
            os.close(self._fd)
            self._fd = None

    async def aclose(self) -> None:
        """close(), then wait until records still waiting for the lock are written, or for
        CLOSE_GRACE seconds, after which they are reported lost: before a process exits."""
        self.close()
        if self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    def _write_waiting(self) -> list[tuple[AuditError, int]]:
        """In the writer thread: take the lock, then write what waits, in order, until nothing does."""
        assert self._fd is not None  # close() leaves the file open while records wait
        fd = self._fd
        failures: list[tuple[AuditError, int]] = []
        try:
            self._wait_for_lock(fd)
        except (OSError, TimeoutError) as error:
            with self._lock:
                failures.append((self._error(error), len(self._waiting or ())))
                self._done_waiting()
            return failures
        while True:
            with self._lock:
                batch = self._waiting
                if not batch:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    self._done_waiting()
                    return failures
                self._waiting = []
            try:
                _write_all(fd, _chained(fd, batch))
            except OSError as error:
                failures.append((self._error(error), len(batch)))

    def _wait_for_lock(self, fd: int) -> None:
        pause = LOCK_RETRY[0]
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if self._give_up_at is not None and time.monotonic() >= self._give_up_at:
                    raise TimeoutError(
                        errno.ETIMEDOUT, "closed while another process held its lock"
                    ) from None
                time.sleep(pause)
                pause = min(pause * 2, LOCK_RETRY[1])

    def _done_waiting(self) -> None:
        """With `_lock` held: nothing waits any more; close the file if close() was called meanwhile."""
        self._waiting = None
        if self._give_up_at is not None and self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _report(self, written: asyncio.Future[list[tuple[AuditError, int]]]) -> None:
        if self.on_failure is not None:
            for error, records in written.result():
                self.on_failure(error, records)

    def _error(self, error: OSError) -> AuditError:
        return AuditError(f"cannot write audit log {self.path}: {error.strerror}")


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _chained(fd: int, entries: list[dict[str, Any]]) -> bytearray:
    """The bytes to append for `entries`: linked to the file's last line and to one another, each
    on a line of its own. Copied into one buffer line by line: a bytes object from orjson keeps the
    4 KiB it was written in, so a list of them holds 20 times their length (a backlog of 80,000
    records waiting for the lock took 700 MB to write)."""
    last, terminated = _last_line(fd)
    data = bytearray() if terminated else bytearray(b"\n")
    for entry in entries:
        entry["prev"] = GENESIS if last is None else line_hash(last)
        last = orjson.dumps(entry)
        data += last
        data += b"\n"
    return data


def _last_line(fd: int) -> tuple[bytes | None, bool]:
    """The last line's bytes (None for an empty file) and whether it ends with a newline."""
    end = os.fstat(fd).st_size
    if end == 0:
        return None, True
    terminated = os.pread(fd, 1, end - 1) == b"\n"
    if terminated:
        end -= 1
    pieces: list[bytes] = []
    while end > 0:
        start = max(0, end - TAIL_CHUNK)
        chunk = os.pread(fd, end - start, start)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            pieces.append(chunk[newline + 1 :])
            break
        pieces.append(chunk)
        end = start
    return b"".join(reversed(pieces)), terminated


def _write_all(fd: int, data: bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@dataclass(frozen=True, slots=True)
class AuditReport:
    """What `verify` found. `ok` needs an unbroken chain and no private request served off premises.

    `private_off_premises` holds "request-id (line N, backend B)"; `head` is the hash of the last
    line, or GENESIS for an empty file.
    """

    records: int
    ok: bool
    problems: list[str]
    by_privacy: dict[str, int]
    by_backend: dict[str, int]
    private_off_premises: list[str]
    head: str


def verify(path: str | os.PathLike[str]) -> AuditReport:
    """Check the chain in the file at `path`, one line at a time. Raises AuditError if it cannot be read."""
    chain = _Chain()
    try:
        with open(path, "rb") as file:
            for number, raw in enumerate(file, start=1):
                chain.add(number, raw)
    except OSError as error:
        raise AuditError(f"cannot read audit log {os.fspath(path)}: {error.strerror}") from error
    return chain.report()


class _Chain:
    """Where `verify` has got to: the hash the next line must name, and what it has counted so far."""

    def __init__(self) -> None:
        self.head = GENESIS
        self.records = 0
        self.problems: list[str] = []
        self.by_privacy: Counter[str] = Counter()
        self.by_backend: Counter[str] = Counter()
        self.off_premises: list[str] = []

    def add(self, number: int, raw: bytes) -> None:
        torn = not raw.endswith(b"\n")
        line = raw.removesuffix(b"\n")
        if torn:
            self.problems.append(f"line {number}: incomplete last line (no newline): a write was cut short")
        record = self._parse(number, line, torn)
        if record is not None:
            self._check_prev(number, record)
            self._count(number, record)
        self.head = line_hash(line)

    def _parse(self, number: int, line: bytes, torn: bool) -> dict[str, Any] | None:
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError:
            if not torn:
                self.problems.append(f"line {number}: {'not valid JSON' if line.strip() else 'empty line'}")
            return None
        if not isinstance(value, dict):
            self.problems.append(f"line {number}: not a JSON object")
            return None
        return value

    def _check_prev(self, number: int, record: dict[str, Any]) -> None:
        prev = record.get("prev")
        if prev == self.head:
            return
        if not isinstance(prev, str):
            problem = "no prev hash"
        elif number == 1:
            problem = "prev is not the genesis hash: earlier lines were removed, or lines were reordered"
        else:
            problem = (
                f"prev does not match line {number - 1}: line {number - 1} was changed,"
                " or lines were removed or reordered here"
            )
        self.problems.append(f"line {number}: {problem}")

    def _count(self, number: int, record: dict[str, Any]) -> None:
        privacy = record.get("privacy")
        backend = record.get("backend")
        self.records += 1
        self.by_privacy["(none)" if privacy is None else str(privacy)] += 1
        self.by_backend["(none)" if backend is None else str(backend)] += 1
        if privacy == "private" and backend is not None and record.get("local") is not True:
            self.off_premises.append(f"{record.get('request_id')} (line {number}, backend {backend})")

    def report(self) -> AuditReport:
        return AuditReport(
            records=self.records,
            ok=not self.problems and not self.off_premises,
            problems=self.problems,
            by_privacy=dict(sorted(self.by_privacy.items())),
            by_backend=dict(sorted(self.by_backend.items())),
            private_off_premises=self.off_premises,
            head=self.head,
        )


def format_report(report: AuditReport) -> str:
    """A short summary for people: the chain, where requests went, and the head hash to write down."""
    lines = [f"records: {report.records}"]
    if report.problems:
        lines.append(f"chain: BROKEN ({_plural(len(report.problems), 'problem')})")
        lines.extend(_listed(report.problems))
    else:
        lines.append("chain: OK")
    lines.append(f"by privacy: {_counts(report.by_privacy)}")
    lines.append(f"by backend: {_counts(report.by_backend)}")
    off_premises = report.private_off_premises
    lines.append(f"private requests served by a non-local backend: {len(off_premises) or 'none'}")
    lines.extend(_listed(off_premises))
    lines.append(f"head: {report.head}")
    lines.append("  (write it down: only a head recorded earlier shows that lines were cut from the end)")
    lines.append(f"result: {'OK' if report.ok else 'NOT OK'}")
    return "\n".join(lines)


def _listed(items: list[str]) -> list[str]:
    shown = [f"  {item}" for item in items[:SHOWN]]
    if len(items) > SHOWN:
        shown.append(f"  and {len(items) - SHOWN} more")
    return shown


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in counts.items()) or "none"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
