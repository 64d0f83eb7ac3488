"""training.loop under DeepSpeed and several processes, on CPU over gloo.

* fast: ZeRO-2 in one process (MASTER_ADDR/RANK/WORLD_SIZE set) trains, checkpoints, and a run
  killed at step 2 and resumed to 4 ends with the weights of an uninterrupted 4-step run;
* slow (``pytest -m slow``): two processes through ``accelerate launch`` with the DDP and the
  DeepSpeed ZeRO-2 configs.

This file is also the script those runs execute: ``python tests/test_training_distributed.py OUT
[--deepspeed JSON] [--steps N] [--kill N]`` trains the tiny MLP task of tests/test_training_loop.py
and prints one ``RESULT {...}`` JSON line (weights checksum, steps, processes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra)
    return env


def _run(cmd: list[str], env: dict[str, str], timeout: int = 240) -> list[dict]:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]


def test_deepspeed_zero2_one_process_trains_and_resumes(tmp_path):
    env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port(), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    cmd = [sys.executable, str(SCRIPT), str(tmp_path), "--deepspeed", "configs/deepspeed/zero2.json", "--compare-resume"]
    (res,) = _run(cmd, env)
    assert res["zero_stage"] == 2 and res["processes"] == 1
    assert res["full_step"] == 4 and res["resumed_from"].endswith("step_0000002")
    assert res["max_abs_diff"] < 1e-6 and res["moved"] > 1e-4  # it trained, and resuming changed nothing
    assert res["model_saved"]


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ddp", "deepspeed_zero2"])
def test_two_processes_accelerate_launch(tmp_path, config):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"configs/accelerate/{config}.yaml",
           "--main_process_port", _free_port(), str(SCRIPT), str(tmp_path), "--steps", "6"]
    results = _run(cmd, _env(), timeout=600)
    assert len(results) == 2 and {r["rank"] for r in results} == {0, 1}
    assert all(r["processes"] == 2 and r["step"] == 6 for r in results)
    assert results[0]["checksum"] == pytest.approx(results[1]["checksum"])  # replicas agree
    assert (tmp_path / "run" / "model" / "weights.pt").is_file()


# ------------------------------------------------------------------------------ the script
def _main(argv: list[str]) -> None:
    import argparse

    import torch

    sys.path.insert(0, str(REPO))
    torch.set_num_threads(1)
    from tests.test_training_loop import MLPTask, Noisy, cfg
    from training.loop import train

    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--deepspeed", default=None)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--compare-resume", action="store_true")
    a = p.parse_args(argv)

    def run(out: Path, **kw):
        task = MLPTask()
        res = train(task, Noisy(), None, cfg(out, max_steps=a.steps, ckpt_every=2, grad_clip=1.0, deepspeed=a.deepspeed),
                    **kw)
        return task, res

    init = torch.cat([p.detach().flatten() for p in MLPTask().parameters()])
    task, res = run(a.out / "run")
    weights = torch.cat([p.detach().flatten() for p in task.parameters()])
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, PartialState

    state = PartialState()
    out = {"rank": state.process_index, "processes": state.num_processes, "step": res["step"],
           "checksum": float(weights.double().sum()), "model_saved": (a.out / "run" / "model" / "weights.pt").is_file()}
    plugin = AcceleratorState().deepspeed_plugin if a.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED") else None
    out["zero_stage"] = plugin.zero_stage if plugin is not None else None
    if a.compare_resume:
        run(a.out / "killed", stop_after_steps=2)
        task2, res2 = run(a.out / "killed", resume=True)
        resumed = torch.cat([p.detach().flatten() for p in task2.parameters()])
        out.update(full_step=res["step"], resumed_from=res2["resumed_from"],
                   max_abs_diff=float((resumed - weights).abs().max()), moved=float((weights - init).abs().max()))
    print("RESULT " + json.dumps(out), flush=True)
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    _main(sys.argv[1:])
