from __future__ import annotations

import asyncio
import fcntl
import hashlib
import io
import multiprocessing
import os
import threading
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog

from gateway import audit as audit_module
from gateway.audit import GENESIS, SHOWN, AuditError, AuditLog, AuditReport, format_report, verify
from gateway.cli import main
from gateway.config import parse_config
from gateway.exchange import Exchange
from gateway.logs import configure, get_logger
from gateway.metrics import Metrics
from gateway.state import State


def make_record(n: int, **overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "request_id": f"req-{n}",
        "privacy": "public",
        "privacy_reason": "default",
        "backend": "ollama",
        "local": True,
        "status": 200,
        "model": "llama3",
    }
    record.update(overrides)
    return record


def write_records(path: Path, records: list[dict[str, Any]]) -> None:
    log = AuditLog(path)
    try:
        for record in records:
            log.append(record)
    finally:
        log.close()


def write_public(path: Path, count: int) -> None:
    write_records(path, [make_record(n) for n in range(count)])


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def sha(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def problem_lines(report: AuditReport) -> list[str]:
    return [problem.split(":", 1)[0] for problem in report.problems]


# appending


def test_each_line_names_the_hash_of_the_line_before(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_public(path, 3)
    lines = lines_of(path)
    assert path.read_bytes().endswith(b"\n")
    prevs = [orjson.loads(line)["prev"] for line in lines]
    assert prevs == [GENESIS, sha(lines[0]), sha(lines[1])]


def test_the_callers_fields_are_kept_and_a_utc_timestamp_added(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_records(path, [make_record(1, tokens=7), make_record(2, ts="2024-01-01T00:00:00Z")])
    first, second = (orjson.loads(line) for line in lines_of(path))
    assert first["request_id"] == "req-1"
    assert first["tokens"] == 7
    assert first["ts"].endswith("Z")
    assert first["ts"][:4].isdigit()
    assert second["ts"] == "2024-01-01T00:00:00Z"


def test_reopening_the_file_continues_its_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_public(path, 2)
    write_records(path, [make_record(9)])
    lines = lines_of(path)
    assert len(lines) == 3
    assert orjson.loads(lines[2])["prev"] == sha(lines[1])
    assert verify(path).ok


def test_the_last_line_is_found_past_the_read_chunk(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_records(path, [make_record(1, note="x" * 10_000), make_record(2, note="y" * 5000)])
    write_records(path, [make_record(3)])
    lines = lines_of(path)
    assert orjson.loads(lines[2])["prev"] == sha(lines[1])


def test_a_missing_directory_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="cannot open audit log"):
        AuditLog(tmp_path / "absent" / "audit.jsonl")


def test_a_directory_in_place_of_the_file_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="cannot open audit log"):
        AuditLog(tmp_path)


def test_appending_after_close_fails_clearly(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.close()
    log.close()
    with pytest.raises(AuditError, match="closed"):
        log.append(make_record(1))


def append_many(path: str, worker: int, count: int, start: Any) -> None:
    start.wait()
    log = AuditLog(path)
    try:
        for n in range(count):
            log.append(make_record(n, worker=worker))
    finally:
        log.close()


def test_two_processes_appending_at_once_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    workers = [context.Process(target=append_many, args=(str(path), worker, 200, start)) for worker in (1, 2)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=60)
    assert [process.exitcode for process in workers] == [0, 0]
    report = verify(path)
    assert report.problems == []
    assert report.records == 400
    written = [orjson.loads(line)["worker"] for line in lines_of(path)]
    assert written.count(1) == written.count(2) == 200


def test_threads_sharing_one_log_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)

    def append_some(worker: int) -> None:
        for n in range(100):
            log.append(make_record(n, worker=worker))

    threads = [threading.Thread(target=append_some, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    report = verify(path)
    assert report.problems == []
    assert report.records == 400


# verifying


def test_a_sound_log_is_summarised(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_records(
        path,
        [
            make_record(1),
            make_record(2, privacy="private", privacy_reason="header"),
            make_record(3, backend="openai", local=False),
            make_record(4, privacy="private", backend=None, local=None, status=503),
        ],
    )
    report = verify(path)
    assert report.ok
    assert report.records == 4
    assert report.problems == []
    assert report.by_privacy == {"private": 2, "public": 2}
    assert report.by_backend == {"(none)": 1, "ollama": 2, "openai": 1}
    assert report.private_off_premises == []
    assert report.head == sha(lines_of(path)[-1])


def test_an_empty_file_is_an_empty_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.touch()
    report = verify(path)
    assert report.ok
    assert report.records == 0
    assert report.head == GENESIS


def test_an_edited_record_breaks_the_next_lines_prev(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_public(path, 4)
    lines = lines_of(path)
    lines[1] = lines[1].replace(b'"status":200', b'"status":201')
    path.write_bytes(b"\n".join(lines) + b"\n")
    report = verify(path)
    assert not report.ok
    assert problem_lines(report) == ["line 3"]
    assert "line 2 was changed" in report.problems[0]


def test_an_edited_prev_is_caught_on_its_own_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_public(path, 3)
    lines = lines_of(path)
    lines[1] = lines[1].replace(sha(lines[0]).encode(), b"a" * 64)
    path.write_bytes(b"\n".join(lines) + b"\n")
    report = verify(path)
    assert problem_lines(report) == ["line 2", "line 3"]


def test_a_deleted_line_is_caught(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_public(path, 5)
    lines = lines_of(path)
    del lines[2]
    path.write_bytes(b"\n".join(lines) + b"\n")
    report = verify(path)
    assert not report.ok
    assert report.records == 4
    assert problem_lines(report) == ["line 3"]


def test_a_deleted_first_line_is_caught(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_public(path, 3)
    path.write_bytes(b"\n".join(lines_of(path)[1:]) + b"\n")
    report = verify(path)
    assert problem_lines(report) == ["line 1"]
    assert "genesis" in report.problems[0]


def test_swapped_lines_are_caught(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_public(path, 5)
    lines = lines_of(path)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_bytes(b"\n".join(lines) + b"\n")
    report = verify(path)
    assert not report.ok
    assert problem_lines(report) == ["line 2", "line 3", "line 4"]


def test_malformed_lines_are_reported_and_the_chain_runs_through_them(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_public(path, 2)
    with path.open("ab") as file:
        file.write(b"{not json\n")
        file.write(b"[1, 2]\n")
        file.write(b"\n")
        file.write(orjson.dumps({"request_id": "x", "privacy": "public"}) + b"\n")
    write_public(path, 1)
    report = verify(path)
    assert report.problems == [
        "line 3: not valid JSON",
        "line 4: not a JSON object",
        "line 5: empty line",
        "line 6: no prev hash",
    ]
    assert report.records == 4
    assert not report.ok


def test_a_torn_last_line_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_public(path, 3)
    path.write_bytes(path.read_bytes()[:-20])
    report = verify(path)
    assert not report.ok
    assert report.records == 2
    assert problem_lines(report) == ["line 3"]
    assert "incomplete last line" in report.problems[0]


def test_an_append_after_a_torn_line_starts_a_new_line_and_keeps_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_public(path, 3)
    path.write_bytes(path.read_bytes()[:-20])
    torn = lines_of(path)[-1]
    write_public(path, 2)
    lines = lines_of(path)
    assert len(lines) == 5
    assert lines[2] == torn
    assert orjson.loads(lines[3])["prev"] == sha(torn)
    report = verify(path)
    assert report.problems == ["line 3: not valid JSON"]
    assert report.records == 4


def test_a_last_line_that_lost_only_its_newline_is_whole_once_followed(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_public(path, 2)
    path.write_bytes(path.read_bytes()[:-1])
    assert problem_lines(verify(path)) == ["line 2"]
    write_public(path, 1)
    report = verify(path)
    assert report.ok
    assert report.records == 3


def test_a_private_request_served_by_a_cloud_backend_is_flagged(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_records(
        path,
        [
            make_record(1, privacy="private"),
            make_record(2, privacy="private", backend="openai", local=False),
            make_record(3, privacy="public", backend="openai", local=False),
        ],
    )
    report = verify(path)
    assert report.problems == []
    assert not report.ok
    assert report.private_off_premises == ["req-2 (line 2, backend openai)"]


def test_a_private_request_with_unknown_locality_is_flagged(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_records(path, [make_record(1, privacy="private", backend="gemini", local=None)])
    assert verify(path).private_off_premises == ["req-1 (line 1, backend gemini)"]


def test_a_private_request_that_reached_no_backend_is_not_flagged(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_records(path, [make_record(1, privacy="private", backend=None, local=None, status=503)])
    report = verify(path)
    assert report.ok
    assert report.private_off_premises == []
    assert report.by_backend == {"(none)": 1}


def test_an_unreadable_path_raises_an_audit_error(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="cannot read audit log"):
        verify(tmp_path / "absent.jsonl")


# the summary


def test_the_summary_lists_problems_up_to_a_limit(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"garbage\n" * (SHOWN + 5))
    text = format_report(verify(path))
    assert f"chain: BROKEN ({SHOWN + 5} problems)" in text
    assert f"line {SHOWN}: not valid JSON" in text
    assert f"line {SHOWN + 1}:" not in text
    assert "and 5 more" in text


def test_the_summary_of_a_sound_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_public(path, 2)
    report = verify(path)
    text = format_report(report)
    assert "records: 2" in text
    assert "chain: OK" in text
    assert "by privacy: public 2" in text
    assert "by backend: ollama 2" in text
    assert "private requests served by a non-local backend: none" in text
    assert f"head: {report.head}" in text
    assert text.endswith("result: OK")


# the command line


def test_cli_exits_0_on_a_sound_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.jsonl"
    write_public(path, 3)
    assert main(["audit", "verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert "records: 3" in out
    assert "chain: OK" in out


def test_cli_exits_1_on_a_broken_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.jsonl"
    write_public(path, 3)
    lines = lines_of(path)
    path.write_bytes(b"\n".join([lines[0], lines[2]]) + b"\n")
    assert main(["audit", "verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert "chain: BROKEN (1 problem)" in out
    assert "line 2: prev does not match line 1" in out


def test_cli_exits_1_when_a_private_request_left(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.jsonl"
    write_records(path, [make_record(1, privacy="private", backend="openai", local=False)])
    assert main(["audit", "verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert "chain: OK" in out
    assert "private requests served by a non-local backend: 1" in out
    assert "req-1 (line 1, backend openai)" in out


def test_cli_exits_2_when_the_file_cannot_be_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", str(tmp_path / "absent.jsonl")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: cannot read audit log")
    assert captured.err.count("\n") == 1


def test_a_record_that_cannot_be_written_is_counted_for_the_alert(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    audit.close()  # as good as a full disk: every append fails
    metrics = Metrics()
    Exchange("r-1", "chat").finish(200, metrics, get_logger(), audit)
    assert metrics.registry.get_sample_value("gateway_audit_write_failures_total") == 1


# another process's lock


@contextmanager
def locked_elsewhere(path: Path) -> Iterator[None]:
    """Hold the file's flock as another process would, through a descriptor of its own, until the
    block ends or 5 s have passed (so that an append that waits for it does not wait for ever)."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held.set()
            release.wait(5)
        finally:
            os.close(fd)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(5)
    try:
        yield
    finally:
        release.set()
        holder.join()


async def written(path: Path, count: int) -> list[bytes]:
    for _ in range(500):
        if len(lines := lines_of(path)) >= count:
            return lines
        await asyncio.sleep(0.01)
    raise AssertionError(f"{path} still has {len(lines_of(path))} lines, not {count}")


def test_on_a_loop_an_append_hands_its_record_over_instead_of_waiting_for_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_public(path, 1)

    async def scenario() -> list[bytes]:
        log = AuditLog(path)
        with locked_elsewhere(path):
            for n in range(1, 4):
                log.append(make_record(n))  # returns at once, or the lock is never released
            assert len(lines_of(path)) == 1
        log.append(make_record(4))  # behind the three, though the lock is free now
        lines = await written(path, 5)
        log.close()
        return lines

    lines = asyncio.run(scenario())
    assert [orjson.loads(line)["request_id"] for line in lines] == [f"req-{n}" for n in range(5)]
    report = verify(path)
    assert (report.problems, report.records) == ([], 5)


def test_a_backlog_left_by_the_lock_is_written_in_memory_about_its_own_size(tmp_path: Path) -> None:
    """Records that waited for another process's lock are written in one go once it is free: that
    must not take many times their size (orjson's bytes keep 4 KiB each, whatever their length)."""
    path = tmp_path / "audit.jsonl"
    count = 20_000

    async def scenario() -> tuple[int, int]:
        log = AuditLog(path)
        with locked_elsewhere(path):
            for n in range(count):
                log.append(make_record(n))
            tracemalloc.start()
        try:
            await log.aclose()  # once the backlog is written
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        return peak, path.stat().st_size

    peak, size = asyncio.run(scenario())
    assert verify(path).records == count
    assert peak < 4 * size, f"writing {size} bytes of records took {peak} bytes"


def test_records_past_the_limit_of_those_waiting_for_the_lock_fail_instead_of_piling_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_module, "WAITING_LIMIT", 3, raising=False)
    path = tmp_path / "audit.jsonl"

    async def scenario() -> list[str]:
        log = AuditLog(path)
        refused = []
        with locked_elsewhere(path):
            for n in range(5):
                try:
                    log.append(make_record(n))
                except AuditError as error:
                    refused.append(str(error))
        await written(path, 3)  # the lock is free: the three that waited go first
        log.append(make_record(5))
        await log.aclose()
        return refused

    refused = asyncio.run(scenario())
    assert (
        refused
        == [
            f"cannot write audit log {path}: another process has held its lock while 3 records came,"
            " and no more can wait"
        ]
        * 2
    )
    assert [orjson.loads(line)["request_id"] for line in lines_of(path)] == [
        "req-0",
        "req-1",
        "req-2",
        "req-5",
    ]
    assert verify(path).ok


def test_records_still_waiting_for_the_lock_at_close_are_reported_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_module, "CLOSE_GRACE", 0.05)
    path = tmp_path / "audit.jsonl"
    lost: list[tuple[str, int]] = []

    async def scenario() -> None:
        log = AuditLog(path, on_failure=lambda error, records: lost.append((str(error), records)))
        with locked_elsewhere(path):
            log.append(make_record(1))
            log.append(make_record(2))
            log.close()
            with pytest.raises(AuditError, match="closed"):
                log.append(make_record(3))
            for _ in range(300):
                if lost:
                    break
                await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert lost == [(f"cannot write audit log {path}: closed while another process held its lock", 2)]
    assert path.read_bytes() == b""


def test_the_gateways_audit_file_counts_and_logs_what_its_writer_thread_lost(tmp_path: Path) -> None:
    config = parse_config(
        {
            "backends": [{"name": "ollama", "type": "ollama", "base_url": "http://127.0.0.1:9"}],
            "models": [{"name": "llama3", "deployments": [{"backend": "ollama"}]}],
            "privacy": {"audit_log": str(tmp_path / "audit.jsonl")},
        },
        "test",
    )
    lines, before = io.StringIO(), structlog.get_config()
    try:
        configure("info", stream=lines)
        state = State.build(config, {})
        assert state.audit is not None and state.audit.on_failure is not None
        state.audit.on_failure(AuditError("cannot write audit log: No space left on device"), 3)
        state.audit.close()
    finally:
        structlog.configure(**before)
    assert state.metrics.registry.get_sample_value("gateway_audit_write_failures_total") == 3
    line = orjson.loads(lines.getvalue().splitlines()[-1])
    assert (line["event"], line["records"]) == ("audit write failed", 3)


def test_aclose_returns_once_waiting_records_are_reported_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_module, "CLOSE_GRACE", 0.05)
    path = tmp_path / "audit.jsonl"
    lost: list[int] = []

    async def scenario() -> None:
        log = AuditLog(path, on_failure=lambda error, records: lost.append(records))
        with locked_elsewhere(path):
            log.append(make_record(1))
            await log.aclose()  # the lock is still held: the record is given up, and said so
            assert lost == [1]

    asyncio.run(scenario())
