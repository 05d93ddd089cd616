"""Seeded random byte mutations of every reader's input: a DataError or a result, never anything else.

Each case starts from a small valid input (Ali-CCP CSV, PaddleRec ``field:id`` text, a raw
Tianchi skeleton/common pair, Census lines, a Parquet shard) and applies one random mutation
(bytes flipped, replaced by separators, a slice cut out or repeated, the file truncated). The
reader must then either succeed or raise :class:`DataError`; any other exception (a traceback
for the user) fails the test with the seed and the mutation, and an alarm bounds the time so a
hang fails too. Any failed conversion must leave no ``--out`` folder.
"""

from __future__ import annotations

import gzip
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from mptrec.data_loaders.aliccp import convert_aliccp_csv, convert_aliccp_paddle
from mptrec.data_loaders.aliccp_raw import convert_aliccp_raw
from mptrec.data_loaders.census import convert_census
from mptrec.data_loaders.dataset import ShardDataset
from mptrec.data_loaders.layout import read_schema, verify_shard_files
from mptrec.data_loaders.schema import CENSUS_COLUMNS, DataError, FeatureSpec, LabelSpec
from mptrec.data_loaders.validate import validate_split
from tests.data_loaders.test_aliccp_raw import write_raw
from tests.pipeline.train.test_train_data import VOCAB, write_tiny_shards

CASES_PER_FORMAT = 300
REPO = Path(__file__).resolve().parents[2]
SPECIAL = [b",", b":", b"\n", b"\r", b"\x01", b"\x02", b"\x03", b"-", b"a", b"\xff", b"\x00", b" ", b"9" * 30]
SPLIT = {"train": 0.8, "valid": 0.2}


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One random mutation of ``data`` and a description of it."""
    n = len(data)
    kind = rng.choice(["flip", "special", "cut", "repeat", "truncate"])
    if kind == "flip":
        out = bytearray(data)
        spots = [rng.randrange(n) for _ in range(rng.randint(1, 8))]
        for i in spots:
            out[i] = rng.randrange(256)
        return bytes(out), f"flip bytes {spots}"
    if kind == "special":
        i, s = rng.randrange(n), rng.choice(SPECIAL)
        return data[:i] + s + data[i + 1:], f"byte {i} -> {s!r}"
    i = rng.randrange(n)
    j = min(n, i + rng.randint(1, 200))
    if kind == "cut":
        return data[:i] + data[j:], f"cut [{i}:{j}]"
    if kind == "repeat":
        return data[:j] + data[i:j] + data[j:], f"repeat [{i}:{j}]"
    return data[:i], f"truncate at {i}"


@contextmanager
def deadline(seconds: int, what: str) -> Iterator[None]:
    def hang(signum: int, frame: Any) -> None:
        raise TimeoutError(f"{what}: no result after {seconds} s (a hang)")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _csv(d: Path) -> list[Path]:
    rng = random.Random(1)
    lines = ["click,purchase,101,205,216,D508"]
    for _ in range(40):
        click = rng.randint(0, 1)
        lines.append(f"{click},{click * rng.randint(0, 1)},{rng.randint(0, 9)},{rng.randint(0, 99)},"
                     f"{rng.randint(0, 30)},{rng.random():.4f}")
    p = d / "in.csv"
    p.write_text("\n".join(lines) + "\n")
    return [p]


def _paddle(d: Path) -> list[Path]:
    rng = random.Random(2)
    lines = []
    for r in range(40):
        toks = [f"205:{rng.randint(1, 50)}", f"101:{rng.randint(1, 9)}", f"301:{rng.randint(1, 3)}"]
        toks += [f"210:{rng.randint(1, 9)}" for _ in range(3)] + [f"150_14:{rng.randint(1, 9)}"]
        lines.append(f"{r},{r % 2},{r % 4 == 1},".replace("True", "1").replace("False", "0") + ",".join(toks))
    p = d / "in.txt"
    p.write_text("\n".join(lines) + "\n")
    return [p]


def _raw(d: Path) -> list[Path]:
    skel, _, _ = write_raw(d, n=40)
    return [skel, skel.with_name("common_features_train.csv")]


def _census(d: Path) -> list[Path]:
    rng = random.Random(3)
    rows = []
    for _ in range(40):
        vals = [str(rng.randint(0, 90)) if c in ("age", "wage_per_hour", "capital_gains", "capital_losses",
                                                  "stock_dividends", "instance_weight", "num_emp",
                                                  "own_or_self", "vet_benefits", "weeks_worked", "year")
                else f"v{rng.randint(0, 3)}" for c in CENSUS_COLUMNS]
        vals[CENSUS_COLUMNS.index("income_50k")] = rng.choice(["- 50000.", "50000+."])
        rows.append(", ".join(vals))
    p = d / "census.data.gz"
    p.write_bytes(gzip.compress(("\n".join(rows) + "\n").encode()))
    return [p]


def _parquet(d: Path) -> list[Path]:
    data = write_tiny_shards(d / "shards", rows={"train": 256, "valid": 64, "test": 64})
    return [data / "train" / "part-00001.parquet"]


def _read_shards(files: list[Path], out: Path) -> None:
    """What `mptrec train` does before training: file checksums, then footers, statistics and rows."""
    data = files[0].parents[1]
    verify_shard_files(data, read_schema(data), ["train"])
    feats = [FeatureSpec("d0", kind="dense"), FeatureSpec("d1", kind="dense")]
    feats += [FeatureSpec(k, num_embeddings=v, embedding_dim=4, multivalent=k == "m0")
              for k, v in VOCAB.items()]
    ds = ShardDataset(data, "train", features=feats, labels=[LabelSpec("ctr", "click")], batch_size=32,
                      shuffle=True)
    validate_split(ds)
    for _ in ds:
        pass


def _gz(path: Path, data: bytes) -> bytes:
    """Mutate a .gz file's text half the time (else its compressed bytes)."""
    return gzip.compress(data) if path.suffix == ".gz" else data


