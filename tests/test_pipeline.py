import pytest

from vitqc.errors import VitqcError
from vitqc.pipeline import Pipeline, builtin_pipelines, load_pipeline


def test_builtin_pipelines_load_and_every_step_is_a_registered_pass():
    pipes = builtin_pipelines()
    assert {"minmax-w8a8", "minmax-w6a6", "minmax-w4a8", "minmax-w4a4"} <= set(pipes)
    assert {f"joint-{b}" for b in ("w8a8", "w6a6", "w4a8", "w4a4", "w3a3", "w1.58a8")} <= set(pipes)
    for pipe in pipes.values():
        assert pipe.description
        pipe.validate()  # raises on unknown passes/options


def test_resolved_dict_has_every_option():
    d = load_pipeline("minmax-w4a4").to_dict()
    iq = next(p for p in d["passes"] if p["name"] == "insert_quantizers")
    assert iq["options"]["weight_bits"] == 4 and iq["options"]["act_bits"] == 4
    assert iq["options"]["keep"] == {"head": 8, "patch_embed": 8}
    assert "weight_granularity" in iq["options"]


def test_overrides_set_options_and_reject_bad_ones():
    pipe = load_pipeline("minmax-w8a8").with_overrides(["calibrate.method=mse", "insert_quantizers.act_bits=6"])
    steps = {s.name: s for s in pipe.steps}
    assert steps["calibrate"].instantiate().options.method == "mse"
    assert steps["insert_quantizers"].instantiate().options.act_bits == 6.0
    assert load_pipeline("minmax-w8a8").steps[2].options == {"method": "minmax", "weight_method": "minmax"}
    with pytest.raises(VitqcError, match="no pass 'nope'"):
        load_pipeline("minmax-w8a8").with_overrides(["nope.x=1"])
    with pytest.raises(VitqcError, match="unknown option 'methd'"):
        load_pipeline("minmax-w8a8").with_overrides(["calibrate.methd=mse"])
    with pytest.raises(VitqcError, match="must be one of"):
        load_pipeline("minmax-w8a8").with_overrides(["calibrate.method=best"])
    with pytest.raises(VitqcError, match="PASS.OPTION=VALUE"):
        load_pipeline("minmax-w8a8").with_overrides(["calibrate=mse"])


def test_user_toml_and_text_and_list_forms(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\n[[passes]]\nname = "canonicalize"\n[[passes]]\nname = "insert_quantizers"\n'
                    'options = { weight_bits = 6 }\n')
    pipe = load_pipeline(str(path))
    assert pipe.name == "mine" and pipe.steps[1].options == {"weight_bits": 6}
    text = Pipeline.parse("canonicalize,insert_quantizers{weight_bits=4,act_bits=8},calibrate")
    assert [s.name for s in text.steps] == ["canonicalize", "insert_quantizers", "calibrate"]
    assert text.steps[1].options == {"weight_bits": 4, "act_bits": 8}
    listed = Pipeline.from_list(["canonicalize", ("insert_quantizers", {"weight_bits": 4, "act_bits": 8}), "calibrate"])
    assert listed.to_dict()["passes"] == text.to_dict()["passes"]


def test_unknown_pipeline_and_bad_files(tmp_path):
    with pytest.raises(VitqcError, match="unknown pipeline 'nope'.*vitqc pipelines"):
        load_pipeline("nope")
    with pytest.raises(VitqcError, match="not found"):
        load_pipeline(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("passes = [[[")
    with pytest.raises(VitqcError, match="not valid TOML"):
        load_pipeline(str(bad))
    empty = tmp_path / "empty.toml"
    empty.write_text('name = "x"\n')
    with pytest.raises(VitqcError, match="no \\[\\[passes\\]\\]"):
        load_pipeline(str(empty))


def test_long_one_line_pipeline_is_not_mistaken_for_a_path():
    text = ",".join(["canonicalize"] + [f"insert_quantizers{{weight_bits=4,act_bits=4,keep={{head{i}=8}}}}" for i in range(30)])
    assert len(load_pipeline(text).steps) == 31
