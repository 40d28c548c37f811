"""Run-facing output: progress bars only on a terminal."""

from __future__ import annotations

import io

from data.runinfo import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def drawn(out: io.StringIO, enabled: bool) -> str:
    for _ in progress_bar(range(3), enabled, file=out, desc="read transactions"):
        pass
    return out.getvalue()


def test_progress_bar_only_on_a_terminal():
    assert "read transactions" in drawn(Terminal(), True)
    assert drawn(io.StringIO(), True) == ""  # a log file or a pipe: no bar lines
    assert drawn(Terminal(), False) == ""  # turned off (trainer.progress=false, ranks other than 0)
