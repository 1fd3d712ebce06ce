"""`recstream run` holds a run slot: its consumers' static group instance id."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

from cli.run import instance_slot


def _hold(directory: Path, ready: multiprocessing.synchronize.Event) -> None:
    with instance_slot(directory):
        ready.set()
        signal.pause()


def test_consecutive_runs_share_an_id_and_concurrent_runs_do_not(tmp_path: Path) -> None:
    with instance_slot(tmp_path) as first, instance_slot(tmp_path) as beside:
        assert beside != first
    with instance_slot(tmp_path) as again:
        assert again == first


def test_a_killed_run_releases_its_slot(tmp_path: Path) -> None:
    ready = multiprocessing.get_context("fork").Event()
    holder = multiprocessing.get_context("fork").Process(target=_hold, args=(tmp_path, ready))
    holder.start()
    try:
        assert ready.wait(10)
        with instance_slot(tmp_path) as while_held:
            pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
        with instance_slot(tmp_path) as after_kill:
            assert after_kill != while_held
            assert after_kill.endswith("-run0")
    finally:
        if holder.is_alive():
            holder.kill()
