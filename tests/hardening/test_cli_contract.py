"""The command line as a package: help for everything, --version, configs found as package data or in the
user's config directory, and a real subprocess that fails with one line."""
import argparse
import subprocess
import sys

import pytest
import yaml

import meshplan
from meshplan.cli import build_parser, main
from meshplan.planner.cluster import load_cluster
from meshplan.resources import shipped


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def test_every_subcommand_and_flag_has_help():
    commands = _subparsers(build_parser())
    assert {"trace", "show", "plan", "simulate", "calibrate", "run", "schedule", "train", "demo"} <= set(commands)
    for name, sub in commands.items():
        assert sub.description, f"meshplan {name} has no description"
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"meshplan {name} {action.option_strings or action.dest}: no help text"


def test_run_help_names_flags_that_exist(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    assert "--plan" in text and "--timeout" in text
    if "-o plan.yaml" in text:  # the hint must be a flag `meshplan plan` accepts
        assert build_parser().parse_args(["plan", "tiny", "--gpus", "4", "-o", "p.yaml"]).out == "p.yaml"


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"meshplan {meshplan.__version__}"


def test_shipped_configs_are_package_data():
    root = shipped()
    assert root.parent.name == "meshplan" and (root / "models" / "tiny.yaml").is_file()
    assert (root / "error_model.yaml").is_file() and (root / "rl" / "vapo-tiny.yaml").is_file()


def test_user_configs_come_from_xdg_config_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    d = yaml.safe_load(shipped("clusters", "h800.yaml").read_text())
    (tmp_path / "meshplan" / "clusters").mkdir(parents=True)
    for name in ("mine", "h800"):  # a new name, and one that shadows a shipped config
        (tmp_path / "meshplan" / "clusters" / f"{name}.yaml").write_text(yaml.safe_dump({**d, "name": name,
                                                                                         "hbm_bytes": 1e9}))
    assert load_cluster("mine").hbm_bytes == 1e9 and load_cluster("h800").hbm_bytes == 1e9
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "empty"))
    assert load_cluster("h800").hbm_bytes == 80e9


def test_a_real_subprocess_fails_with_one_line(tmp_path, cli_env):
    bad = tmp_path / "model.yaml"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    r = subprocess.run([sys.executable, "-m", "meshplan.cli", "trace", str(bad)], env=cli_env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [f"meshplan: error: model config '{bad}': not UTF-8 text (byte 0xff at offset 0); "
                                     f"expected YAML"]


def test_verbose_names_the_defaulted_fields(capsys):
    assert main(["--verbose", "trace", "tiny"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("model config tiny: defaults used for ")
    assert "n_shared_experts=0" in line and "tie_embeddings=False" in line and "vocab_size" not in line
