import dataclasses
import tomllib

import pytest

from ode_lm.config import (ADJOINTS, FAMILIES, FROM_DROPOUT, SECTIONS, SOLVERS, Config, ConfigError, DataConfig,
                           ModelConfig, ODEConfig, config_from_dict, load_config, validate_key)
from tests.conftest import REPO, run_cli


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_mirror_reference_configuration():
    c = load_config(None)
    assert (c.model.dim, c.model.heads, c.ode.steps, c.model.max_positions, c.model.dropout) == (256, 4, 6, 512, 0.1)


def test_overrides_are_parsed_with_the_field_type(tmp_path):
    c = load_config(write(tmp_path, "[ode]\nsolver = 'euler'\n"),
                    ["ode.solver=rk4", "train.steps=200", "optim.lr=1e-4", "ode.adaptive=true",
                     "data.paths=a.txt,b.txt", "model.dropout=0"])
    assert c.ode.solver == "rk4" and c.train.steps == 200 and c.optim.lr == 1e-4
    assert c.ode.adaptive is True and c.data.paths == ("a.txt", "b.txt")
    assert isinstance(c.model.dropout, float)


def test_resolved_config_round_trips():
    c = load_config(None, ["ode.solver=tsit5", "data.paths=x", "train.sample_prompt=a\"b"])
    assert config_from_dict(tomllib.loads(c.to_toml())) == c


@pytest.mark.parametrize("text, override, needles", [
    ("[modle]\ndim = 3\n", None, ["unknown section [modle]", 'did you mean "model"']),
    ("[ode]\nsolvr = 'rk4'\n", None, ["unknown key 'solvr'", "[ode]", 'did you mean "solver"']),
    ("[ode]\nsolver = 'rk44'\n", None, ["solver = 'rk44'", "euler, heun", 'did you mean "rk4"']),
    ("[train]\nsteps = 'ten'\n", None, ["[train] steps", "expected an integer"]),
    ("[train]\nsteps = 0\n", None, ["[train] steps = 0", "out of range", ">= 1"]),
    ("[model]\ndropout = 1.5\n", None, ["[model] dropout", "< 1.0"]),
    ("[model]\ndim = 30\nheads = 4\n", None, ["heads = 4", "dim = 30"]),
    ("[ode]\nsolver = 'euler'\nadaptive = true\n", None, ["no error estimate", "rk4"]),
    ("[ode]\nsteps = [\n", None, ["malformed TOML", "line"]),
    ("", "ode.adjoint=magic", ["adjoint = 'magic'", ", ".join(ADJOINTS)]),
    ("", "train.stepz=3", ["unknown key 'stepz'", 'did you mean "steps"', "override"]),
    ("", "nodot=3", ["not a dotted key"]),
    ("", "model.family=transformer", ["family", ", ".join(FAMILIES)]),
    ("[ode]\nadjoint = 'backsolve'\ncheckpoint_saves = 'matmuls'\n", None,
     ['checkpoint_saves = "matmuls"', 'adjoint = "backsolve"', 'leave checkpoint_saves = "states"']),
    ("[ode]\nsolver = 'heun'\nadaptive = true\n", "ode.unroll=true",
     ['unroll = "unroll"', "adaptive = true", 'leave unroll = "auto" or "scan"']),
    ("", "ode.unroll=sometimes", ["unroll = 'sometimes'", "auto, scan, unroll"]),
])
def test_every_error_kind_names_the_key(tmp_path, text, override, needles):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), [override] if override else [])
    message = str(info.value)
    assert str(tmp_path / "c.toml") in message or "override" in message
    for needle in needles:
        assert needle in message, message


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.toml")


def test_a_section_made_in_code_is_checked_like_a_file():
    with pytest.raises(ConfigError) as info:
        ODEConfig(solver="nope")
    assert info.value.key == "ode.solver"
    assert str(info.value).startswith("ode.solver = 'nope' is not allowed; choose one of " + ", ".join(SOLVERS))
    with pytest.raises(ConfigError, match=r"^ode.steps = 0 is out of range; it must be >= 1$"):
        dataclasses.replace(Config().ode, steps=0)
    with pytest.raises(ConfigError, match=r"^model.bias = 'no': expected true or false$"):
        ModelConfig(bias="no")
    with pytest.raises(ConfigError, match=r'^ode.solver = "euler" has no error estimate.*rk4'):
        dataclasses.replace(ODEConfig(solver="rk4", adaptive=True), solver="euler")  # a rule inside [ode]
    with pytest.raises(ConfigError, match="^data.source = \"text\" needs paths"):
        DataConfig(source="text")
    with pytest.raises(ConfigError, match="^model.bias = false: the rank-one hypernetwork"):
        ModelConfig(family="hypernetwork", hyper_form="rank_one", bias=False)  # once a traceback in nn/
    # Values are stored as a file's would be: a list as a tuple, an integer as a float.
    assert DataConfig(paths=["a.txt"]).paths == ("a.txt",) and type(ODEConfig(rtol=1).rtol) is float


