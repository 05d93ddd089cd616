"""RUN/tasks.json under concurrent writers and crashes.

Every read-modify-write of the registry holds an exclusive ``fcntl`` lock on ``RUN/.tasks.lock``
and replaces the file atomically. The tests widen the race window on purpose (each writer
sleeps between reading the registry and writing it back), so without the lock an update WOULD
be lost; and they SIGKILL a writer in the middle of writing, holding the lock.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path
from typing import Any

from mptrec.pipeline.tasks.store import load_task_store, record_result, register_task
from tests.pipeline.tasks.test_store import make_run, task_toml

SLOW_WRITE_S = 0.4


def _slow_writes() -> None:
    """Sleep before every registry write: a writer then holds what it read for a while."""
    import mptrec.pipeline.tasks.store as reg

    original = reg.write_json_atomic

    def slow(path: Any, data: Any) -> None:
        if Path(path).name == reg.TASK_STORE_FILE:
            time.sleep(SLOW_WRITE_S)
        original(path, data)

    reg.write_json_atomic = slow  # type: ignore[assignment]


def _register(run: str, toml: str, start: Any) -> None:
    _slow_writes()
    start.wait()
    register_task(run, toml)


def _record(run: str, name: str, start: Any) -> None:
    _slow_writes()
    start.wait()
    record_result(run, name, metrics={"valid_auc": 0.75})


def _run_all(targets: list[tuple[Any, tuple[Any, ...]]]) -> None:
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(len(targets))
    procs = [ctx.Process(target=fn, args=(*args, start)) for fn, args in targets]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * len(procs)


def test_concurrent_registrations_and_results_all_land(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    register_task(run, task_toml(tmp_path, name="first"))
    tomls = [task_toml(tmp_path, name=f"new{i}") for i in range(2)]
    _run_all([(_register, (str(run), str(t))) for t in tomls] + [(_record, (str(run), "first"))])
    reg = load_task_store(run)
    assert {"ctr", "cvr", "first", "new0", "new1"} == set(reg["tasks"])  # no update lost
    assert reg["tasks"]["first"]["metrics"] == {"valid_auc": 0.75}
    for name in ("new0", "new1"):
        assert json.loads((run / "tasks" / name / "task.json").read_text())["name"] == name
    assert not list(run.glob(".tasks.json.tmp*"))


def _die_while_writing(run: str, toml: str) -> None:
    """Register, but get SIGKILLed halfway through writing tasks.json, holding the lock."""
    import mptrec.pipeline.tasks.store as reg

    def half_then_die(path: Any, data: Any) -> None:
        if Path(path).name == reg.TASK_STORE_FILE:
            tmp = Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps(data, indent=2)[:50])
            os.kill(os.getpid(), signal.SIGKILL)
        reg_write(path, data)

    reg_write = reg.write_json_atomic
    reg.write_json_atomic = half_then_die  # type: ignore[assignment]
    register_task(run, toml)


def test_a_writer_killed_mid_write_leaves_the_registry_whole_and_unlocked(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    register_task(run, task_toml(tmp_path, name="first"))
    before = (run / "tasks.json").read_bytes()
    proc = mp.get_context("spawn").Process(target=_die_while_writing,
                                           args=(str(run), str(task_toml(tmp_path, name="lost"))))
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == -signal.SIGKILL
    assert (run / "tasks.json").read_bytes() == before  # the old registry, whole
    assert set(load_task_store(run)["tasks"]) == {"ctr", "cvr", "first"}
    # the lock died with the process: the next writer gets it at once
    t0 = time.perf_counter()
    register_task(run, task_toml(tmp_path, name="after"))
    assert time.perf_counter() - t0 < 30
    assert set(load_task_store(run)["tasks"]) == {"ctr", "cvr", "first", "after"}
