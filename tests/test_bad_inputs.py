"""Bad inputs: one clear error each (exit 2 or a MASError naming the bad value and the fix, no traceback),
and an earlier finished run's files byte-identical afterwards. Also: config-aware resume, a planted
pickle checkpoint, one process per run directory, a process killed inside every output write."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm_mas.errors import ConfigError, DataError, NumericalError
from llm_mas.models.registry import shipped_models_dir
from llm_mas.run import run
from llm_mas.run_config import load_mas_config

ROOT = Path(__file__).resolve().parents[1]
FINISHED = "finished"
BASE_OVERRIDES = ["data.n_train=64", "data.n_valid=32", "train.max_steps=2", "train.batch_size=32", "k=16",
                  "progress=false"]


def _base(out_dir) -> dict:
    return {"name": FINISHED, "out_dir": str(out_dir), "variables": ["full"],
            "models": [{"name": "multiobject-gru-s0"}, {"name": "multiobject-gru-s1"}]}


def _config(out_dir, *overrides, base=None):
    return load_mas_config(None, [*BASE_OVERRIDES, *overrides], base=base or _base(out_dir))


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    """The run's files (not its lock, not the temporary file of a write killed before its rename)."""
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir())
            if p.is_file() and p.name != ".lock" and not p.name.endswith(".tmp")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (its files must never change under any bad input)."""
    out = tmp_path_factory.mktemp("runs")
    run(_config(out), log=lambda s: None)
    run_dir = out / FINISHED
    return out, run_dir, _snapshot(run_dir)


def _model_copy(tmp_path: Path, name: str = "multiobject-gru-s1") -> Path:
    target = tmp_path / f"copy-{name}"
    shutil.copytree(shipped_models_dir() / name, target)
    return target


def _nan_weights(tmp_path):
    d = _model_copy(tmp_path)
    from safetensors.torch import load_file, save_file
    state = load_file(str(d / "model.safetensors"))
    state["rnns.0.weight_hh_l0"][0, :3] = float("nan")
    save_file(state, str(d / "model.safetensors"))
    return d


def _truncated_weights(tmp_path):
    d = _model_copy(tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    return d


def _overwritten_header(tmp_path):
    d = _model_copy(tmp_path)
    data = bytearray((d / "model.safetensors").read_bytes())
    data[8:40] = b"\xff" * 32
    (d / "model.safetensors").write_bytes(bytes(data))
    return d


def _overwritten_data(tmp_path):
    d = _model_copy(tmp_path)
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-400:-200] = b"\xff" * 200   # 0xffffffff is a NaN in float32
    (d / "model.safetensors").write_bytes(bytes(data))
    return d


def _lstm_in_gru_dir(tmp_path):
    d = _model_copy(tmp_path)
    shutil.copy(shipped_models_dir() / "multiobject-lstm-s0" / "model.safetensors", d / "model.safetensors")
    return d


def _manifest_mismatch(tmp_path, monkeypatch):
    """A models directory whose manifest lists multiobject-gru-s1 as a GRU but the directory holds a Transformer."""
    root = tmp_path / "models"
    root.mkdir()
    manifest = json.loads((shipped_models_dir() / "manifest.json").read_text())
    for name in ("multiobject-gru-s0",):
        shutil.copytree(shipped_models_dir() / name, root / name)
    shutil.copytree(shipped_models_dir() / "multiobject-transformer-s0", root / "multiobject-gru-s1")
    (root / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("LLM_MAS_MODELS_DIR", str(root))


def _two_models(first: str, second: str) -> dict:
    return {"models": [{"name": first}, {"name": second}]}


# (id, function(out, tmp_path, monkeypatch) raising, expected exception type, key words of the message)
def _api(*overrides, base_update=None):
    def call(out, tmp_path, monkeypatch):
        base = _base(out)
        base["name"] = "bad"
        base.update(base_update or {})
        run(_config(out, *overrides, base=base), log=lambda s: None)
    return call


def _with_model(make, *overrides):
    def call(out, tmp_path, monkeypatch):
        d = make(tmp_path)
        base = _base(out)
        base.update(name="bad", **_two_models("multiobject-gru-s0", str(d)))
        run(_config(out, *overrides, base=base), log=lambda s: None)
    return call


def _resume_with(*overrides):
    def call(out, tmp_path, monkeypatch):
        run(_config(out, *overrides), log=lambda s: None)
    return call


def _manifest_case(out, tmp_path, monkeypatch):
    _manifest_mismatch(tmp_path, monkeypatch)
    base = _base(out)
    base["name"] = "bad"
    run(_config(out, base=base), log=lambda s: None)


def _yaml_file(text: str):
    def call(out, tmp_path, monkeypatch):
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        run(load_mas_config(path, [f"out_dir={out}"]), log=lambda s: None)
    return call


def _compare(**kwargs):
    def call(out, tmp_path, monkeypatch):
        import llm_mas
        llm_mas.compare(out_dir=str(out), data={"n_train": 64, "n_valid": 32}, train={"max_steps": 2},
                        progress=False, **kwargs)
    return call


def _hf(**entry):
    def call(out, tmp_path, monkeypatch):
        from llm_fixtures import tiny_qwen2_dir
        model = {"kind": "hf", "name": str(tiny_qwen2_dir(0)), "recording": str(tmp_path / "no-recording"),
                 **entry}
        base = {"name": "bad", "out_dir": str(out), "models": [model, dict(model)], "k": 4,
                "data": {"stepwise": True, "n_train": 8, "n_valid": 8}, "train": {"max_steps": 1}}
        run(load_mas_config(None, [], base=base), log=lambda s: None)
    return call


def _hf_garbage_recording(out, tmp_path, monkeypatch):
    rec = tmp_path / "rec"
    rec.mkdir()
    (rec / "recording.safetensors").write_bytes(b"not a safetensors file")
    (rec / "recording.json").write_text("{}")
    _hf(recording=str(rec))(out, tmp_path, monkeypatch)


LMS = Path(__file__).resolve().parents[1] / "llm_mas" / "data" / "lms"


def _cf_run(models, **data):
    """A counterfactual run of shipped LMs (kind: hf) on ``data`` (dataset or task)."""
    def call(out, tmp_path, monkeypatch):
        if "rows" in data:
            path = tmp_path / "cf.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in data.pop("rows")))
            data["dataset"] = str(path)
        base = {"name": "bad", "out_dir": str(out), "variables": ["full"], "k": 8, "train": {"max_steps": 1},
                "models": [{"kind": "hf", "name": str(LMS / m), "site": "layer0"} for m in models],
                "data": {"n_train": 8, "n_valid": 4, **data}}
        run(load_mas_config(None, [], base=base), log=lambda s: None)
    return call


def _tensors(**change):
    """Counterfactual tensors for the tiny GRU of `_modules` (5 steps, 3 inputs), with fields changed."""
    n = 8
    labels = torch.full((n, 5), -100)
    labels[:, -1] = torch.arange(n) % 2
    pos = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    fields = dict(base=torch.randn(n, 5, 3), source=torch.randn(n, 5, 3), base_positions=pos,
                  source_positions=pos, labels=labels)
    for key, value in change.items():
        fields[key] = value(fields[key]) if callable(value) else value
    from llm_mas import CounterfactualTensors
    return CounterfactualTensors(**fields)


def _modules(data=None, site="rnn", **kwargs):
    def call(out, tmp_path, monkeypatch):
        from open_fixtures import GRUNet

        import llm_mas
        llm_mas.compare(models=[GRUNet(4, 0), GRUNet(4, 1)], data=_tensors() if data is None else data, site=site,
                        name="bad", out_dir=str(out), train={"max_steps": 1}, progress=False, **kwargs)
    return call


def _module_config(**entry):
    def call(out, tmp_path, monkeypatch):
        _tensors().save(tmp_path / "cf")
        model = {"kind": "module", "name": "m", "site": "rnn", "factory": "open_fixtures:gru_net", **entry}
        base = {"name": "bad", "out_dir": str(out), "models": [model, dict(model)],
                "data": {"dataset": str(tmp_path / "cf")}, "train": {"max_steps": 1}}
        run(load_mas_config(None, [], base=base), log=lambda s: None)
    return call


# the README's old text for the binding task: the binding LMs' tokenizer has '<bos>' / '<eos>', not 'B' / 'E'
OLD_BINDING_ROWS = [{"base": "B a = 3 , b = 5 , c = 1 ; ? b", "source": "B d = 7 , b = 2 ; ? b",
                     "continuation": "2 E"},
                    {"base": "<bos> a = 3 , b = 5 , c = 1 ; ? b", "source": "<bos> d = 7 , b = 2 ; ? b",
                     "continuation": "2 <eos>"}] * 3


def _modules_without_tensors(out, tmp_path, monkeypatch):
    from open_fixtures import GRUNet

    import llm_mas

    llm_mas.compare(models=[GRUNet(4, 0), GRUNet(4, 1)], site="rnn", name="bad", out_dir=str(out))


def _task_models_on_tensors(out, tmp_path, monkeypatch):
    import llm_mas

    ids = torch.ones(8, 5, dtype=torch.long)
    llm_mas.compare(models=[{"kind": "task", "name": "multiobject-gru-s0", "site": "hidden_state"},
                            {"kind": "task", "name": "multiobject-gru-s9", "site": "hidden"}],
                    data=_tensors(base=ids, source=ids), name="bad", out_dir=str(out))


def _set(rows, field_value):
    def change(t):
        t = t.clone()
        t[rows] = field_value
        return t
    return change


CASES = [
    ("unknown key", _api("nosuchkey=1"), ConfigError, ["nosuchkey", "unknown key"]),
    ("malformed override", _api("trainlr"), ConfigError, ["trainlr", "key.sub=value"]),
    ("n_train=0", _api("data.n_train=0"), ConfigError, ["data.n_train must be >= 1"]),
    ("lr=-1", _api("train.lr=-1"), ConfigError, ["train.lr must be > 0"]),
    ("lr=inf", _api("train.lr=inf"), ConfigError, ["train.lr", "not a finite number"]),
    ("lr=nan", _api("train.lr=.nan"), ConfigError, ["train.lr", "not a finite number"]),
    ("value_range reversed", _api("variables=[count]", "data.value_range=[5,1]"), ConfigError,
     ["value_range", "is empty", "[1, 5]"]),
    ("cl.epsilon=2", _api("cl.epsilon=2"), ConfigError, ["cl.epsilon must be in [0, 1]"]),
    ("unknown alignment", _api("models.0.alignment=rotation"), ConfigError, ["rotation", "orthogonal"]),
    ("bad alignment_options", _api("models.0.alignment_options={orthogonal_map: expm}"), ConfigError,
     ["alignment_options", "expm"]),
    ("name=../x", _api("name=../x"), ConfigError, ["name", "'../x'", "plain directory name"]),
    ("name=a/b", _api("name=a/b"), ConfigError, ["'a/b'", "plain directory name"]),
    ("name=.hidden", _api("name=.hidden"), ConfigError, ["'.hidden'", "plain directory name"]),
    ("k=0", _api("k=0"), ConfigError, ["k must be >= 1"]),
    ("eval.batch_size=0", _api("eval.batch_size=0"), ConfigError, ["eval.batch_size must be >= 1"]),
    ("bad site", _api("models.1.site=no_such_module"), ConfigError, ["models.1.site", "no_such_module"]),
    ("k larger than the width", _api("k=1000"), ConfigError, ["k=1000", "smallest latent width", "128"]),
    ("k blocks do not fit", _api("k=100", "variables=[count,phase]"), ConfigError, ["k=100", "use k <= 64"]),
    ("cross with one model", _api("directions=cross", base_update={"models": [{"name": "multiobject-gru-s0"}]}),
     ConfigError, ["'cross'", "second model"]),
    ("device cuda without CUDA", _api("device=cuda"), ConfigError, ["'cuda'", "CUDA"]),
    ("device cuda:3", _api("device=cuda:3"), ConfigError, ["cuda:3"]),
    ("bad variable kept with other problems", _api("variables=[nosuchvar]", "train.lr=-1", "nosuchkey=1"),
     ConfigError, ["nosuchvar", "train.lr must be > 0", "nosuchkey"]),
    ("models as strings", _api(base_update={"models": ["multiobject-gru-s0", "multiobject-gru-s1"]}),
     ConfigError, ["give mappings", "{name: multiobject-gru-s0}"]),
    ("null_subspace with low_rank", _api("null_subspace=true", "variables=[count]", "models.0.alignment=low_rank"),
     ConfigError, ["null_subspace", "low_rank", "alignment: orthogonal"]),
    ("unknown model", _api("models.1.name=multiobject-gru-s9"), ConfigError,
     ["multiobject-gru-s9", "multiobject-gru-s0"]),
    ("invalid YAML", _yaml_file("models: [\n  {name: multiobject-gru-s0"), ConfigError, ["not valid YAML"]),
    ("missing config file", lambda out, tmp, mp: load_mas_config(tmp / "nope.yaml"), ConfigError,
     ["nope.yaml", "does not exist"]),
    ("config path is a directory", lambda out, tmp, mp: load_mas_config(tmp), ConfigError, ["is a directory"]),
    ("NaN weights", _with_model(_nan_weights), DataError,
     ["model.safetensors", "'rnns.0.weight_hh_l0' has 3 non-finite values", "retrain or restore"]),
    ("truncated weights", _with_model(_truncated_weights), DataError,
     ["model.safetensors", "corrupted", "retrain or restore"]),
    ("overwritten header bytes", _with_model(_overwritten_header), DataError,
     ["model.safetensors", "not a readable safetensors file"]),
    ("overwritten data bytes", _with_model(_overwritten_data), DataError,
     ["model.safetensors", "non-finite values", "retrain or restore"]),
    ("LSTM weights in a GRU directory", _with_model(_lstm_in_gru_dir), DataError,
     ["does not hold the weights of the gru model", "config.yaml"]),
    ("Transformer under a GRU's name", _manifest_case, DataError,
     ["manifest lists a 'gru' model", "'transformer'", "models.registry"]),
    ("changed k on resume", _resume_with("k=8"), ConfigError, ["k: 16 -> 8", "resume=false", "name"]),
    ("changed model on resume", _resume_with("models.1.name=multiobject-gru-s2"), ConfigError,
     ["models.1.name: 'multiobject-gru-s1' -> 'multiobject-gru-s2'", "models.1.model.safetensors"]),
    ("changed seed on resume", _resume_with("seed=1"), ConfigError, ["seed: 0 -> 1"]),
    ("compare: sites for models", _compare(models=["multiobject-gru-s0"], site=["hidden", "hidden"]), ConfigError,
     ["2 sites for 1 models"]),
    ("compare: k too large", _compare(models=["multiobject-gru-s0", "multiobject-gru-s1"], k=500), ConfigError,
     ["k=500", "smallest latent width"]),
    ("hf: missing recording", _hf(), ConfigError, ["no-recording", "holds no recording.safetensors",
                                                     "llm-mas record --model"]),
    ("hf: unknown backend", _hf(backend="jax"), ConfigError, ["backend", "'jax'", "torch, nnsight, tlens"]),
    ("hf: unknown dtype", _hf(dtype="float8"), ConfigError, ["dtype", "'float8'"]),
    ("hf: site hidden", _hf(site="hidden"), ConfigError, ["'hidden' is a task-model site", "embeddings"]),
    ("hf: garbage recording", _hf_garbage_recording, DataError, ["recording"]),
    ("hf dataset: the README's old binding text", _cf_run(["binding-w64-s1"], rows=OLD_BINDING_ROWS), DataError,
     ["binding-w64-s1", "the word 'B' (did you mean '<bos>'?)", "unknown token '<unk>'", "base of rows 1, 3, 5",
      "source of rows 1, 3, 5", "the word 'E'", "continuation of rows 1, 3, 5", "data.allow_unknown_tokens: true"]),
    ("hf task: words the LM's tokenizer lacks", _cf_run(["multiobject-w128-s0"], task="binding"), DataError,
     ["multiobject-w128-s0", "data.task binding", "the word '='", "target of pairs", "source of pairs",
      "data.allow_unknown_tokens: true"]),
    ("tensors: rows differ", _modules(_tensors(source=torch.randn(9, 5, 3))), DataError,
     ["source: 9 rows (shape (9, 5, 3)) but other fields have 8"]),
    ("tensors: token ids of 3 axes", _modules(_tensors(base=torch.zeros(8, 5, 2, dtype=torch.long))), DataError,
     ["base: integer inputs of shape (8, 5, 2); token ids are (N, T)"]),
    ("tensors: positions out of range", _modules(_tensors(base_positions=_set([3, 5], 7))), DataError,
     ["base_positions: rows 3, 5 hold positions outside 0..4", "slot"]),
    ("tensors: empty labels and no position", _modules(_tensors(labels=_set([2, 6], -100),
                                                                source_positions=_set(1, -1))),
     DataError, ["labels: rows 2, 6 score nothing", "source_positions: row 1 have no position"]),
    ("tensors: float labels for cross-entropy", _modules(_tensors(labels=torch.randn(8, 5))), DataError,
     ["labels: dtype torch.float32", "scorer='regression'"]),
    ("tensors: per-model lists for 3 models", _modules(_tensors(base=lambda b: [b, b, b])), DataError,
     ["3 items but the run has 2 models"]),
    ("module: site missing", _modules(site="rnnn"), ConfigError, ["models.0.site", "'rnnn'", "rnn"]),
    ("module: variable not the data's", _modules(variables=["choice"]), ConfigError,
     ["variables", "one variable, 'full'"]),
    ("module: factory does not import", _module_config(factory="no_such_pkg.models:make"), ConfigError,
     ["models.0.factory", "'no_such_pkg.models:make'", "does not import", "ModuleNotFoundError"]),
    ("module: factory attribute missing", _module_config(factory="open_fixtures:gru_nett"), ConfigError,
     ["has no attribute 'gru_nett'"]),
    ("module: factory kwargs wrong", _module_config(kwargs={"width": 3}), ConfigError,
     ["gru_net(**{'width': 3}) raised TypeError", "models.0.kwargs"]),
    ("module: weights missing", _module_config(weights="/nonexistent/w.safetensors"), ConfigError,
     ["models.0.weights", "does not exist"]),
    ("module: no data", lambda out, tmp, mp: run(load_mas_config(None, [], base={
        "name": "bad", "out_dir": str(out), "models": [{"kind": "module", "name": "m", "factory": "a.b:c"}]})),
     ConfigError, ["module models run on counterfactual tensors", "data.dataset"]),
    ("module: compare without tensors", _modules_without_tensors, ConfigError, ["module models run on counterfactual tensors", "data=CounterfactualTensors"]),
    ("tensors: a task model's site", _task_models_on_tensors, ConfigError, ["models.0.site", "'hidden_state'", "models.1.name", "multiobject-gru-s9"]),
    ("module: compare with task=", _modules(task="multiobject"), ConfigError,
     ["task='multiobject'", "'tensors' run", "leave task unset"]),
    ("unknown model kind", _api(base_update={"models": [{"kind": "neurogym", "name": "x"}]}), ConfigError,
     ["models.0.kind: 'neurogym' is not one of 'task', 'hf', 'module'"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_error_and_changes_nothing(case, finished, tmp_path, monkeypatch):
    _, call, exc_type, words = case
    out, run_dir, before = finished
    if "cuda" in case[0] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(exc_type) as err:
        call(out, tmp_path, monkeypatch)
    message = str(err.value)
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    assert "Traceback" not in message
    assert _snapshot(run_dir) == before
    assert not (out / "bad").exists()  # a refused run leaves no directory behind


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "llm_mas.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args, words", [
    (["mas", "no_such_preset"], ["no_such_preset"]),
    (["mas", "gru_gru_hidden", "train.lr=inf", "name=../x"], ["train.lr", "finite", "plain directory name"]),
    (["mas", "{tmp}"], ["is a directory"]),
    (["mas", "gru_gru_hidden", "models.0.site=nowhere", "k=0"], ["models.0.site", "k must be >= 1"]),
])
def test_cli_bad_inputs_exit_2_with_one_message(args, words, finished, tmp_path):
    out, run_dir, before = finished
    args = [a.replace("{tmp}", str(tmp_path)) for a in args] + [f"out_dir={out}"]
    result = _cli(*args)
    assert result.returncode == 2, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert _snapshot(run_dir) == before


def test_help_shows_bracketed_text():
    result = _cli("finetune", "--help")
    assert result.returncode == 0
    assert "[3]" in result.stdout and "[hub]" in result.stdout   # not swallowed as markup
    assert "[default: 1]" in _cli("mas", "--help").stdout


# ------------------------------------------------------------------------------- resume and run directories
def test_unchanged_config_continues_and_a_larger_budget_extends(finished, tmp_path):
    out, run_dir, before = finished
    copy = tmp_path / FINISHED
    shutil.copytree(run_dir, copy)
    result = run(_config(tmp_path), log=lambda s: None)               # same fingerprint: continues (finished)
    assert (copy / "results.json").read_bytes() == before["results.json"]
    assert result.info["steps"] == 2
    logs = []
    result = run(_config(tmp_path, "train.max_steps=3"), log=logs.append)   # a larger budget continues
    assert result.info["steps"] == 3 and any("resumed from" in line for line in logs)


def test_resume_false_starts_over_in_place_and_old_outputs_need_a_fingerprint(finished, tmp_path):
    out, run_dir, before = finished
    shutil.copytree(run_dir, tmp_path / FINISHED)
    (tmp_path / FINISHED / "fingerprint.json").unlink()               # a run directory of an older llm_mas
    with pytest.raises(ConfigError, match="no fingerprint.json.*resume=false"):
        run(_config(tmp_path), log=lambda s: None)
    run(_config(tmp_path, "k=8", "resume=false"), log=lambda s: None)  # start over in place
    assert json.loads((tmp_path / FINISHED / "fingerprint.json").read_text())["values"]["k"] == 8
    assert (tmp_path / FINISHED / "results.json").read_bytes() != before["results.json"]


def test_a_failed_start_over_keeps_the_old_run(finished, tmp_path):
    out, run_dir, before = finished
    shutil.copytree(run_dir, tmp_path / FINISHED)
    bad = _nan_weights(tmp_path)
    with pytest.raises(DataError):
        run(_config(tmp_path, "resume=false", f"models.1.name={bad}"), log=lambda s: None)
    assert _snapshot(tmp_path / FINISHED) == before


PAYLOAD = """
import os, pickle, sys
class Evil:
    def __reduce__(self):
        return (open, (sys.argv[2], "w"))
