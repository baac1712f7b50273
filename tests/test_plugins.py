"""Plugin discovery through real entry-point metadata, defensive loading, conflicts and the environment switches."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from groma_core import hookspecs
from groma_core.errors import PluginConflictError, UnknownPluginError
from groma_core.plugins import PluginManager, PluginWarning

ROOT = Path(__file__).resolve().parents[1]


def make_distribution(site: Path, dist: str, modules: dict[str, str], entry_points: dict[str, str]) -> None:
    """Write an installed distribution (a .dist-info with METADATA and entry_points.txt) and its modules."""
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[groma]\n" + "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    )
    for module, source in modules.items():
        (site / f"{module}.py").write_text(textwrap.dedent(source))


PROPOSER_SOURCE = """
from groma_core import hookimpl
from groma_core.builtin import UserBoxesProposer, UserBoxesOptions

@hookimpl
def register_region_proposers(register):
    register("{name}", lambda o, ctx: UserBoxesProposer(), config=UserBoxesOptions, description="test")
"""


def test_builtin_user_boxes_is_always_there():
    pm = PluginManager(autoload=False)
    assert pm.names("region_proposer") == ["user-boxes"]


def test_plugin_that_raises_at_import_becomes_a_warning_and_the_others_still_work(tmp_path, monkeypatch):
    make_distribution(
        tmp_path,
        "groma-plugin-broken",
        {"broken_mod": "raise RuntimeError('boom at import')"},
        {"broken": "broken_mod"},
    )
    make_distribution(
        tmp_path, "groma-plugin-good", {"good_mod": PROPOSER_SOURCE.format(name="good")}, {"good": "good_mod"}
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(PluginWarning, match="boom at import"):
        pm = PluginManager()
    assert "good" in pm.names("region_proposer")
    broken = next(r for r in pm.records if r.name == "broken")
    assert broken.status == "error" and "RuntimeError: boom at import" in broken.error
    assert broken.distribution == "groma-plugin-broken"


def test_two_distributions_with_the_same_name_are_refused_naming_both(tmp_path, monkeypatch):
    make_distribution(
        tmp_path, "groma-plugin-one", {"one_mod": PROPOSER_SOURCE.format(name="twin")}, {"one": "one_mod"}
    )
    make_distribution(
        tmp_path, "groma-plugin-two", {"two_mod": PROPOSER_SOURCE.format(name="twin")}, {"two": "two_mod"}
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(PluginWarning, match="registered by both"):
        pm = PluginManager()
    with pytest.raises(PluginConflictError, match="groma-plugin-one 1.0 and groma-plugin-two 1.0"):
        pm.get("region_proposer", "twin")


def test_allow_list_and_disable_switch(tmp_path, monkeypatch):
    make_distribution(tmp_path, "groma-plugin-a", {"a_mod": PROPOSER_SOURCE.format(name="alpha")}, {"a": "a_mod"})
    make_distribution(tmp_path, "groma-plugin-b", {"b_mod": PROPOSER_SOURCE.format(name="beta")}, {"b": "b_mod"})
    monkeypatch.syspath_prepend(str(tmp_path))
    only_a = PluginManager(env={"GROMA_LOAD_PLUGINS": "a"})
    assert "alpha" in only_a.names("region_proposer") and "beta" not in only_a.names("region_proposer")
    by_dist = PluginManager(env={"GROMA_LOAD_PLUGINS": "groma-plugin-b"})
    assert by_dist.names("region_proposer") == ["beta", "user-boxes"]
    none = PluginManager(env={"GROMA_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert none.names("region_proposer") == ["user-boxes"]


def test_misspelled_hook_is_rejected_by_check_pending():
    class Plugin:
        @hookspecs.hookimpl
        def register_region_proposer(self, register):  # missing the final "s"
            register("x", lambda o, c: None)

    pm = PluginManager(autoload=False)
    with pytest.warns(PluginWarning, match="register_region_proposer"):
        record = pm.register_plugin(Plugin(), name="typo")
    assert record.status == "error"
    assert "x" not in pm.names("region_proposer")


def test_register_without_a_pydantic_config_is_an_error_line():
    class Plugin:
        @hookspecs.hookimpl
        def register_region_encoders(self, register):
            register("bad", lambda o, c: None, config=dict)

    pm = PluginManager(autoload=False)
    with pytest.warns(PluginWarning, match="pydantic model class"):
        record = pm.register_plugin(Plugin(), name="badcfg")
    assert record.status == "error"


def test_factory_returning_the_wrong_kind_is_named(manager):
    class Plugin:
        @hookspecs.hookimpl
        def register_region_encoders(self, register):
            register("liar", lambda o, c: object())

    manager.register_plugin(Plugin(), name="liar")
    from groma_core.config import StageOptions
    from groma_core.stages import BuildContext

    with pytest.raises(TypeError, match="'liar' registered as a region_encoder returned object"):
        manager.build("region_encoder", "liar", StageOptions(), BuildContext())


def test_unknown_name_lists_installed_and_suggests():
    pm = PluginManager(autoload=False)
    with pytest.raises(UnknownPluginError, match=r"did you mean 'user-boxes'\?\); installed: user-boxes"):
        pm.get("region_proposer", "user-box")


def test_every_hook_is_documented_in_contributing():
    text = (ROOT / "CONTRIBUTING.md").read_text()
    hooks = [name for name in dir(hookspecs) if name.startswith("register_")]
    assert len(hooks) == 4
    for hook in hooks:
        assert re.search(rf"^#+ .*`{hook}\(register\)`", text, re.M), f"{hook} has no section in CONTRIBUTING.md"
        assert getattr(hookspecs, hook).__doc__, f"{hook} has no docstring"
