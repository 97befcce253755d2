"""Two processes on localhost (jax.distributed, gloo CPU collectives, 2 devices each) train the
tiny config data-parallel across them and log the same losses as one process with 4 devices.
(Ring attention across processes also runs - `mesh.data=2 mesh.seq=2` - but compiling it twice
more would double this test's time.)"""

import socket
import subprocess

from tests.training.test_train_cli import ROOT, _cmd, _env, _losses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    env = _env(tmp_path)
    common = ["mesh.data=4", "mesh.seq=1", "model.kernels.context_parallel=none",
              "model.kernels.remat=none", "train.steps=4", "checkpoint.every=2"]
    one = subprocess.run(_cmd(tmp_path / "one", "cpu_devices=4", *common), check=False, cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    port = _free_port()
    procs = [subprocess.Popen(
        _cmd(tmp_path / "two", "cpu_devices=2", *common, f"distributed.coordinator=localhost:{port}",
             "distributed.num_processes=2", f"distributed.process_id={i}"),
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    reference, losses = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(losses) == [1, 2, 3, 4]
    for step, loss in reference.items():
        assert abs(losses[step] - loss) <= 1e-6 * abs(loss), (step, losses[step], loss)
    # both processes wrote one checkpoint together (orbax coordinates the processes)
    assert sorted(p.name for p in (tmp_path / "two" / "ckpt").iterdir() if p.name.isdigit()) == [
        "2", "4"]
