"""``gradwatch stacks RUN``: where each rank of a live run is, from its own stack dump (probes/stacks.py), with
real gloo processes: the rank that stopped before a step is named with its frame, the others are grouped in
DDP's backward pass, where its all-reduce waits for it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gradwatch
from gradwatch.spool.format import SpoolLayout
from tests.conftest import SUPPORT, wait_until

SCRIPT = SUPPORT / "user_scripts" / "hung_rank.py"


def _steps(home: Path, rank: int) -> int:
    try:
        steps = gradwatch.read_run("hung", home).rank(rank).steps
    except Exception:
        return 0
    return steps[-1].step if steps else 0


@pytest.mark.integration
def test_the_stuck_rank_is_named_with_its_frame_and_the_others_grouped(isolated_home: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from gradwatch.cli import main

    release = tmp_path / "release"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3", str(SCRIPT),
               str(release), "--stuck-rank", "1", "--stuck-at", "5"]
    env = {**os.environ, "GRADWATCH_HOME": str(isolated_home), "GRADWATCH_AUTOSTART": "0", "GRADWATCH_STACK_DUMPS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: all(_steps(isolated_home, r) == 4 for r in range(3)), timeout=120,
                   what="every rank at step 4, rank 1 stuck before step 5")
        time.sleep(1.0)  # ranks 0 and 2 into step 5's backward, waiting
        main(["stacks", "hung", "--home", str(isolated_home)])
        out = capsys.readouterr().out
        summary = out.splitlines()[0]
        assert summary.startswith("run hung: rank 1 in `wait_for_release` (hung_rank.py:"), out
        assert "; ranks 0 and 2 in " in summary and "inside autograd's backward pass" in summary, out
        assert "from `main` (hung_rank.py:" in summary  # the script's own line under the library frames
        dump = SpoolLayout.stacks_file(SpoolLayout(isolated_home).run_dir("hung"), 1)
        assert oct(dump.stat().st_mode & 0o777) == "0o600"
    finally:
        release.touch()
        output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0, output[-3000:]  # the signal cost the run nothing: it ended normally
    assert all(_steps(isolated_home, r) == 10 for r in range(3))


def test_a_process_that_is_not_the_runs_is_never_signalled(isolated_home: Path) -> None:
    """A metadata file naming a pid whose start time is not the recorded one (a pid reused, or forged): left
    alone and said why; a rank without a dump signal, too."""
    import json
    import socket

    from gradwatch.spool.records import RunMeta, meta_to_json
    from gradwatch.stacks import collect, summary

    run_dir = SpoolLayout(isolated_home).run_dir("other")
    run_dir.mkdir(parents=True)
    me = RunMeta(run="other", rank=0, world_size=2, host=socket.gethostname(), pid=os.getpid(),
                 proc_start_ticks=1, stack_signal=40)
    (run_dir / "rank-0.meta.json").write_text(json.dumps(meta_to_json(me)))
    (run_dir / "rank-1.meta.json").write_text(json.dumps(meta_to_json(RunMeta(run="other", rank=1, world_size=2,
                                                                               host=socket.gethostname(),
                                                                               pid=os.getpid()))))
    stacks = collect("other", isolated_home, timeout=0.5)
    assert [s.error for s in stacks] == ["its process has ended", (
        "its probe dumps no stacks (GRADWATCH_STACK_DUMPS=1 not set, an older gradwatch, or another probe of the "
        "process)")]
    assert summary("other", stacks).startswith("run other: rank 0 unknown: its process has ended")


def test_faulthandlers_own_dump_is_read_thread_by_thread(tmp_path: Path) -> None:
    """The parser on what faulthandler writes in this interpreter: the main thread's frames, innermost first,
    end in this test; a waiting thread is found by its ident."""
    import faulthandler
    import threading

    from gradwatch.stacks import RankStacks, parse_dump

    release = threading.Event()

    def parked() -> None:
        release.wait()
    thread = threading.Thread(target=parked)
    thread.start()
    try:
        path = tmp_path / "dump.txt"
        with open(path, "w") as f:
            faulthandler.dump_traceback(f, all_threads=True)
        threads = parse_dump(path.read_text())
    finally:
        release.set()
        thread.join()
    main = threads[threading.main_thread().ident or 0]
    assert main[0].function == "test_faulthandlers_own_dump_is_read_thread_by_thread"
    assert not main[0].library and any(f.library for f in main)  # this file; pytest's machinery further out
    assert any(f.function == "parked" for f in threads[thread.ident or 0])
    stacks = RankStacks(rank=0, pid=1, threads=threads, main_thread=threading.main_thread().ident or 0)
    assert stacks.where().startswith("`test_faulthandlers_own_dump_is_read_thread_by_thread` (test_stacks.py:")
