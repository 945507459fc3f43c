"""Signs of life in a log: progress bars write one readable line per refresh when stderr is not a terminal."""

from __future__ import annotations

import egp_deploy.progress as progress


def test_bars_in_a_log_are_lines_with_counts_and_eta(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    for _ in progress.progress_bar(range(3), desc="prune iterations", unit="iter"):
        for _ in progress.progress_bar(range(2), desc="epoch", leave=False):
            pass
    err = capsys.readouterr().err  # pytest's capture is not a terminal: the log path
    assert "\r" not in err and "\x1b[" not in err
    lines = err.splitlines()
    assert any(line.startswith("prune iterations: 100%") and "3/3" in line for line in lines)
    assert all(line.strip() for line in lines)
    assert all(a != b for a, b in zip(lines, lines[1:]))  # the final state is not repeated on close
    assert any("<" in line for line in lines)  # elapsed<remaining: the ETA is there


def test_disabled_bar_writes_nothing(capsys):
    list(progress.progress_bar(range(3), desc="quiet", disable=True))
    assert capsys.readouterr().err == ""


def test_postfix_updates_do_not_flood_a_log(capsys):
    bar = progress.progress_bar(range(200), desc="epoch", unit="batch")
    for i in bar:
        bar.set_postfix(loss=f"{1 / (i + 1):.3f}")  # every batch, as the training loop does
    lines = capsys.readouterr().err.splitlines()
    assert 1 <= len(lines) <= 3, lines  # the start, the end, and at most one timed refresh
    assert "200/200" in lines[-1]
