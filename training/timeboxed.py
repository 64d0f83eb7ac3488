"""A time-boxed stage 1 + several stage-2 variants side by side, for a borrowed GPU.

The run behind the README's "Stage 2 with 23x the compute": on a machine that cannot read
``../shared/data`` it trains stage 1 on a packed copy (``python -m training.pack_data``) for at most
``S1_MIN`` minutes, runs the stage-2 variants of ``VARIANTS`` together for 40 steps to measure their
speed, then trains them together from scratch until ``BUDGET_S`` seconds after the start, each with
``steps`` set to what its measured speed allows (so the cosine LR schedule ends near the budget).
Everything small (logs, log.csv, configs, manifests) goes to ``$OUT/logs.tgz`` after every phase;
the stage-1 decoder and condition encoder once and one ``encoder_<variant>.safetensors`` per variant
go to ``$OUT`` (a saved model folder is ``<variant>/model/*.json`` from the archive plus those three).

    OUT=/tmp/out BUDGET_S=525 DATA=/tmp/packed python -m training.timeboxed

Settings (environment): OUT, RUNS (work folder), BUDGET_S, DATA, BS1/BS2 (batch sizes), WORKERS1/2
(loader workers per process), S1_MIN, S1_STEPS.
"""
import csv
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

BUDGET = float(os.environ.get("BUDGET_S", 520))
T0 = DEADLINE = 0.0  # set when main() starts
OUT = Path(os.environ.get("OUT", "/tmp/out"))
R = Path(os.environ.get("RUNS", "/tmp/r"))
BS1, BS2 = int(os.environ.get("BS1", 64)), int(os.environ.get("BS2", 32))
W1, W2 = int(os.environ.get("WORKERS1", 12)), int(os.environ.get("WORKERS2", 4))
S1_MIN = float(os.environ.get("S1_MIN", 1.7))
S1_STEPS = int(os.environ.get("S1_STEPS", 3000))
DATA = os.environ.get("DATA", "../shared/data")
PY = sys.executable
COMMON = ["--data", DATA, "--no-progress", "--set", f"data.cache_dir={R}/cache", "--set", "train.log_every=25",
          "--set", "train.ckpt_every=0", "--set", "train.tensorboard=false"]
ENC = ["--set", "model.encoder={lm: {slot_init: query, support_tokens: fused}}"]
VARIANTS = {
    "A_noaug": ENC,
    "B_flip15": ENC + ["--set", "data.text_drop_prob=0.2", "--set", "data.invert_prob=0.15"],
    "C_flip05": ENC + ["--set", "data.text_drop_prob=0.1", "--set", "data.invert_prob=0.05"],
}
REPORT = {"budget_s": BUDGET, "phases": {}}


def log(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def pack():
    """logs, configs, csvs and manifests -> OUT/logs.tgz (rewritten after every phase)."""
    (R / "report.json").write_text(json.dumps(REPORT, indent=2))
    tmp = OUT / "logs.tgz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for p in sorted(R.rglob("*")):
            if p.is_file() and p.suffix in (".log", ".csv", ".json", ".yaml", ".txt") and "cache" not in p.parts:
                tar.add(p, arcname=str(p.relative_to(R)))
    os.replace(tmp, OUT / "logs.tgz")


def start(stage, name, extra, config):
    logf = open(R / f"{name}.log", "w")
    cmd = [PY, "-m", "training.cli", stage, "--config", config, "--out", str(R / name)] + COMMON + extra
    log("start " + " ".join(cmd))
    return subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT), logf