def test_a_rule_across_sections_is_checked_on_a_config_made_in_code():
    cfg = Config()
    with pytest.raises(ConfigError, match=r"^data.seq_len = 1024 exceeds model.max_positions = 512"):
        dataclasses.replace(cfg, data=DataConfig(seq_len=1024))
    standard = dataclasses.replace(cfg.model, family="standard")
    with pytest.raises(ConfigError, match=r'^ode.grid_jitter = 0.5 applies to ODE families.*model.family = "standard"'):
        Config(model=standard, ode=ODEConfig(grid_jitter=0.5))
    # From a file, the same error says where: the file, then the key as the file spells it.
    with pytest.raises(ConfigError, match=r"^c.toml: \[data\] seq_len = 1024 exceeds model.max_positions"):
        config_from_dict({"data": {"seq_len": 1024}}, "c.toml")


def test_every_default_is_allowed_by_its_own_knob():
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.default != FROM_DROPOUT:  # "take model.dropout", resolved on construction
                assert validate_key(f"{section}.{f.name}", f.default, "defaults") == f.default


@pytest.mark.parametrize("args", [
    ["train", "configs/quickstart.toml", "ode.solver=rk44"],
    ["train", "does/not/exist.toml"],
    ["train", "configs/quickstart.toml", "train.steps=-3"],
    ["train", "configs/quickstart.toml", "data.seq_len=100000"],  # a rule between sections
])
def test_cli_reports_config_errors_in_one_line_with_status_2(args):
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("ode-lm: error:"), proc.stderr


def test_shipped_configs_load():
    for path in sorted((REPO / "configs").rglob("*.toml")):
        if "ablations" not in path.parts:
            assert isinstance(load_config(path), Config)


def test_overrides_apply_in_any_order(tmp_path):
    import itertools

    items = ["data.source=text", 'data.paths=["input.txt"]', "data.tokenizer=char"]
    configs = {load_config(REPO / "configs" / "quickstart.toml", list(p)) for p in itertools.permutations(items)}
    assert len(configs) == 1
    (cfg,) = configs
    assert (cfg.data.source, cfg.data.paths, cfg.data.tokenizer) == ("text", ("input.txt",), "char")


@pytest.mark.parametrize("overrides, blamed, needle", [
    (["data.source=text"], "override 'data.source=text'", 'source = "text" needs paths'),
    (["model.dim=100", "model.heads=3", "ode.steps=2"], "overrides 'model.dim=100', 'model.heads=3'",
     "heads = 3 does not divide dim = 100"),
    (["ode.steps=2", "data.seq_len=0"], "override 'data.seq_len=0'", "out of range"),
    (["data.tokenizer=bpe", "data.vocab_size=100"], "overrides 'data.tokenizer=bpe', 'data.vocab_size=100'",
     "vocab_size = 100 is below the 256 byte symbols"),
    (["data.tokenizer_file=tok.json"], "override 'data.tokenizer_file=tok.json'", 'with tokenizer = "bpe"'),
    (['data.val_paths=["v.txt"]'], "override 'data.val_paths=[\"v.txt\"]'", 'belongs to source = "text"'),
])
def test_an_override_error_names_the_overrides_involved(overrides, blamed, needle):
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs" / "quickstart.toml", overrides)
    message = str(info.value)
    assert message.startswith(blamed + ": ") and needle in message, message


def test_a_file_error_an_override_does_not_touch_names_the_file(tmp_path):
    path = write(tmp_path, "[model]\ndim = 30\nheads = 4\n")
    with pytest.raises(ConfigError, match="c.toml: .*heads = 4 does not divide dim = 30"):
        load_config(path, ["ode.steps=2"])
    assert load_config(path, ["model.dim=32"]).model.dim == 32  # an override may fix the file


def test_unroll_reads_its_old_booleans_and_auto_unrolls_short_gpu_solves(tmp_path):
    from ode_lm.ode.sensitivities import AUTO_UNROLL_MAX_NFE, unrolls

    assert load_config(write(tmp_path, "[ode]\nunroll = true\n"), []).ode.unroll == "unroll"
    assert load_config(write(tmp_path, "[ode]\nunroll = false\n"), []).ode.unroll == "scan"
    assert load_config(write(tmp_path, ""), ["ode.unroll=scan"]).ode.unroll == "scan"
    assert ODEConfig(unroll=True).unroll == "unroll"  # the Python form too
    auto = ODEConfig(solver="euler", steps=12)
    assert auto.unroll == "auto" and unrolls(auto, "gpu") and not unrolls(auto, "cpu")
    assert not unrolls(ODEConfig(solver="heun", steps=AUTO_UNROLL_MAX_NFE // 2 + 1), "gpu")  # too long
    assert unrolls(ODEConfig(solver="heun", steps=AUTO_UNROLL_MAX_NFE // 2), "gpu")
    assert not unrolls(ODEConfig(solver="tsit5", adaptive=True), "gpu")
    assert unrolls(ODEConfig(unroll="unroll"), "cpu") and not unrolls(ODEConfig(unroll="scan", steps=2), "gpu")
