"""One replacement, one handle: each undoes exactly itself, stacked replacements come off last first, and undoing
out of order is refused rather than silently dropping the later one."""
import os
import types

import pytest

from geodiag.losses.nnunet.patches import PatchGroup, patch, patch_environ


def test_a_handle_restores_an_own_attribute_and_deletes_one_that_was_inherited():
    class Base:
        def step(self):
            return "class"

    obj = Base()
    obj.value = 1
    with patch(obj, "value", 2) as value, patch(obj, "step", lambda: "patched") as step:
        assert obj.value == 2 and obj.step() == "patched"
        assert value.replaced == 1 and step.replaced() == "class"  # the bound method it replaced, callable
    assert obj.value == 1 and "step" not in vars(obj) and obj.step() == "class"


def test_stacked_patches_come_off_last_first_and_out_of_order_is_refused():
    module = types.SimpleNamespace(f=lambda: "original")
    first = patch(module, "f", lambda: "first")
    second = patch(module, "f", lambda: "second " + first.replaced())
    assert module.f() == "second original"
    with pytest.raises(RuntimeError, match="replaced again"):
        first.remove()
    assert module.f() == "second original"  # the refused removal changed nothing
    group = PatchGroup([first, second])
    group.remove()
    assert module.f() == "original"
    group.remove()  # nothing left: a second removal does nothing
    second.remove()
    assert module.f() == "original"


def test_environment_values_are_set_or_unset_and_restored_as_they_were(monkeypatch):
    monkeypatch.setenv("GEODIAG_TEST_KEEP", "kept")
    monkeypatch.delenv("GEODIAG_TEST_NEW", raising=False)
    with patch_environ({"GEODIAG_TEST_KEEP": None, "GEODIAG_TEST_NEW": "new"}):
        assert "GEODIAG_TEST_KEEP" not in os.environ and os.environ["GEODIAG_TEST_NEW"] == "new"
    assert os.environ["GEODIAG_TEST_KEEP"] == "kept" and "GEODIAG_TEST_NEW" not in os.environ
