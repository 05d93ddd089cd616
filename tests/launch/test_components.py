"""launch/components.py: the AppDefs, their dry runs on local_cwd / slurm / kubernetes, .torchxconfig."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from torchx import specs
from torchx.runner import get_runner

from mptrec.launch.components import convert, evaluate, prompt_tune, train

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
ROW_WISE = 'sharding.sharding_types=["row_wise","table_wise"]'


def _torchx_env() -> dict[str, str]:
    # torchrun must resolve to this venv's; only the repository's .torchxconfig applies.
    return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
            "TORCHXCONFIG": str(REPO / ".torchxconfig")}


def _torchx(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "torchx"), *args], cwd=REPO, env=_torchx_env(),
                          capture_output=True, text=True, timeout=timeout)


def _split(command: str) -> tuple[dict[str, str], list[str]]:
    """torchrun options (name -> value) and the argv after ``-m mptrec.launch.cli``."""
    argv = shlex.split(command)
    assert argv[0] == "torchrun"
    m = argv.index("-m")
    opts = dict(zip(argv[1:m:2], argv[2:m:2]))
    assert argv[m + 1] == "mptrec.launch.cli"
    return opts, argv[m + 2:]


def _role(app: specs.AppDef) -> specs.Role:
    assert len(app.roles) == 1
    role = app.roles[0]
    assert role.entrypoint == "bash" and role.args[0] == "-c"
    return role


# --- the AppDefs --------------------------------------------------------------------------------


def test_train_two_nodes_eight_gpus() -> None:
    app = train(config="configs/aliccp_pretrain.toml", set=["train.lr=0.01", ROW_WISE], j="2x8",
                gpu=8, cpu=64, memMB=480000)
    role = _role(app)
    assert app.name == "train" and role.name == "train"
    assert role.num_replicas == 2 and role.min_replicas == 2
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (64, 8, 480000)
    assert role.max_retries == 0
    opts, cli = _split(role.args[1])
    assert opts["--nnodes"] == "2" and opts["--nproc_per_node"] == "8"
    assert opts["--rdzv_backend"] == "c10d" and "--max_restarts" not in opts  # torchrun's default 0
    assert cli == ["train", "--config", "configs/aliccp_pretrain.toml",
                   "--set", "train.lr=0.01", "--set", ROW_WISE]


def test_train_defaults_are_one_cpu_node_two_processes_and_resume_flag() -> None:
    role = _role(train(config="configs/debug.toml", resume=True))
    assert role.num_replicas == 1 and role.resource.gpu == 0
    opts, cli = _split(role.args[1])
    assert opts["--nnodes"] == "1" and opts["--nproc_per_node"] == "2"
    assert opts["--rdzv_endpoint"] == "localhost:0"  # single node: a free port, nothing hard-coded
    assert cli == ["train", "--config", "configs/debug.toml", "--resume"]


def test_prompt_tune_args() -> None:
    role = _role(prompt_tune(run="runs/census", task="education", set=["train.epochs=3"], j="1x4"))
    assert role.name == "prompt-tune"
    opts, cli = _split(role.args[1])
    assert opts["--nproc_per_node"] == "4"
    assert cli == ["prompt-tune", "--run-dir", "runs/census", "--task", "education",
                   "--set", "train.epochs=3"]


def test_evaluate_args_with_and_without_options() -> None:
    _, cli = _split(_role(evaluate(run="runs/a")).args[1])
    assert cli == ["eval", "--run-dir", "runs/a", "--checkpoint", "best"]
    role = _role(evaluate("--user-field", "101", run="runs/a", out="e.json", checkpoint="step-000100",
                          data="/d/aliccp", split="valid", set=["data.batch_size=16384"], j="1x4"))
    assert role.name == "evaluate"
    opts, cli = _split(role.args[1])
    assert opts["--nproc_per_node"] == "4"
    assert cli == ["eval", "--run-dir", "runs/a", "--checkpoint", "step-000100", "--out", "e.json",
                   "--data", "/d/aliccp", "--split", "valid", "--set", "data.batch_size=16384",
                   "--user-field", "101"]


def test_convert_passes_arguments_through() -> None:
    role = _role(convert("census", "--src", "/raw/census", "--out", "/d/census", cpu=8, memMB=16000))
    assert role.name == "convert" and role.num_replicas == 1
    assert (role.resource.cpu, role.resource.memMB) == (8, 16000)
    opts, cli = _split(role.args[1])
    assert opts["--nproc_per_node"] == "1"
    assert cli == ["data", "census", "--src", "/raw/census", "--out", "/d/census"]


def test_names_env_and_named_resource() -> None:
    app = train(config="c.toml", name="aliccp/", env={"NCCL_DEBUG": "INFO"}, h="gpu.small", j="1x1")
    assert app.name == "train"
    role = _role(app)
    assert role.env["NCCL_DEBUG"] == "INFO" and role.env["TORCHX_TRACKING_EXPERIMENT_NAME"] == "aliccp"
    assert role.resource == specs.named_resources["gpu.small"]
    assert train(config="c.toml", name="exp/run7").name == "run7"


def test_more_processes_than_gpus_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"-j 1x8 starts 8 processes per node but each node gets 4 GPU"):
        train(config="c.toml", j="1x8", gpu=4)
    gpus = specs.named_resources["gpu.small"].gpu
    with pytest.raises(ValueError, match="-h gpu.small"):
        train(config="c.toml", j=f"1x{gpus + 1}", h="gpu.small")
    with pytest.raises(ValueError, match="Invalid format for -j"):
        train(config="c.toml", j="two")


@pytest.mark.parametrize("pieces, expected", [
    ([], []),
    (["train.lr=0.01", "train.epochs=2"], ["train.lr=0.01", "train.epochs=2"]),
    # what torchx hands over for --set 'sharding.sharding_types=["row_wise","table_wise"],train.lr=1'
    (['sharding.sharding_types=["row_wise"', '"table_wise"]', "train.lr=1"], [ROW_WISE, "train.lr=1"]),
    (["model.expert_hidden=[128", "64]"], ["model.expert_hidden=[128,64]"]),
    (["x={a=1", "b=2}"], ["x={a=1,b=2}"]),
    (['data.name="a', 'b=c"'], ['data.name="a,b=c"']),
    (["data.tags=a", "b"], ["data.tags=a,b"]),
])
def test_set_pieces_split_at_commas_are_rejoined(pieces: list[str], expected: list[str]) -> None:
    _, cli = _split(_role(train(config="c.toml", set=pieces)).args[1])
    assert cli[4::2] == expected and set(cli[3::2]) <= {"--set"}


@pytest.mark.parametrize("pieces, message", [
    (["lr"], "expected KEY=VALUE"),
    (["=1"], "expected KEY=VALUE"),
    (["model.expert_hidden=[1"], "unclosed"),
])
def test_bad_set_is_an_error_naming_it(pieces: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message) as exc:
        train(config="c.toml", set=pieces)
    assert repr(pieces[0]) in str(exc.value)


# --- dry runs through torchx's Python API ---------------------------------------------------------


def test_dryrun_local_cwd_runs_torchrun_in_the_working_directory() -> None:
    with get_runner() as runner:
        info = runner.dryrun(train(config="configs/debug.toml", j="1x2"), "local_cwd", cfg={})
    (params,) = info.request.role_params["train"]
    assert params.args[:2] == ["bash", "-c"] and params.cwd == os.getcwd()
    opts, cli = _split(params.args[2])
    assert opts["--nproc_per_node"] == "2" and opts["--rdzv_id"].startswith("train-")
    assert cli == ["train", "--config", "configs/debug.toml"]


def test_dryrun_slurm_sbatch_script() -> None:
    app = train(config="configs/aliccp_pretrain.toml", set=[ROW_WISE], j="2x8", gpu=8, cpu=64, memMB=480000)
    with get_runner() as runner:
        script = str(runner.dryrun(app, "slurm", cfg={"partition": "gpu", "time": "04:00:00"}))
    headers = re.findall(r"^#SBATCH --job-name=(\S+) (.*)$", script, flags=re.M)
    assert [h[0] for h in headers] == ["train-0", "train-1"]  # one het group per node
    for _, opts in headers:
        for flag in ("--partition=gpu", "--time=04:00:00", "--ntasks-per-node=1", "--cpus-per-task=64",
                     "--mem=480000", "--gpus-per-task=8"):
            assert flag in opts.split()
    assert script.count("--nnodes 2 --nproc_per_node 8") == 2
    assert "--kill-on-bad-exit=1" in script and "TORCHX_MAX_RETRIES=0" in script
    assert script.count("-m mptrec.launch.cli train --config configs/aliccp_pretrain.toml --set") == 2


def test_dryrun_kubernetes_volcano_job() -> None:
    app = train(config="configs/aliccp_pretrain.toml", j="2x8", gpu=8, cpu=64, memMB=480000,
                image="registry.example.org/mptrec:cuda")
    with get_runner() as runner:
        info = runner.dryrun(app, "kubernetes", cfg={"queue": "default"})
    job = yaml.safe_load(str(info))
    assert job["kind"] == "Job" and job["apiVersion"].startswith("batch.volcano.sh/")
    assert job["spec"]["queue"] == "default" and job["spec"]["maxRetry"] == 0
    tasks = job["spec"]["tasks"]
    assert [t["name"] for t in tasks] == ["train-0", "train-1"]
    for t in tasks:
        (container,) = t["template"]["spec"]["containers"]
        assert container["image"] == "registry.example.org/mptrec:cuda"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert container["command"][:2] == ["bash", "-c"]
        opts, cli = _split(container["command"][2])
        assert opts["--nnodes"] == "2" and opts["--nproc_per_node"] == "8"
        assert cli == ["train", "--config", "configs/aliccp_pretrain.toml"]
    # the second node finds the first through Volcano's host variable of the renamed role
    second = tasks[1]["template"]["spec"]["containers"][0]["command"][2]
    assert "${VC_TRAIN_0_HOSTS:=localhost}:29500" in second


# --- the torchx command line (the commands of the README) -----------------------------------------


# The cluster commands of the README ("Slurm / Kubernetes"), with --dryrun added.
SLURM_CMD = """torchx run --dryrun -s slurm -cfg partition=gpu,time=04:00:00 launch/components.py:train
    --config configs/aliccp_pretrain.toml -j 2x8 --gpu 8 --cpu 64 --memMB 480000
    --set 'sharding.sharding_types=["row_wise","table_wise"],train.epochs=2'"""
K8S_CMD = """torchx run --dryrun -s kubernetes -cfg queue=default,namespace=ml --workspace ""
    launch/components.py:train --config configs/aliccp_pretrain.toml -j 2x8 --gpu 8 --cpu 64 --memMB 480000
    --image registry.example.org/mptrec:cuda --mounts type=volume,src=mptrec-data,dst=/data
    --set data.path=/data/aliccp,out_dir=/data/runs/aliccp"""

LOCAL_GPU_CMD = """torchx run --dryrun launch/components.py:train --config configs/aliccp_pretrain.toml
    -j 1x8 --gpu 8 --set 'sharding.sharding_types=["row_wise","table_wise"]'"""


def test_cli_local_gpu_dryrun_leaves_gpu_binding_to_the_processes() -> None:
    r = _torchx(*shlex.split(LOCAL_GPU_CMD)[1:])
    assert r.returncode == 0, r.stderr
    printed = re.sub(r"['\"]\s*\n\s*['\"]", "", r.stdout)
    assert "--nnodes 1 --nproc_per_node 8" in printed and "CUDA_VISIBLE_DEVICES" not in printed
    assert "-m mptrec.launch.cli train --config configs/aliccp_pretrain.toml --set" in printed
    assert printed.count("row_wise") == 2  # the one override, in the AppDef and in the local request


def test_cli_slurm_dryrun_two_by_eight() -> None:
    r = _torchx(*shlex.split(SLURM_CMD)[1:])
    assert r.returncode == 0, r.stderr
    script = r.stdout.split("=== SCHEDULER REQUEST ===", 1)[1]
    assert "--nnodes 2" in script and "--nproc_per_node 8" in script and "--gpus-per-task=8" in script
    assert "--partition=gpu --time=04:00:00" in script
    # each srun runs `bash -c '<torchrun ...>'`: undo both quoting levels and check the job's argv
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    inner = shlex.split(srun.removesuffix(":\\"))[-1]
    _, cli = _split(inner.replace("${SLURM_JOB_NODELIST_HET_GROUP_0:=localhost}", "h"))
    assert cli == ["train", "--config", "configs/aliccp_pretrain.toml", "--set", ROW_WISE,
                   "--set", "train.epochs=2"]


def test_cli_kubernetes_dryrun() -> None:
    pytest.importorskip("kubernetes")
    r = _torchx(*shlex.split(K8S_CMD)[1:])
    assert r.returncode == 0, r.stderr
    job = yaml.safe_load(r.stdout.split("=== SCHEDULER REQUEST ===", 1)[1])
    assert job["spec"]["queue"] == "default" and len(job["spec"]["tasks"]) == 2
    for task in job["spec"]["tasks"]:
        pod = task["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == "registry.example.org/mptrec:cuda"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert {"mountPath": "/data", "name": "mount-0", "readOnly": False} in container["volumeMounts"]
        assert {"name": "mount-0", "persistentVolumeClaim": {"claimName": "mptrec-data"}} in pod["volumes"]
        _, cli = _split(container["command"][2])
        assert cli == ["train", "--config", "configs/aliccp_pretrain.toml",
                       "--set", "data.path=/data/aliccp", "--set", "out_dir=/data/runs/aliccp"]


def test_cli_default_scheduler_is_local_cwd_and_components_lint_clean() -> None:
    for component in ("train", "prompt_tune", "evaluate", "convert"):
        r = _torchx("run", f"launch/components.py:{component}", "--help")
        assert r.returncode == 0, r.stderr
        assert "usage: torchx run" in r.stdout and "--j str" in r.stdout
    r = _torchx("run", "--dryrun", "launch/components.py:prompt_tune", "--run", "runs/census",
                "--task", "education", "-j", "1x2")
    assert r.returncode == 0, r.stderr
    assert "loaded configs from" in r.stderr
    printed = re.sub(r"['\"]\s*\n\s*['\"]", "", r.stdout)  # rejoin pformat's split string literals
    assert f"'cwd': '{REPO}'" in printed and "'role_params': { 'prompt-tune'" in printed
    assert "--nproc_per_node 2 --tee 3 --role '' -m mptrec.launch.cli prompt-tune --run-dir runs/census " \
           "--task education" in printed


def test_cli_reports_a_missing_required_argument() -> None:
    r = _torchx("run", "--dryrun", "launch/components.py:train", "-j", "1x2")
    assert r.returncode != 0 and "--config" in r.stderr


def test_torchxconfig_documents_only_real_options() -> None:
    parser = configparser.ConfigParser()
    text = (REPO / ".torchxconfig").read_text()
    parser.read_string(text)
    assert parser["cli:run"]["scheduler"] == "local_cwd"
    section = ""
    documented: dict[str, set[str]] = {}
    for line in text.splitlines():
        if m := re.match(r"^\[(\w+)\]", line):
            section = m.group(1)
        elif m := re.match(r"^#\s*([\w-]+)\s*=", line):
            documented.setdefault(section, set()).add(m.group(1))
    assert {"slurm", "kubernetes", "local_cwd"} <= set(documented)
    with get_runner() as runner:
        for scheduler, keys in documented.items():
            known = {name for name, _ in runner.scheduler_run_opts(scheduler)}
            assert keys <= known, (scheduler, keys - known)
    assert {"partition", "time"} <= documented["slurm"] and "queue" in documented["kubernetes"]


# --- real local runs -------------------------------------------------------------------------------


@pytest.mark.slow
def test_local_cwd_run_of_a_component_reaches_the_mptrec_cli() -> None:
    r = _torchx("run", "-s", "local_cwd", "launch/components.py:convert", "-j", "1x2", "--", "--help")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("usage: mptrec data") + r.stderr.count("usage: mptrec data") == 2
    assert "SUCCEEDED" in r.stderr


@pytest.mark.slow
def test_local_cwd_job_fails_fast_with_the_failing_ranks_error() -> None:
    # rank 1 dies before joining the process group, so rank 0 would wait in the rendezvous store;
    # torchrun (--max_restarts 0) must stop it and torchx must exit non-zero, showing rank 1's error.
    start = time.monotonic()
    r = _torchx("run", "-s", "local_cwd", "dist.ddp", "-j", "1x2", "--script", "tests/launch/_dist_probe.py",
                "--", "cpu", "fail-rank", "1", "init", timeout=120)
    elapsed = time.monotonic() - start
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "RuntimeError: probe failure on rank 1 before init" in out
    assert re.search(r"Root Cause.*?rank\s*: 1 \(local_rank: 1\)", out, flags=re.S)
    assert "Job finished: FAILED" in out
    assert elapsed < 60, elapsed
