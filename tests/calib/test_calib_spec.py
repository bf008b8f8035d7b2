"""vitqc.calib.spec: the --calib grammar and the source registry."""
from __future__ import annotations

import pytest

from vitqc.calib.spec import parse as parse_calib_spec
from vitqc.errors import VitqcError


def test_parse_calib_spec(tmp_path, monkeypatch):
    d = tmp_path / "imgs"
    d.mkdir()
    assert parse_calib_spec(f"images:{d}") == ("images", str(d))
    assert parse_calib_spec("images:/does/not/matter") == ("images", "/does/not/matter")
    assert parse_calib_spec(str(d)) == ("images", str(d))
    assert parse_calib_spec("demo") == ("demo", None)
    for kind in ("prompts", "learned-prompts", "inversion", "noise"):
        assert parse_calib_spec(kind) == (kind, None)
    assert parse_calib_spec("prompts:cats.txt") == ("prompts", "cats.txt")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    assert parse_calib_spec("demo") == ("demo", None)  # the keyword wins
    assert parse_calib_spec("./demo") == ("images", "./demo")
    for bad, pattern in (
        ("bogus", r"'bogus' is not understood: use images:DIR, an existing directory, or a source .*demo, images, inv"),
        ("./missing/dir", "does not exist"),
        ("images:", "needs a directory"),
        ("", "empty"),
    ):
        with pytest.raises(VitqcError, match=pattern):
            parse_calib_spec(bad)
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(VitqcError, match="is a file, not a directory"):
        parse_calib_spec("f.png")

