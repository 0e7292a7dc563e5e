"""The progress line: an ETA from the steady rate (start-up left out), plain lines off a terminal."""

from __future__ import annotations

import io

from bigssl.eval.during_training import verdict
from bigssl.progress import ProgressLine, clock


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_clock_format():
    assert [clock(s) for s in (0, 7.4, 112, 3723)] == ["0:00", "0:07", "1:52", "1:02:03"]


def test_eta_leaves_the_start_up_window_out_and_logs_get_one_line_per_window():
    now, out = FakeClock(), io.StringIO()
    line = ProgressLine(total_steps=100, start_step=0, stream=out, tty=False, now=now)
    now.t += 60.0  # the first 10 steps carry a minute of worker start-up and first-batch cost
    line.update(10, {"loss": "6.1"})
    now.t += 5.0  # then 10 steps take 5 s: 2 steps/s, so 80 steps left take 40 s
    line.update(20, {"loss": "5.9"})
    now.t += 5.0
    line.update(30, {"loss": "5.7"})
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 3
    assert lines[0] == "bigssl: step 10/100 (10%) · loss 6.1 · elapsed 1:00 · ETA after the first steps"
    # An ETA from the whole elapsed time would say 45 s × 8 = 6:00 here; the steady rate says 0:40.
    assert lines[1] == "bigssl: step 20/100 (20%) · loss 5.9 · elapsed 1:05 · ETA 0:40"
    assert lines[2].endswith("elapsed 1:10 · ETA 0:35")


def test_rate_follows_the_recent_windows():
    now, out = FakeClock(), io.StringIO()
    line = ProgressLine(total_steps=10_000, start_step=0, stream=out, tty=False, now=now)
    for step in range(10, 260, 10):  # 1 s per 10 steps
        now.t += 1.0
        line.update(step, {})
    for step in range(260, 510, 10):  # then 4 s per 10 steps: the rate must follow within 20 windows
        now.t += 4.0
        line.update(step, {})
    assert abs(line.steps_per_s() - 2.5) < 1e-9


def test_terminal_line_is_rewritten_and_messages_print_above_it():
    now, out = FakeClock(), io.StringIO()
    line = ProgressLine(total_steps=4, start_step=0, stream=out, tty=True, now=now)
    now.t += 1
    line.update(2, {"loss": "1.0"})
    line.write("bigssl: a message")
    now.t += 1
    line.update(4, {"loss": "0.5"})
    line.close()
    text = out.getvalue()
    assert text.startswith("\rstep 2/4 (50%) · loss 1.0")
    # The message clears the live line, prints on its own line, and the live line comes back below it.
    assert "\r\x1b[Kbigssl: a message\nstep 2/4 (50%)" in text
    assert "\rstep 4/4 (100%) · loss 0.5 · elapsed 0:02 · ETA 0:00" in text and text.endswith("\n")


def test_resumed_run_counts_from_its_start_step():
    now, out = FakeClock(), io.StringIO()
    line = ProgressLine(total_steps=100, start_step=50, stream=out, tty=False, now=now)
    now.t += 30
    line.update(60, {})
    now.t += 2
    line.update(70, {})
    assert out.getvalue().splitlines()[1].endswith("ETA 0:06")  # 30 steps left at 5 steps/s


def test_verdict_names_what_was_beaten_and_what_was_not():
    assert verdict({"pixels": 0.8125, "random_init": 0.5295}, 0.85) == \
        "beats raw pixels (+0.0375) and random init (+0.3205)"
    assert verdict({"pixels": 0.8125, "random_init": 0.5295}, 0.80) == \
        "beats random init (+0.2705); does not beat raw pixels (-0.0125)"
    assert verdict({"random_init": 0.6}, 0.5) == "beats no baseline; does not beat random init (-0.1000)"