with open(sys.argv[1], "wb") as f:
    pickle.dump({"step": Evil()}, f)
"""


def test_planted_pickle_checkpoint_does_not_run(finished, tmp_path):
    out, run_dir, _ = finished
    victim = tmp_path / FINISHED
    shutil.copytree(run_dir, victim)                                   # a valid fingerprint: resume path taken
    marker = tmp_path / "MARKER"
    subprocess.run([sys.executable, "-c", PAYLOAD, str(victim / "checkpoint.pt"), str(marker)], check=True)
    with pytest.raises(DataError, match="not a plain tensor file"):
        run(_config(tmp_path), log=lambda s: None)
    assert not marker.exists()
    result = _cli("mas", str(victim / "config.yaml"), f"out_dir={tmp_path}")
    assert result.returncode == 2 and "not a plain tensor file" in result.stderr
    assert "Traceback" not in result.stderr and not marker.exists()


HOLDER = """
import sys, time
from llm_mas.files import DirectoryLock
with DirectoryLock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_second_process_is_refused_naming_the_holder(finished):
    out, run_dir, before = finished
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"in use by process {child.pid}"):
            run(_config(out), log=lambda s: None)
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    assert _snapshot(run_dir) == before


def test_non_finite_loss_stops_training_naming_the_step_and_direction(finished, tmp_path, monkeypatch):
    from llm_mas.problems.task import TaskModelProblem

    real = TaskModelProblem.loss
    calls = {"n": 0}

    def poisoned(self, maps, rows):
        calls["n"] += 1
        loss, info = real(self, maps, rows)
        return (loss * math.nan if calls["n"] == 2 else loss), info

    def poisoned_direction(self, maps, rows):
        return {(0, 1, "full"): math.nan, (1, 0, "full"): 0.5}

    monkeypatch.setattr(TaskModelProblem, "loss", poisoned)
    monkeypatch.setattr(TaskModelProblem, "direction_losses", poisoned_direction)
    with pytest.raises(NumericalError, match=r"training step 2: the loss is not finite.*0→1:full"):
        run(_config(tmp_path, "train.eval_every=1"), log=lambda s: None)


