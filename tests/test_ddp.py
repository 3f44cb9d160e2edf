"""The same `driftloop train` command under `torchrun --nproc_per_node 2` (DDP, gloo on CPU)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, cli_json


def test_torchrun_two_cpu_processes_register_one_model(home, tiny_model_dir):
    bin_dir = Path(sys.executable).parent
    torchrun = shutil.which("torchrun", path=str(bin_dir)) or shutil.which("torchrun")
    driftloop = shutil.which("driftloop", path=str(bin_dir)) or shutil.which("driftloop")
    assert torchrun and driftloop, "torchrun and the driftloop console script must be installed"
    env = {**os.environ, "DRIFTLOOP_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("BENTOML_HOME", None)
    env.pop("DRIFTLOOP_DB_URL", None)
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", driftloop, "train",
                           "--base-model", str(tiny_model_dir), "--epochs", "1", "--max-rows", "200", "--quiet", "--json"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    models = cli_json(["models", "list"], home)["models"]
    assert [m["tag"] for m in models] == [out["model"]]  # rank 0 registers, once
    lineage = cli_json(["models", "show", out["model"]], home)["lineage"]
    assert lineage["world_size"] == 2
    assert lineage["training"]["train_rows"] == lineage["data"]["splits"]["train"]["rows"]
    assert lineage["metrics"]["val"]["n"] == lineage["data"]["splits"]["val"]["rows"]
