"""A restarted agent goes on where it stopped: nothing lost, nothing counted twice."""

from __future__ import annotations

from pathlib import Path

from gradwatch.agent.checkpoint import load_checkpoint, save_checkpoint
from gradwatch.agent.ingest import SpoolIngestor
from gradwatch.agent.state import AgentState
from tests.agent.helpers import FakeClock, SpoolBuilder


def _fresh(spool: SpoolBuilder) -> tuple[AgentState, SpoolIngestor]:
    state = AgentState(spike_window=60.0)
    return state, SpoolIngestor(spool.layout, state, FakeClock())


def _build(spool: SpoolBuilder, part: int) -> None:
    if part == 0:
        spool.start("r")
        spool.steps("r", 0, 1, 40, nan_every=7)
    elif part == 1:
        spool.steps("r", 0, 41, 70, nan_every=7)
        spool.start("r2")
        spool.steps("r2", 0, 1, 5)
    else:
        spool.steps("r", 0, 71, 100, nan_every=7)
        spool.end("r", 0, 100)


def _comparable(state: AgentState) -> dict[str, object]:
    """The state, less which files it was read from (two spools' inode numbers differ)."""
    saved = state.state_dict()
    for ranks in saved["runs"].values():
        for rank in ranks.values():
            del rank["records_inode"], rank["meta_stamp"]
    return saved


def test_crash_after_a_checkpoint_then_restart_gives_exactly_the_uninterrupted_state(tmp_path: Path) -> None:
    reference_spool = SpoolBuilder(tmp_path / "reference")
    reference, reference_ingest = _fresh(reference_spool)
    spool = SpoolBuilder(tmp_path / "restarted")
    first, first_ingest = _fresh(spool)

    _build(spool, 0)
    _build(reference_spool, 0)
    first_ingest.scan_all()
    save_checkpoint(spool.layout.checkpoint_file, first)
    _build(spool, 1)
    _build(reference_spool, 1)
    first_ingest.scan_all()  # ingested but never checkpointed: lost in the crash, must be re-read once
    del first, first_ingest  # SIGKILL

    second, second_ingest = _fresh(spool)
    assert load_checkpoint(spool.layout.checkpoint_file, second)
    _build(spool, 2)
    _build(reference_spool, 2)
    second_ingest.scan_all()
    reference_ingest.scan_all()

    assert _comparable(second) == _comparable(reference)
    r = second.rank("r", 0)
    assert r is not None
    assert (r.steps_total, r.records, r.samples_total, r.nonfinite["loss"]) == (100, 201, 800.0, 14)


def test_an_unusable_checkpoint_is_set_aside_and_the_spool_reread_from_the_start(tmp_path: Path) -> None:
    spool = SpoolBuilder(tmp_path)
    _build(spool, 0)
    spool.layout.agent_dir.mkdir(parents=True)
    spool.layout.checkpoint_file.write_text("{truncated")
    state, ingest = _fresh(spool)
    assert not load_checkpoint(spool.layout.checkpoint_file, state)
    assert spool.layout.checkpoint_file.with_suffix(".unusable.json").exists()
    ingest.scan_all()
    assert state.rank("r", 0).samples_total == 320.0  # type: ignore[union-attr]


def _saved(path: Path) -> dict[str, object]:
    import json

    payload = json.loads(path.read_text())
    del payload["saved_at"]
    return payload  # type: ignore[no-any-return]


def test_a_checkpoint_encodes_only_the_runs_that_changed_and_saves_what_a_whole_encoding_saves(tmp_path: Path) -> None:
    """Incremental checkpoints (CheckpointWriter): idle runs cost nothing to save, and every save, made of the text
    of unchanged runs and the new text of the others, is the same checkpoint as one encoded whole."""
    from gradwatch.agent.checkpoint import CheckpointWriter

    spool = SpoolBuilder(tmp_path)
    state, ingest = _fresh(spool)
    for run in ("a", "b", "c"):
        spool.start(run)
        spool.steps(run, 0, 1, 10, nan_every=4)
    ingest.scan_all()
    writer = CheckpointWriter()
    path, whole = spool.layout.checkpoint_file, tmp_path / "whole.json"

    def save_both() -> int:
        writer.save(path, state)
        save_checkpoint(whole, state)
        assert _saved(path) == _saved(whole)
        return writer.encoded_last

    assert save_both() == 3
    assert save_both() == 0  # nothing changed
    spool.steps("b", 0, 11, 12)
    ingest.scan_all()
    assert save_both() == 1  # b's records
    spool.end("c", 0, 10)
    ingest.scan_all()
    state.refresh(FakeClock()(), stall_after=1e9, ended_ttl=1e9, local_host="x")
    assert save_both() == 1  # c ended
    clock = FakeClock()
    state.refresh(clock() + 1e6, stall_after=10.0, ended_ttl=1e9, local_host="x")  # a and b stall: no record for it
    assert save_both() == 2

    restored, _ = _fresh(spool)
    assert load_checkpoint(path, restored)
    assert _comparable(restored) == _comparable(state)


def test_rules_state_of_runs_not_seen_since_a_restart_is_kept_by_incremental_saves(tmp_path: Path) -> None:
    from gradwatch.agent.checkpoint import CheckpointWriter

    spool = SpoolBuilder(tmp_path)
    state, ingest = _fresh(spool)
    spool.start("a")
    spool.steps("a", 0, 1, 30)
    ingest.scan_all()
    save_checkpoint(spool.layout.checkpoint_file, state)
    rules_before = state.rules.state_dict()

    restarted = AgentState(spike_window=60.0)
    assert load_checkpoint(spool.layout.checkpoint_file, restarted)  # its rules wait in _saved until a record
    writer = CheckpointWriter()
    writer.save(spool.layout.checkpoint_file, restarted)
    writer.save(spool.layout.checkpoint_file, restarted)
    again = AgentState(spike_window=60.0)
    assert load_checkpoint(spool.layout.checkpoint_file, again)
    assert again.rules.state_dict() == rules_before
