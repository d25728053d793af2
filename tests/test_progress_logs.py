"""Progress off a terminal (issue 16, item 5): plain lines at a steady interval, or JSON lines
with `--log-format json`; driven with a fake clock, never by sleeping."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from mposurgeon.cli import options as opt
from mposurgeon.cli import render
from mposurgeon.cli.render import ProgressLog, fmt_duration, progress_bar, progress_line
from mposurgeon.errors import UsageError
from tests.cli_runner import assert_one_line_error, run_cli

FIELDS = {
    "event",
    "task",
    "description",
    "done",
    "total",
    "elapsed_s",
    "rate_per_s",
    "remaining_s",
    "time",
}
T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


class FakeClock:
    """A monotonic clock (seconds) the test sets, and the matching UTC wall time."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def now(self) -> datetime:
        return T0 + timedelta(seconds=self.t)


def make_log(
    log_format: str = "text", interval: float = 30.0
) -> tuple[ProgressLog, list[str], FakeClock]:
    """A `ProgressLog` writing into a list, on a fake clock."""
    lines: list[str] = []
    clock = FakeClock()
    log = ProgressLog(lines.append, log_format, interval, clock=clock, now=clock.now)
    return log, lines, clock


def train_steps(log: ProgressLog, clock: FakeClock, total: int, seconds_per_step: float) -> None:
    """Report steps 1..total of "train loss ..." (step k at k * seconds_per_step)."""
    for step in range(1, total + 1):
        clock.t = step * seconds_per_step
        log(f"train loss {1 / step:.4f}", step, total)


def assert_plain(lines: list[str]) -> None:
    """No ANSI escape (colour, cursor movement) and no carriage return in `lines`."""
    for line in lines:
        assert "\x1b" not in line and "\r" not in line, repr(line)


def test_text_lines_come_at_the_interval_and_the_final_one_always() -> None:
    log, lines, clock = make_log("text", 30.0)
    train_steps(log, clock, 100, 1.0)
    # The run starts at its first report (step 1, t=1): lines at t=31, 61, 91, then the final.
    assert lines == [
        "train 31/100 (31%) loss 0.0323, 1.0 it/s, 0:30 elapsed, 1:09 left",
        "train 61/100 (61%) loss 0.0164, 1.0 it/s, 1:00 elapsed, 0:39 left",
        "train 91/100 (91%) loss 0.0110, 1.0 it/s, 1:30 elapsed, 0:09 left",
        "train 100/100 (100%) loss 0.0100, 1.0 it/s, 1:39 elapsed, 0:00 left",
    ]
    assert_plain(lines)


def test_at_most_one_line_per_interval_whatever_the_report_rate() -> None:
    log, lines, clock = make_log("text", 30.0)
    train_steps(log, clock, 1000, 0.25)  # 4 it/s for 250 s
    times = [line.split(", ")[2] for line in lines]
    assert times == ["0:30 elapsed", "1:00 elapsed", "1:30 elapsed", "2:00 elapsed"] + [
        "2:30 elapsed",
        "3:00 elapsed",
        "3:30 elapsed",
        "4:00 elapsed",
        "4:09 elapsed",  # the final report, 9.75 s after the last line
    ]
    assert all(", 4.0 it/s, " in line for line in lines)


def test_a_quick_task_prints_no_text_line_but_a_final_json_one() -> None:
    text, text_lines, text_clock = make_log("text", 30.0)
    train_steps(text, text_clock, 10, 0.5)
    assert text_lines == []
    log, lines, clock = make_log("json", 30.0)
    train_steps(log, clock, 10, 0.5)
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["done"] == event["total"] == 10 and event["remaining_s"] == 0.0


