"""Stage-1 training end to end on tiny shards: pipelined == plain, exact resume, golden losses, errors.

Multi-process runs are grouped so that each spawn amortises the TorchRec import cost: one
2-process spawn runs four trainings (pipelined, plain, killed, resumed), one 1-process spawn runs
the golden debug run and the input-error checks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from mptrec.pipeline.train.metrics_log import read_metrics
from tests.dist import run_multiprocess
from tests.pipeline.train.test_train_data import debug_config, write_tiny_shards

GOLDEN = Path(__file__).resolve().parents[2] / "golden" / "debug_losses.txt"


class _Killed(Exception):
    pass


def _train(data: Path, out: Path, overrides: list[str], *, resume: bool = False, kill_after: int = 0) -> Any:
    from mptrec.pipeline.train.pretrain import pretrain

    def on_step(step: int, parts: Mapping[str, torch.Tensor]) -> None:
        if kill_after and step == kill_after:
            raise _Killed

    cfg = debug_config(data, out, *overrides)
    try:
        return pretrain(cfg, device=torch.device("cpu"), resume=resume, progress=False, on_step=on_step)
    except _Killed:
        return None


def _counting_pipeline() -> Any:
    """Make the loop build a TrainPipelineSparseDist that counts its progress() calls."""
    import mptrec.pipeline.train.loop as loop

    class Counting(loop.TrainPipelineSparseDist):  # type: ignore[misc,type-arg]
        calls = 0

        def progress(self, dataloader_iter: Any) -> Any:
            Counting.calls += 1
            return super().progress(dataloader_iter)

    loop.TrainPipelineSparseDist = Counting  # type: ignore[misc]
    return Counting


def _two_process_runs(rank: int, world: int, data: str, tmp: str) -> dict[str, Any]:
    d, t = Path(data), Path(tmp)
    common = ["train.checkpoint_every=3", "train.keep_last=2"]
    counting = _counting_pipeline()
    full = _train(d, t / "full", common)
    pipelined_calls = counting.calls
    plain = _train(d, t / "plain", [*common, "train.pipelined=false"])
    plain_calls = counting.calls - pipelined_calls
    killed = _train(d, t / "killed", common, kill_after=8)
    resumed = _train(d, t / "killed", common, resume=True)
    return {"full": full.losses, "plain": plain.losses, "killed": killed,
            "resumed": resumed.losses, "valid_full": full.valid, "valid_resumed": resumed.valid,
            "em": (full.em_digest, resumed.em_digest), "steps": full.steps,
            "pipeline_calls": (pipelined_calls, plain_calls)}


@pytest.mark.slow
def test_pipelined_plain_and_killed_then_resumed_runs_give_the_same_losses(tmp_path: Path) -> None:
    # 11 row groups of 64 rows: rank 0 owns 6 and rank 1 owns 5 -> every epoch trains the minimum (5)
    data = write_tiny_shards(tmp_path / "data", rows={"train": 704, "valid": 256, "test": 64})
    results = run_multiprocess(_two_process_runs, 2, str(data), str(tmp_path))
    for r in results:
        assert r["steps"] == 10  # 2 epochs x min(6, 5) batches
        # the pipelined run really stepped through TrainPipelineSparseDist; the plain one never did
        assert r["pipeline_calls"][0] >= r["steps"] and r["pipeline_calls"][1] == 0
        assert [s for s, _ in r["full"]] == list(range(1, 11))
        # TrainPipelineSparseDist and the plain loop: the same loss at every step
        assert r["plain"] == r["full"]
        # killed after step 8 (last checkpoint: step 6, one batch into epoch 2, after an EM step);
        # the resumed run continues with exactly the uninterrupted run's losses
        assert r["killed"] is None
        assert [s for s, _ in r["resumed"]] == [7, 8, 9, 10]
        assert r["resumed"] == r["full"][6:]
        assert r["valid_resumed"] == r["valid_full"][1:]
        assert r["em"][0] == r["em"][1]
    assert results[0]["full"] != results[1]["full"]  # ranks train on different rows
    assert results[0]["em"] == results[1]["em"]  # the EM label store agrees across ranks
    lines = read_metrics(tmp_path / "killed")
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, 11))  # steps 7-8 not duplicated


def _one_process_checks(rank: int, world: int, data: str, tmp: str) -> dict[str, Any]:
    d, t = Path(data), Path(tmp)
    out: dict[str, Any] = {}
    golden = _train(d, t / "golden", [])
    out["golden"] = golden.losses
    out["valid"] = golden.valid
    out["best"] = golden.best_metric
    out["bf16"] = _train(d, t / "bf16", ['train.autocast="bf16"']).losses
    mid = _train(d, t / "mid", ["train.validate_every=4", "train.patience=0"])
    out["mid"] = {"losses": mid.losses, "valid_steps": [r["step"] for r in mid.valid]}
    stop = _train(d, t / "stop", ["train.validate_every=2", "train.patience=1", "train.lr=1.0"])
    out["stop"] = {"steps": stop.steps, "stopped": stop.stopped_early,
                   "valid_steps": [r["step"] for r in stop.valid]}
    cases = {
        "feature": ['features.include=["f0", "nope"]'],
        "label": ['tasks=[{name = "ctr", label = "clicks"}]'],
        "width": ["features.embedding_dim=6"],
        "adam": ["train.embedding_optimizer=adam"],
        "r_emb": ["model.r_emb=0.01"],
    }
    for name, overrides in cases.items():
        try:
            _train(d, t / name, overrides)
            out[name] = "no error"
        except Exception as e:  # noqa: BLE001 - the message is what the test checks
            out[name] = f"{type(e).__name__}: {e}"
    for name, overrides, resume in (("other_model", ["model.name=mmoe"], True), ("no_resume", [], False)):
        try:
            _train(d, t / "golden", overrides, resume=resume)
            out[name] = "no error"
        except Exception as e:  # noqa: BLE001
            out[name] = f"{type(e).__name__}: {e}"
    return out


@pytest.mark.slow
def test_debug_config_golden_losses_metrics_log_and_input_errors(tmp_path: Path) -> None:
    data = write_tiny_shards(tmp_path / "data")
    out = run_multiprocess(_one_process_checks, 1, str(data), str(tmp_path))[0]
    losses = [v for _, v in out["golden"]]
    assert len(losses) == 20
    if os.environ.get("MPTREC_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text("# step loss: configs/debug.toml on tests/pipeline/train/test_train_data.py's tiny "
                          "shards, 1 process (regenerate: MPTREC_UPDATE_GOLDEN=1 pytest -k golden)\n"
                          + "".join(f"{s} {v:.6f}\n" for s, v in out["golden"]))
    expected = [float(x.split()[1]) for x in GOLDEN.read_text().splitlines() if not x.startswith("#")]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-4, atol=1e-5)
    # train.autocast = "bf16": the same run in bfloat16 matmuls, close to fp32 but not the same numbers
    bf16 = [v for _, v in out["bf16"]]
    assert len(bf16) == 20 and bf16 != losses
    torch.testing.assert_close(torch.tensor(bf16), torch.tensor(losses), rtol=0.03, atol=0.0)
    # the tiny planted data is learnable: both AUCs above chance after 2 epochs
    assert all(v > 0.55 for v in out["valid"][-1]["auc"].values()), out["valid"]
    # metrics.jsonl: 20 step lines, and per epoch one EM and one validation line
    lines = read_metrics(tmp_path / "golden")
    steps = [x for x in lines if "loss" in x]
    assert len(steps) == 20 and set(steps[0]) == {"step", "epoch", "loss", "losses", "lr", "samples_per_s",
                                                  "alpha"}
    assert set(steps[0]["losses"]) == {"ctr", "cvr", "aux", "gan", "l2"}
    assert [x["epoch"] for x in lines if "cluster_sizes" in x] == [1, 2]
    valid = [x for x in lines if x.get("split") == "valid"]
    assert [x["epoch"] for x in valid] == [1, 2] and set(valid[0]["auc"]) == {"ctr", "cvr"}
    run = tmp_path / "golden"
    assert (run / "plan.txt").read_text().startswith("module: model.ebc")
    assert (run / "checkpoints" / "best" / "meta.json").is_file()
    # errors before any training, each naming what is wrong
    assert "ConfigError" in out["feature"] and "'nope'" in out["feature"]
    assert "ConfigError" in out["label"] and "'clicks'" in out["label"]
    assert "ShardingError" in out["width"] and "feature 'f0' has embedding_dim 6" in out["width"]
    assert "ShardingError" in out["adam"] and "needs CUDA" in out["adam"]
    assert "ShardingError" in out["r_emb"] and "every table data_parallel" in out["r_emb"]
    # validation inside the epoch (train.validate_every): every 4 steps and at each epoch end,
    # without changing the training (the pipeline is detached and re-attached around it)
    assert out["mid"]["valid_steps"] == [4, 8, 10, 12, 16, 20]
    assert out["mid"]["losses"] == out["golden"]
    # early stopping counts validation points and can stop mid-epoch
    assert out["stop"]["stopped"] and out["stop"]["steps"] < 20
    assert out["stop"]["valid_steps"][-1] == out["stop"]["steps"]
    assert "CheckpointError" in out["other_model"]
    assert "model 'mptrec'" in out["other_model"] and "model 'mmoe'" in out["other_model"]
    assert "CheckpointError" in out["no_resume"] and "--resume" in out["no_resume"]


def test_bf16_autocast_setting(tmp_path: Path) -> None:
    from mptrec.pipeline.train.loop import bf16_autocast, cpu_has_native_bf16

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not bf16_autocast("none", cuda) and bf16_autocast("bf16", cpu) and bf16_autocast("auto", cuda)
    with_bf16 = tmp_path / "with"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\n")
    without = tmp_path / "without"
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2\n")
    assert cpu_has_native_bf16(str(with_bf16)) and not cpu_has_native_bf16(str(without))
    assert not cpu_has_native_bf16(str(tmp_path / "missing"))
    assert bf16_autocast("auto", cpu) == cpu_has_native_bf16()
