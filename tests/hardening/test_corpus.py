"""Every malformed input in the corpus (mutations of the shipped configs, and bad flags) is answered before any
process starts with exit code 2 and exactly one line on stderr that names the field or flag: no traceback."""
import os

import pytest
from corpus import cases

from meshplan.cli import main
from meshplan.runtime import local_spawn

CASES = cases()


def children() -> set[int]:
    """Live child processes of this one (a started rank, or the forkserver that would start it)."""
    pids = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except OSError:
            pass
    return pids


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 150
    assert len({name for name, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("build", [b for _, b in CASES], ids=[n for n, _ in CASES])
def test_malformed_input_is_one_line_naming_the_field(build, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))  # no user configs leak in
    argv, needle = build(tmp_path)
    capsys.readouterr()
    before, spawned = children(), local_spawn.SPAWNED
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("meshplan: error: "), err
    assert needle in lines[0], (needle, err)
    assert "Traceback" not in err
    assert local_spawn.SPAWNED == spawned and not children() - before, "a rank was started"
