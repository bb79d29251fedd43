"""A rank that dies mid-step makes every other rank exit non-zero, within the collective timeout: never a hang."""
import multiprocessing
import time

from rt_harness import dying_worker

from meshplan.runtime.launch import free_port, preload_forkserver

TIMEOUT_S = 10.0  # the process groups' collective timeout in this test


def test_dead_rank_fails_the_others_quickly():
    preload_forkserver()
    ctx = multiprocessing.get_context("forkserver")
    world, port = 3, free_port()
    procs = [ctx.Process(target=dying_worker, args=(r, world, port, 1, TIMEOUT_S)) for r in range(world)]
    start = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(max(1.0, 60 - (time.monotonic() - start)))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    elapsed = time.monotonic() - start
    assert hung == [], f"ranks {hung} still running after {elapsed:.0f} s"
    assert procs[1].exitcode == 17
    assert all(p.exitcode != 0 for p in procs), [p.exitcode for p in procs]
    assert elapsed < 60
