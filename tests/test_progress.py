"""Progress output: a few plain lines (no carriage returns) when stderr is not a terminal."""

from __future__ import annotations

import io

from kfacbound.progress import LOG_LINES, LineProgress, progress_bar


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_file_gets_a_few_lines_without_carriage_returns():
    buf = io.StringIO()
    bar = progress_bar(20000, "posterior", True, "step", range(20000), file=buf)
    assert isinstance(bar, LineProgress)
    for i in bar:
        if i % 100 == 0:
            bar.set_postfix(kl=f"{i}", refresh=False)
    text = buf.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert LOG_LINES - 1 <= len(lines) <= LOG_LINES + 1  # ~one per tenth, plus the summary
    assert lines[-1].startswith("posterior: done 100% (20000/20000 step)")
    assert "kl=19900" in lines[-1]


def test_update_and_context_manager_and_unknown_total():
    buf = io.StringIO()
    with progress_bar(1000, "MC samples", True, "draw", file=buf) as bar:
        for _ in range(10):
            bar.update(100)
    assert buf.getvalue().count("\n") <= LOG_LINES + 1
    buf = io.StringIO()
    bar = LineProgress(total=None, desc="x", file=buf, interval=1e9)
    for _ in range(5000):
        bar.update()
    bar.close()
    bar.close()  # idempotent
    assert buf.getvalue().splitlines() == [buf.getvalue().splitlines()[0]]
    assert "done" in buf.getvalue()


def test_terminal_gets_tqdm_and_disabled_prints_nothing():
    tty = FakeTTY()
    bar = progress_bar(10, "t", True, file=tty)
    assert not isinstance(bar, LineProgress)
    bar.close()
    buf = io.StringIO()
    for _ in progress_bar(10, "off", False, iterable=range(10), file=buf):
        pass
    assert buf.getvalue() == ""