def test_json_lines_parse_with_every_field() -> None:
    log, lines, clock = make_log("json", 30.0)
    train_steps(log, clock, 100, 1.0)
    events = [json.loads(line) for line in lines]
    assert [e["done"] for e in events] == [31, 61, 91, 100]
    for event in events:
        assert set(event) == FIELDS
        assert event["event"] == "progress" and event["task"] == "train"
        assert event["description"].startswith("train loss ") and event["total"] == 100
    first = events[0]
    assert first["description"] == "train loss 0.0323"
    assert first["elapsed_s"] == 30.0 and first["rate_per_s"] == 1.0
    assert first["remaining_s"] == 69.0
    when = datetime.fromisoformat(first["time"].replace("Z", "+00:00"))
    assert when == T0 + timedelta(seconds=31) and when.utcoffset() == timedelta(0)
    assert_plain(lines)


def test_json_line_of_a_first_report_has_no_rate_yet() -> None:
    log, lines, clock = make_log("json", 0.0)
    clock.t = 5.0
    log("decompose", 1, 4)
    event = json.loads(lines[0])
    assert event["elapsed_s"] == 0.0 and event["rate_per_s"] is None
    assert event["remaining_s"] is None
    clock.t = 7.0
    log("decompose", 3, 4)
    event = json.loads(lines[1])
    assert event["rate_per_s"] == 1.0 and event["remaining_s"] == 1.0


def test_tasks_are_timed_apart_and_a_repeated_task_starts_again() -> None:
    log, lines, clock = make_log("text", 30.0)
    clock.t = 0.0
    log("train loss 0.9000", 1, 100)
    clock.t = 10.0
    log("eval", 1, 2)
    clock.t = 50.0
    log("eval", 2, 2)  # final, and the eval ran 40 s: its line comes
    clock.t = 51.0
    log("train loss 0.8000", 2, 100)  # train's own interval: 51 s since its start
    clock.t = 60.0
    log("eval", 1, 2)  # a second evaluation: a new run, timed from here
    clock.t = 61.0
    log("eval", 2, 2)  # final after 1 s: a quick run prints nothing
    assert lines == [
        "eval 2/2 (100%), 40.0 s/it, 0:40 elapsed, 0:00 left",
        "train 2/100 (2%) loss 0.8000, 51.0 s/it, 0:51 elapsed, 1:23:18 left",
    ]


def test_interval_zero_writes_every_report() -> None:
    log, lines, clock = make_log("text", 0.0)
    train_steps(log, clock, 3, 2.0)
    assert lines == [
        "train 1/3 (33%) loss 1.0000, 0:00 elapsed",
        "train 2/3 (66%) loss 0.5000, 2.0 s/it, 0:02 elapsed, 0:02 left",
        "train 3/3 (100%) loss 0.3333, 2.0 s/it, 0:04 elapsed, 0:00 left",
    ]


def test_line_and_duration_formats() -> None:
    assert fmt_duration(0) == "0:00" and fmt_duration(59.9) == "0:59"
    assert fmt_duration(3725) == "1:02:05" and fmt_duration(-1) == "0:00"
    assert (
        progress_line("export", 1, 1, 0.0, None, 0.0)
        == "export 1/1 (100%), 0:00 elapsed, 0:00 left"
    )
    assert progress_line("score", 0, 0, 3.0, None, None) == "score 0/0, 0:03 elapsed"


@pytest.mark.parametrize(
    ("log_format", "interval", "needle"),
    [("xml", 30.0, "unknown log format 'xml'"), ("text", -1.0, "0 or more seconds")],
)
def test_bad_log_options_are_usage_errors(log_format: str, interval: float, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        ProgressLog(print, log_format, interval)
    with pytest.raises(UsageError, match=needle), progress_bar(False, log_format, interval):
        pass


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], None]:
    """Make the stderr console a terminal or not."""

    def set_terminal(is_terminal: bool) -> None:
        monkeypatch.setattr(render._Console, "is_terminal", property(lambda self: is_terminal))

    return set_terminal


def report_three(progress: Callable[[str, int, int], None] | None) -> None:
    """Report a 3-unit "decompose" through `progress` (which must not be None)."""
    assert progress is not None
    for done in (1, 2, 3):
        progress("decompose", done, 3)