def test_non_finite_latents_are_refused_before_the_run_directory_changes(tmp_path, monkeypatch):
    """Finite weights that still give inf latents (an overflow on the model's own inputs): one DataError naming
    the model and the site, and no run directory."""
    from llm_mas.backends.torch_hooks import TorchHookBackend

    real = TorchHookBackend.collect

    def overflowing(self, model, inputs, sites, **kwargs):
        out = real(self, model, inputs, sites, **kwargs)
        if getattr(model, "arch", None) == "gru" and model is overflowing.target:
            for latents in out.values():
                latents[0, 1, 0] = math.inf
        return out

    config = _config(tmp_path)
    from llm_mas.problems import task as task_problem

    real_load = task_problem.load_task_model

    def load(name, *args, **kwargs):
        model = real_load(name, *args, **kwargs)
        if str(name).endswith("gru-s1"):
            overflowing.target = model
        return model

    overflowing.target = None
    monkeypatch.setattr(task_problem, "load_task_model", load)
    monkeypatch.setattr(TorchHookBackend, "collect", overflowing)
    with pytest.raises(DataError, match=r"models\.1 \(multiobject-gru-s1\): 1 non-finite latent values at site"):
        run(config, log=lambda s: None)
    assert not (tmp_path / config.name).exists()


# ------------------------------------------------------------------------------- killed inside every write
KILLER = """
import os, signal, sys
import llm_mas.files as files
n = int(sys.argv[1])
real = os.replace
count = {"n": 0}
def replace(src, dst):
    count["n"] += 1
    if count["n"] == n:
        os.kill(os.getpid(), signal.SIGKILL)   # dies between writing the temporary file and renaming it
    return real(src, dst)
files.os = type(os)("os_proxy")
files.os.__dict__.update(os.__dict__)
files.os.replace = replace
from llm_mas.run import run
from llm_mas.run_config import load_mas_config
cfg = load_mas_config(None, sys.argv[3:], base={"name": "finished", "out_dir": sys.argv[2], "variables": ["full"],
    "models": [{"name": "multiobject-gru-s0"}, {"name": "multiobject-gru-s1"}]})
run(cfg, log=lambda s: None)
print("writes", count["n"])
"""