READERS: dict[str, tuple[Callable[[Path], list[Path]], Callable[[list[Path], Path], Any]]] = {
    "aliccp-csv": (_csv, lambda f, o: convert_aliccp_csv(f, o, split=SPLIT, seed=0)),
    "aliccp-paddle": (_paddle, lambda f, o: convert_aliccp_paddle(f, o, split=SPLIT, seed=0)),
    "aliccp-raw": (_raw, lambda f, o: convert_aliccp_raw(f[:1], o, split=SPLIT, seed=0, min_count=1)),
    "census": (_census, lambda f, o: convert_census(f, o, split=SPLIT, seed=0)),
    "parquet": (_parquet, _read_shards),
}


def fuzz(fmt: str, tmp_path: Path) -> dict[str, int]:
    """Run the seeded cases of one format; raise AssertionError naming the first bad case."""
    make, read = READERS[fmt]
    (tmp_path / "in").mkdir(parents=True)
    files = make(tmp_path / "in")
    originals = {p: p.read_bytes() for p in files}
    read(files, tmp_path / "good")  # the unmutated input converts
    outcomes = {"ok": 0, "DataError": 0}
    for case in range(CASES_PER_FORMAT):
        rng = random.Random(f"{fmt}-{case}")
        target = rng.choice(files)
        base = originals[target]
        text = target.suffix == ".gz" and rng.random() < 0.5
        mutated, how = mutate(gzip.decompress(base) if text else base, rng)
        target.write_bytes(gzip.compress(mutated) if text else mutated)
        out = tmp_path / f"out-{case}"
        what = f"{fmt} case {case}: {target.name} {how}"
        print(what, flush=True)  # the last line names the case if the process dies
        try:
            with deadline(30, what):
                read(files, out)
            outcomes["ok"] += 1
        except DataError as e:
            outcomes["DataError"] += 1
            assert "\n" not in str(e).strip(), f"{what}: a multi-line message: {e}"
            assert str(target) in str(e) or str(target.parent) in str(e) or fmt == "parquet", (what, str(e))
            assert fmt == "parquet" or not out.exists(), f"{what}: a failed conversion left {out}"
        except Exception as e:  # noqa: BLE001 - anything else is the bug this test looks for
            raise AssertionError(f"{what}: {type(e).__name__}: {e}") from e
        finally:
            target.write_bytes(base)
    assert outcomes["DataError"] > 0, outcomes  # the mutations do reach the checks
    return outcomes


@pytest.mark.parametrize("fmt", list(READERS))
def test_mutated_inputs_give_a_data_error_or_a_result(tmp_path: Path, fmt: str) -> None:
    # in a child process: a reader that aborts or hangs in native code fails this test, not the run
    code = ("import json, sys; from pathlib import Path; "
            "from tests.data_loaders.test_fuzz_readers import fuzz; "
            "print(json.dumps(fuzz(sys.argv[1], Path(sys.argv[2]))))")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code, fmt, str(tmp_path)], capture_output=True,
                              text=True, timeout=300, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{fmt}: no result after 300 s; last case: {str(e.stdout or '').splitlines()[-1:]}")
    last = proc.stdout.strip().splitlines()[-1:] or [""]
    assert proc.returncode == 0, f"{fmt}: exit {proc.returncode} at {last}\n{proc.stderr[-2000:]}"
    outcomes = json.loads(last[0])
    assert outcomes["ok"] + outcomes["DataError"] == CASES_PER_FORMAT
    assert time.perf_counter() - t0 < 300
