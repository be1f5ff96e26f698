"""recipes.common.cli.recipe_front_door: presets and overrides, the run directory and its config.yaml,
--only / --report, and exit codes (the recipes' shared command line)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from llm_mas.errors import ConfigError, DataError
from recipes.common.cli import recipe_front_door


@dataclass
class Toy:
    name: str = "toy"
    out_dir: str = "runs"
    steps: int = 1

    def validate(self) -> list[str]:
        return [] if self.steps >= 1 else [f"steps={self.steps} must be >= 1"]


def call(tmp_path, argv, run=None, **kwargs):
    preset = tmp_path / "toy.yaml"
    preset.write_text(f"out_dir: {tmp_path}\nsteps: 2\n")
    seen = {}

    def default_run(invocation):
        seen["call"] = invocation
        return 0

    code = recipe_front_door(argv, name="toy", doc="Toy recipe.\n", config_cls=Toy, run=run or default_run,
                             default_config=str(preset), **kwargs)
    return code, seen.get("call")


def test_default_preset_overrides_run_dir_and_config_yaml(tmp_path):
    code, invocation = call(tmp_path, ["steps=5", "--only", "a,b"])
    assert code == 0
    assert invocation.config.steps == 5 and invocation.only == ["a", "b"] and not invocation.report
    assert invocation.run_dir == tmp_path / "toy" and not invocation.smoke
    saved = (tmp_path / "toy" / "config.yaml").read_text()
    assert saved.startswith("# python -m recipes.toy steps=5 --only a,b") and "steps: 5" in saved
    code, invocation = call(tmp_path, ["--smoke", "--report"])
    assert code == 0 and invocation.run_dir == tmp_path / "toy-smoke" and invocation.report


def test_presets_and_run_dir_hooks(tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text(f"out_dir: {tmp_path}\nname: other\n")
    code, invocation = call(tmp_path, ["named", "--smoke"], preset=lambda config, smoke: other if config == "named"
                            and smoke else None, run_dir_of=lambda config, smoke: tmp_path / "here")
    assert code == 0 and invocation.config.name == "other" and invocation.run_dir == tmp_path / "here"


def test_exit_codes(tmp_path, capsys):
    assert call(tmp_path, ["steps=0"])[0] == 2
    assert "steps=0 must be >= 1" in capsys.readouterr().err

    def fails(invocation):
        raise DataError("the data went missing")

    assert call(tmp_path, [], run=fails)[0] == 2
    assert call(tmp_path, [], run=fails, failure_code=1)[0] == 1
    assert "the data went missing" in capsys.readouterr().err

    def bad_config(invocation):
        raise ConfigError("bad --only")

    assert call(tmp_path, [], run=bad_config, failure_code=1)[0] == 2
    with pytest.raises(SystemExit):
        call(tmp_path, ["--report", "--only", "a"])


def test_only_with_spaces_names_the_comma_list(tmp_path, capsys):
    # `--only a b c`: b and c land among the positional overrides; one error shows the comma list to write
    code, invocation = call(tmp_path, ["steps=3", "--only", "a", "b", "c"])
    assert code == 2 and invocation is None
    err = capsys.readouterr().err
    assert "--only takes one comma list" in err and "write --only a,b,c" in err
    assert "must look like key.sub=value" not in err