def _readable(run_dir: Path) -> None:
    """Every output parses (none is empty or half-written)."""
    from safetensors.torch import load_file

    from llm_mas.files import load_torch_state
    json.loads((run_dir / "results.json").read_text())
    json.loads((run_dir / "summary.json").read_text())
    json.loads((run_dir / "fingerprint.json").read_text())
    load_file(str(run_dir / "alignments.safetensors"))
    load_torch_state(run_dir / "checkpoint.pt")
    assert (run_dir / "iia_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert (run_dir / "history.csv").read_text().startswith("step,")
    assert (run_dir / "config.yaml").read_text().startswith("# ")


@pytest.mark.slow
def test_a_kill_inside_any_write_leaves_the_previous_outputs_intact(finished, tmp_path):
    out, run_dir, before = finished
    args = [*BASE_OVERRIDES, "train.max_steps=4"]   # a larger budget: continues the finished run
    clean = tmp_path / "clean"
    shutil.copytree(run_dir, clean / FINISHED)
    done = subprocess.run([sys.executable, "-c", KILLER, "0", str(clean), *args], capture_output=True, text=True,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    n_writes = int(done.stdout.split()[-1])
    after = _snapshot(clean / FINISHED)
    assert n_writes >= 8   # fingerprint, config, 1+ checkpoints, results, alignments, history, summary, plot
    for n in range(1, n_writes + 1):
        trial = tmp_path / f"kill{n}"
        shutil.copytree(run_dir, trial / FINISHED)
        killed = subprocess.run([sys.executable, "-c", KILLER, str(n), str(trial), *args], capture_output=True,
                                text=True, cwd=ROOT)
        assert killed.returncode == -9, killed.stderr
        files = _snapshot(trial / FINISHED)
        assert set(files) == set(before), n

        def same(data: bytes, directories=(trial, clean, out)) -> bytes:  # config.yaml names its out_dir
            for directory in directories:
                data = data.replace(str(directory).encode(), b"OUT")
            return data

        for name, data in files.items():
            if name in ("checkpoint.pt", "history.csv", "summary.json"):
                continue  # they hold timings (read back by _readable below)
            assert same(data) in (same(before[name]), same(after[name])), \
                f"write {n}: {name} is neither the old nor the new file"
        _readable(trial / FINISHED)
        # the dead process's lock is taken over and the run completes as an uninterrupted one
        resumed = subprocess.run([sys.executable, "-c", KILLER, "0", str(trial), *args], capture_output=True,
                                 text=True, cwd=ROOT)
        assert resumed.returncode == 0, resumed.stderr
        assert (trial / FINISHED / "results.json").read_bytes() == after["results.json"], n
        assert not [p for p in (trial / FINISHED).iterdir() if p.name.endswith(".tmp")]  # debris removed