def wait(procs, timeout):
    end = time.time() + timeout
    rcs = {}
    for name, (p, f) in procs.items():
        try:
            rcs[name] = p.wait(timeout=max(1, end - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            rcs[name] = "timeout"
        f.close()
    return rcs


def last_rate(run):
    rows = list(csv.DictReader(open(R / run / "log.csv")))
    rates = [float(r["steps_per_s"]) for r in rows if r.get("steps_per_s")]
    return rates[-1] if rates else None


def summary(run):
    text = (R / f"{run}.log").read_text().strip().splitlines()
    for line in reversed(text):
        if line.startswith("{"):
            return json.loads(line)
    return None


def fail(msg):
    log("FAIL " + msg)
    REPORT["failed"] = msg
    pack()
    sys.exit(1)


def main() -> None:
    global T0, DEADLINE
    T0 = REPORT["t0"] = time.time()
    DEADLINE = T0 + BUDGET
    OUT.mkdir(parents=True, exist_ok=True)
    R.mkdir(parents=True, exist_ok=True)
    # ---- stage 1
    s1 = ["--max-steps", str(S1_STEPS), "--set", f"train.batch_size={BS1}", "--set", "train.lr=5.0e-4",
          "--set", f"train.num_workers={W1}", "--set", f"train.max_minutes={S1_MIN}", "--set", "train.val_every=1000"]
    t = time.time()
    rcs = wait({"s1": start("stage1", "s1", s1, "configs/train/tiny_stage1.yaml")}, S1_MIN * 60 + 150)
    REPORT["phases"]["stage1"] = {"rc": rcs["s1"], "seconds": time.time() - t, "summary": summary("s1")}
    log(f"stage1 {REPORT['phases']['stage1']}")
    if rcs["s1"] != 0:
        fail("stage 1")
    pack()
    init = R / "s1" / "model"

    # ---- calibration: the three stage-2 runs together for 40 steps
    t = time.time()
    calib = ["--max-steps", "40", "--set", f"model.init={init}", "--set", f"train.batch_size={BS2}",
             "--set", f"train.num_workers={W2}", "--set", "data.val_per_task=1", "--set", "train.val_every=-1",
             "--set", "train.log_every=20"]
    procs = {f"cal_{v}": start("stage2", f"cal_{v}", calib + ov, "configs/train/tiny_stage2.yaml") for v, ov in VARIANTS.items()}
    rcs = wait(procs, 240)
    rates = {v: last_rate(f"cal_{v}") if rcs[f"cal_{v}"] == 0 else None for v in VARIANTS}
    REPORT["phases"]["calibration"] = {"rc": rcs, "seconds": time.time() - t, "steps_per_s": rates}
    log(f"calibration {REPORT['phases']['calibration']}")
    if any(r is None for r in rates.values()):
        fail("calibration")
    pack()

    # ---- stage 2, the three variants concurrently, until the deadline
    left = DEADLINE - time.time() - 40  # startup (~15 s) + final validation and save
    if left < 30:
        fail(f"no time left for stage 2 ({left:.0f} s)")
    procs = {}
    for v, ov in VARIANTS.items():
        steps = max(50, int(rates[v] * (left - 20) * 0.92))
        extra = ["--max-steps", str(steps), "--set", f"model.init={init}", "--set", f"train.batch_size={BS2}",
                 "--set", f"train.num_workers={W2}", "--set", f"train.max_minutes={(left - 15) / 60:.3f}",
                 "--set", "train.val_every=1000", "--set", "train.warmup_steps=200"]
        procs[v] = start("stage2", v, extra + ov, "configs/train/tiny_stage2.yaml")
        REPORT["phases"].setdefault("stage2", {})[v] = {"planned_steps": steps}
    t = time.time()
    rcs = wait(procs, left + 60)
    for v in VARIANTS:
        REPORT["phases"]["stage2"][v].update(rc=rcs[v], summary=summary(v))
    REPORT["phases"]["stage2"]["seconds"] = time.time() - t
    log(f"stage2 {REPORT['phases']['stage2']}")

    # ---- results: the shared frozen parts once, one encoder per variant
    shutil.copy(init / "decoder.safetensors", OUT / "decoder.safetensors")
    shutil.copy(init / "condition_encoder.safetensors", OUT / "condition_encoder.safetensors")
    for v in VARIANTS:
        f = R / v / "model" / "encoder.safetensors"
        if f.is_file():
            shutil.copy(f, OUT / f"encoder_{v}.safetensors")
    REPORT["total_s"] = time.time() - T0
    pack()
    log("DONE")


if __name__ == "__main__":
    main()
