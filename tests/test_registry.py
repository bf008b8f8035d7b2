"""vitqc.registry: one mechanism for passes, calibration sources and backends, with entry points for plugins."""
import sys
import types
from importlib import metadata

import pytest

from vitqc.errors import VitqcError
from vitqc.registry import Registry


class Thing:
    name = "thing"


def test_register_get_and_unknown_names():
    reg = Registry("widget", "vitqc.test_widgets", list_command="vitqc widgets")
    reg.register(Thing)
    assert reg.get("thing") is Thing and "thing" in reg and reg.names() == ["thing"]
    reg.register(Thing)  # registering the same object again is harmless
    with pytest.raises(TypeError, match="taken by"):
        reg.register(type("Other", (), {"name": "thing"}))
    with pytest.raises(VitqcError, match="unknown widget 'nope'; `vitqc widgets` lists them: thing"):
        reg.get("nope")


def test_entry_points_add_plugins_and_a_broken_one_is_one_line(monkeypatch):
    plugin = types.ModuleType("vitqc_test_plugin")

    class Plugged:
        name = "plugged"

    plugin.Plugged = Plugged
    monkeypatch.setitem(sys.modules, "vitqc_test_plugin", plugin)
    good = metadata.EntryPoint("plugged", "vitqc_test_plugin:Plugged", "vitqc.test_widgets")
    monkeypatch.setattr(metadata, "entry_points", lambda group: [good] if group == "vitqc.test_widgets" else [])
    reg = Registry("widget", "vitqc.test_widgets")
    assert reg.get("plugged") is Plugged
    broken = metadata.EntryPoint("broken", "no_such_module_xyz:Thing", "vitqc.test_widgets")
    monkeypatch.setattr(metadata, "entry_points", lambda group: [broken])
    with pytest.raises(VitqcError, match="plugin 'broken' .* failed to load: ModuleNotFoundError"):
        Registry("widget", "vitqc.test_widgets").get("x")


def test_the_three_registries_list_what_is_built_in():
    from vitqc.backends import BACKENDS
    from vitqc.calib.spec import SOURCES
    from vitqc.passes.base import PASSES

    assert {"canonicalize", "insert_quantizers", "calibrate", "joint_optimize", "materialize"} <= set(PASSES.names())
    assert {"images", "demo", "noise", "inversion", "prompts", "learned-prompts"} <= set(SOURCES.names())
    assert {"packed", "executorch"} <= set(BACKENDS.names())
    assert all(cls.summary for cls in SOURCES.items().values())
