"""Two processes on localhost (jax.distributed, gloo CPU collectives, 2 devices each) train the
tiny config data-parallel across them and log the same losses as one process (in this test
process, 8 devices). (Ring attention across processes runs too - `mesh.data=2 mesh.seq=2` - but
compiling it would double this test's time.)"""

import socket
import subprocess

from jaxllama.training.config import load_train_config
from jaxllama.training.trainer import run
from tests.training.test_train_cli import ROOT, TINY, _cmd, _env, _losses

COMMON = ["model.kernels.context_parallel=none", "model.kernels.remat=none", "train.steps=4",
          "train.batch_size=8", "checkpoint.every=2", "mesh.seq=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path, monkeypatch):
    port = _free_port()
    procs = [subprocess.Popen(
        _cmd(tmp_path / "two", "cpu_devices=2", "mesh.data=4", *COMMON,
             f"distributed.coordinator=localhost:{port}", "distributed.num_processes=2",
             f"distributed.process_id={i}"),
        cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    monkeypatch.chdir(ROOT)
    one = run(load_train_config(TINY, ["mesh.data=8", *COMMON, "log.tensorboard=false",
                                       f"checkpoint.dir={tmp_path / 'one' / 'ckpt'}",
                                       f"log.dir={tmp_path / 'one'}"]))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    losses = _losses(tmp_path / "two")
    assert sorted(losses) == [1, 2, 3, 4] and sorted(one["losses"]) == [1, 2, 3, 4]
    for step, loss in one["losses"].items():
        assert abs(losses[step] - loss) <= 1e-6 * abs(loss), (step, losses[step], loss)
    # both processes wrote each checkpoint together (orbax coordinates the processes)
    assert sorted(p.name for p in (tmp_path / "two" / "ckpt").iterdir() if p.name.isdigit()) == [
        "2", "4"]
