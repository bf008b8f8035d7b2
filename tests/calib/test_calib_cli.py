"""``vitqc generate`` and ``vitqc compile --calib SOURCE`` end to end (demo model, tiny diffusion pipeline)."""
import json

import pytest

from tests.conftest import run_cli as run
from vitqc.artifact import load_artifact
from vitqc.calib.cache import read_manifest


def test_generate_then_compile_from_the_cache(tmp_path, capsys):
    cache = tmp_path / "inv"
    code, out, err = run(["generate", "demo", "--calib", "inversion:steps=3", "--out", cache, "--per-class", 3,
                          "--shard-size", 2], capsys)
    assert code == 0, err
    assert "wrote 30 images in 20 shards" in out and f"--calib {cache}" in out
    m = read_manifest(cache)
    assert m["status"] == "complete" and m["options"]["steps"] == 3 and m["model"] == "demo"
    assert m["stats"][0]["target_confidence"] > 0
    code, out, _ = run(["generate", "demo", "--calib", "inversion:steps=3", "--out", cache, "--per-class", 3,
                        "--shard-size", 2], capsys)
    assert code == 0 and "wrote 0 images in 0 shards" in out and "20 shards already done" in out
    code, out, err = run(["compile", "demo", "--pipeline", "minmax-w8a8", "--calib", cache,
                          "--out", tmp_path / "a.vitqc"], capsys)
    assert code == 0, err
    calib = load_artifact(tmp_path / "a.vitqc").manifest["calibration"]
    assert calib["source"] == "images" and calib["cache_source"] == "inversion" and calib["images"] == 30


def test_compile_calibration_from_a_generated_source():
    """What `vitqc compile --calib noise --calib-size 20` calibrates with (the compile itself is tested above)."""
    from vitqc import demo
    from vitqc.calib.spec import draw

    cal = draw("noise", model=demo.load_demo_model(), preprocess=demo.demo_preprocess(), size=20, seed=0)
    assert len(cal.images) == 20 and cal.images.shape[1:] == (1, 8, 8)
    assert cal.record["source"] == "noise" and cal.record["classes"] == 10
    assert len(cal.holdout) == 8 and cal.record["held_out"] == 8  # default: a tenth, at least 8
    cal = draw("inversion:steps=2,batch_size=8", model=demo.load_demo_model(), preprocess=demo.demo_preprocess(),
               holdout=0, seed=0)
    assert len(cal.images) == 256 and cal.holdout is None and cal.record["options"]["steps"] == 2  # 256 by default
    assert cal.source.options.steps == 2  # the source itself goes to the compile (data-free rounds use it)


def test_compile_datafree_pipeline_from_inversion(tmp_path, capsys):
    code, _, err = run(["compile", "demo", "--pipeline", "joint-w4a4-datafree", "--calib", "inversion:steps=2",
                        "--calib-size", 20, "--set", "joint_optimize.iterations=6", "--set", "joint_optimize.batch_size=4",
                        "--set", "joint_optimize.datafree_images=10", "--out", tmp_path / "a.vitqc"], capsys)
    assert code == 0, err
    assert "data-free round 1/2: inversion generates 10 images against the student" in err
    rounds = load_artifact(tmp_path / "a.vitqc").manifest["record"]["joint_optimize"]["datafree_rounds"]
    assert [(r["round"], r["step"], r["images"]) for r in rounds] == [(1, 2, 10), (2, 4, 10)]


@pytest.mark.parametrize("args, message", [
    (["generate", "demo", "--calib", "images:x", "--out", "{tmp}/c"], "makes data-free calibration images"),
    (["generate", "demo", "--calib", "prompts", "--out", "{tmp}/c"], "10 classes and no class names"),
    (["generate", "demo", "--calib", "inversion:stepz=3", "--out", "{tmp}/c"], "has no option 'stepz'"),
    (["generate", "demo", "--calib", "inversion:steps=-1", "--out", "{tmp}/c"],
     "--calib inversion option steps must be >= 0, not -1"),
    (["compile", "demo", "--pipeline", "joint-w8a8", "--set", "joint_optimize.batch_size=0", "--out", "{tmp}/a.vitqc"],
     "joint_optimize.batch_size must be >= 1, not 0"),
    (["compile", "demo", "--pipeline", "minmax-w8a8", "--set", "insert_quantizers.weight_bits=5", "--set",
      "insert_quantizers.act_bits=9", "--out", "{tmp}/a.vitqc"], "insert_quantizers.act_bits must be one of"),
    (["generate", "demo", "--calib", "noise", "--diffusion", "x", "--out", "{tmp}/c"], "--diffusion is for"),
    (["compile", "demo", "--pipeline", "minmax-w8a8", "--calib", "learned-prompts", "--out", "{tmp}/a.vitqc"],
     "no class names"),
])
def test_one_line_errors(tmp_path, capsys, args, message):
    code, _, err = run([a.format(tmp=tmp_path) for a in args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_generate_learned_prompts_with_a_local_diffusion_model(tmp_path, capsys, tiny_sd_dir):
    factory = tmp_path / "tiny.py"
    factory.write_text("from tests.conftest import tiny_vit\n\ndef build():\n    return tiny_vit(num_classes=3)\n")
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\negg\n")
    cache = tmp_path / "lp"
    args = ["generate", f"{factory}:build", "--img-size", 16, "--calib", "learned-prompts", "--out", cache,
            "--per-class", 2, "--class-names", names, "--diffusion", tiny_sd_dir, "--opt", "steps=2",
            "--opt", "modes=2", "--opt", "classes_per_step=3", "--device", "cpu"]
    code, out, err = run(args, capsys)
    assert code == 0, err
    assert "wrote 6 images" in out and "prompt learning: 3 classes" in out
    assert (cache / "learned_prompts.safetensors").exists()
    m = read_manifest(cache)
    assert m["source"] == "learned-prompts" and m["diffusion"] == str(tiny_sd_dir) and m["folders"][2] == "002_egg"
    # a second run into a fresh directory reuses the saved embeddings instead of learning again
    code, out, err = run(args[:7] + [tmp_path / "lp2"] + args[8:] + ["--opt", f"embeddings='{cache / 'learned_prompts.safetensors'}'"], capsys)
    assert code == 0, err
    assert "wrote 6 images" in out and "prompt learning" not in out
    assert json.loads((tmp_path / "lp2" / "manifest.json").read_text())["stats"][0]["reused_classes"] == 3
