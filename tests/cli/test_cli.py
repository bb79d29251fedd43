"""The CLI as a user runs it: output content and error messages, in-process (main(argv)) for speed."""
import pytest

from meshplan.cli import main
from meshplan.ir import Mesh, Plan, trace
from meshplan.models import build_model, load_config


def test_trace_internal_352b(capsys):
    assert main(["trace", "internal-352b"]) == 0
    out = capsys.readouterr().out
    assert "layers.59.feed_forward" in out and "layers.60" not in out
    assert "total parameters:            341,290,487,808" in out
    assert "activated parameters/token:  34,502,320,128" in out


def test_show_collapses_layers_and_validates(tmp_path, capsys):
    g = trace(build_model(load_config("tiny")))
    plan = Plan.build(g, Mesh.of(dp=2, mp=2), {"attention": "tp"}, precision={"dispatch": "fp8"})
    path = tmp_path / "p.yaml"
    plan.to_yaml(path)
    assert main(["show", str(path), "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "layers.[0-1].attention" in out and "dispatch=fp8" in out and "S(0) R" in out


def test_errors_are_one_line_naming_the_field(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model: tiny\nmesh: {mp: 3}\nops: {}\n")
    assert main(["show", str(path), "--model", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "plan.ops[" in err and "missing" in err
    assert main(["trace", "no-such-model"]) == 2
    assert "model config 'no-such-model'" in capsys.readouterr().err


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("trace", "show", "demo"):
        assert cmd in out