def test_progress_bar_writes_plain_lines_off_a_terminal(
    capsys: pytest.CaptureFixture[str],
    terminal: Callable[[bool], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RANK", raising=False)
    terminal(False)
    with progress_bar(False, "text", 0.0) as progress:
        assert isinstance(progress, ProgressLog)
        report_three(progress)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "decompose 1/3 (33%)",
        "decompose 2/3 (66%)",
        "decompose 3/3 (100%)",
    ]
    assert_plain(lines)


def test_progress_bar_writes_json_on_a_terminal_too(
    capsys: pytest.CaptureFixture[str],
    terminal: Callable[[bool], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RANK", raising=False)
    terminal(True)
    with progress_bar(False, "json", 0.0) as progress:
        assert isinstance(progress, ProgressLog)
        report_three(progress)
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(e["task"], e["done"], e["total"]) for e in events] == [
        ("decompose", i, 3) for i in (1, 2, 3)
    ]
    with progress_bar(False, "text", 0.0) as bar:
        assert bar is not None and not isinstance(bar, ProgressLog)  # the rich bar


def test_progress_bar_is_silent_when_quiet_or_not_the_main_process(
    terminal: Callable[[bool], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    terminal(False)
    with progress_bar(True, "json", 0.0) as progress:
        assert progress is None
    monkeypatch.setenv("RANK", "1")  # a second process of accelerate launch / torchrun
    with progress_bar(False, "json", 0.0) as progress:
        assert progress is None
    monkeypatch.setenv("RANK", "0")
    with progress_bar(False, "json", 0.0) as progress:
        assert isinstance(progress, ProgressLog)


def test_json_out_silences_text_progress_but_not_json_lines() -> None:
    assert opt.StageFlags(json_out=True).no_progress
    assert not opt.StageFlags(json_out=True, log_format="json").no_progress
    assert opt.StageFlags(quiet=True, log_format="json").no_progress
    assert not opt.StageFlags().no_progress
    assert opt.StageFlags().log_format == "text" and opt.StageFlags().log_interval == 30.0


def test_cli_decompose_writes_json_progress_lines(
    tiny_model_dir: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RANK", raising=False)
    bert = tiny_model_dir("bert")
    out = tmp_path / "dec"
    args = ("decompose", bert, "-o", out, "--layers", "FFN_1", "-n", "3")
    plain = run_cli(capsys, *args, "-q")
    assert plain.code == 0, plain
    logged = run_cli(capsys, *args, "--overwrite", "--log-format", "json", "--log-interval", "0")
    assert logged.code == 0, logged
    assert logged.out == plain.out  # stdout is the same report
    events = [json.loads(line) for line in logged.err.splitlines()]
    assert events and all(set(e) == FIELDS and e["event"] == "progress" for e in events)
    decompose = [e for e in events if e["task"] == "decompose"]
    assert [e["done"] for e in decompose] == list(range(1, decompose[0]["total"] + 1))
    assert decompose[-1]["remaining_s"] == 0.0
    # With --json, stdout stays the one object and the progress lines still come on stderr.
    both = run_cli(capsys, *args, "--overwrite", "--json", "--log-format", "json")
    assert both.code == 0, both
    assert json.loads(both.out)["output"] == str(out)
    finals = [json.loads(line) for line in both.err.splitlines()]
    assert any(e["task"] == "decompose" and e["done"] == e["total"] for e in finals)


def test_cli_text_progress_lines_off_a_terminal(
    tiny_model_dir: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RANK", raising=False)
    args = ("decompose", tiny_model_dir("bert"), "-o", tmp_path / "d", "--layers", "FFN_1")
    result = run_cli(capsys, *args, "--log-interval", "0")
    assert result.code == 0, result
    lines = result.err.splitlines()
    assert lines and all(line.startswith("decompose ") and " elapsed" in line for line in lines)
    assert lines[-1].split(",")[0].endswith("(100%)")
    assert_plain(lines)


def test_cli_refuses_a_bad_log_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "decompose", tmp_path, "--log-format", "xml")
    assert_one_line_error(result, 2, "--log-format", "'xml' is not one of text, json")
    result = run_cli(capsys, "train", tmp_path, "--log-interval", "-5")
    assert_one_line_error(result, 2, "--log-interval")
