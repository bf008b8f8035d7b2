"""The README's custom-pass example runs as written, and its set-up commands are what CI runs."""
import re
from pathlib import Path

import torch

from tests.conftest import tiny_vit

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_custom_pass_example_runs_and_keeps_the_layer_at_8_bits(calib):
    code = next(block for block in re.findall(r"```python\n(.*?)```", README, re.S) if "register_pass" in block)
    assert len(code.strip().splitlines()) < 30
    scope = {"model": tiny_vit(), "calib_images": calib}
    exec(compile(code, "README.md", "exec"), scope)
    q = scope["quantized"]
    qkv = q.get_submodule("blocks.0.attn.qkv")
    assert qkv.weight_bits == 8 and qkv.input_quantizer.bits == 8
    assert q.get_submodule("blocks.1.attn.qkv").weight_bits == 4
    assert int(qkv.weight_codes.abs().max()) > 7  # really uses the 8-bit range
    with torch.no_grad():
        assert q(torch.cat(calib)).shape == (64, 5)


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)```", README, re.S)[0].strip().splitlines()
    test_command = [c for c in commands if not c.startswith("#")][1]
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert test_command in ci
