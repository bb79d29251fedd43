"""Local launches own their ranks: nothing listens beyond loopback, a stopped rank ends the run within the
collective timeout + 5 s, and a signal to the launcher (SIGTERM, or SIGKILL) leaves no rank running."""
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from procfs import alive, descendants, is_loopback
from workers import listen_then_stop, record_listeners

from meshplan.resources import shipped
from meshplan.rl.distributed import launch
from meshplan.runtime.local_spawn import spawn

TIMEOUT_S = 3.0


def _ranks(out: Path, world: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def _gone(pids, within_s: float) -> bool:
    deadline = time.time() + within_s
    while time.time() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def test_stopped_rank_ends_the_run_and_nothing_listens_beyond_loopback(tmp_path):
    with pytest.raises(Exception) as e:
        spawn(2, listen_then_stop, str(tmp_path), timeout_s=TIMEOUT_S)
    ended = time.time()
    stopped_at = float((tmp_path / "stopped_at").read_text())
    assert ended - stopped_at < TIMEOUT_S + 5, f"took {ended - stopped_at:.1f} s after the stop"
    assert "rank 0" in str(e.value) or "process 0" in str(e.value) or "process 1" in str(e.value)
    ranks = _ranks(tmp_path, 2)
    assert all(r["listening"] for r in ranks)  # gloo's pair sockets: real listeners, all on loopback
    assert all(is_loopback(a) for r in ranks for a in r["listening"]), ranks
    assert _gone([r["pid"] for r in ranks], 1.0)


def test_rl_train_ranks_listen_on_loopback_only(tmp_path):
    launch(record_listeners, 2, str(tmp_path), timeout_s=60)
    ranks = _ranks(tmp_path, 2)
    assert all(r["listening"] for r in ranks)
    assert all(is_loopback(a) for r in ranks for a in r["listening"]), ranks


def _start_run(env) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "meshplan.cli", "run", "--model", "tiny", "--plan",
           str(shipped("plans/tiny-ep-dp.yaml")), "--steps", "100000", "--batch", "4", "--seq", "16"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_step(proc: subprocess.Popen, within_s: float) -> None:
    seen = threading.Event()

    def read():
        for line in proc.stdout:
            if line.startswith("step "):
                seen.set()

    threading.Thread(target=read, daemon=True).start()
    if not seen.wait(within_s):
        proc.kill()
        pytest.fail(f"no training step within {within_s} s: {proc.stderr.read()[-2000:]}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_signal_to_launcher_leaves_no_rank(sig, cli_env):
    proc = _start_run(cli_env)
    try:
        _wait_for_step(proc, 180)
        tree = descendants(proc.pid)
        assert len(tree) >= 4  # 4 ranks (plus the forkserver and resource tracker)
        proc.send_signal(sig)
        code = proc.wait(timeout=15)
        assert code == (128 + sig if sig != signal.SIGKILL else -sig)
        assert _gone(tree, 10), [p for p in tree if alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigint_to_an_rl_launcher_stops_its_ranks(tmp_path, cli_env):
    """`meshplan train --nproc N` starts its ranks through rl.distributed.launch (spawned interpreters)."""
    code = ("import sys; from meshplan.cli_args import run_command; from meshplan.rl.distributed import launch; "
            "from workers import report_then_wait; "
            f"sys.exit(run_command(lambda a: launch(report_then_wait, 2, {str(tmp_path)!r}, timeout_s=60), None))")
    env = dict(cli_env, PYTHONPATH=str(Path(__file__).parent) + ":" + cli_env["PYTHONPATH"])
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while not all((tmp_path / f"rank{r}.pid").exists() for r in range(2)):
            assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "slow"
            time.sleep(0.2)
        ranks = [int((tmp_path / f"rank{r}.pid").read_text()) for r in range(2)]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 128 + signal.SIGINT
        assert proc.stderr.read().splitlines() == ["meshplan: stopped by SIGINT; every rank was terminated"]
        assert _gone(ranks, 5)
    finally:
        if proc.poll() is None:
            proc.kill()
