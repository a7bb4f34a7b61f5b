"""One way to wire a component's dependencies (core/registry.py `Registry.wire`): the method's components and
the guidance kinds get what their constructor names, nothing else; GUIDANCE lives with the other registries."""
from __future__ import annotations

import pytest

import core.registry as registry
import methods.guidance as guidance
from core.registry import GUIDANCE, Registry, declared_deps
from methods.guidance import ClassifierFreeGuidance, build_guidance


def test_guidance_registry_lives_in_core_and_is_importable_from_methods():
    assert guidance.GUIDANCE is registry.GUIDANCE and GUIDANCE.kind == "guidance"
    assert {"cfg", "autoguidance", "representation", "none"} <= set(GUIDANCE.names())
    assert not hasattr(ClassifierFreeGuidance, "deps")           # no second wiring mechanism


def test_wire_passes_only_declared_dependencies():
    reg: Registry = Registry("thing")

    @reg.register("wants-groups")
    def wants_groups(scale: float, groups: str) -> tuple:
        return scale, groups

    @reg.register("wants-nothing")
    def wants_nothing(scale: float) -> float:
        return scale

    offered = {"groups": "G", "null_label": 7}
    assert reg.wire({"name": "wants-groups", "scale": 2.0}, **offered) == (2.0, "G")
    assert reg.wire({"name": "wants-nothing", "scale": 2.0}, **offered) == 2.0
    with pytest.raises(TypeError, match=r"^thing 'wants-nothing': .*'sclae'"):   # build's error, unchanged
        reg.wire({"name": "wants-nothing", "sclae": 2.0}, **offered)
    with pytest.raises(KeyError, match="unknown thing 'nope'; valid: wants-groups, wants-nothing"):
        reg.wire({"name": "nope"}, **offered)


def test_var_keyword_catches_no_dependency():
    def loose(scale: float, **kw) -> dict:
        return kw

    assert declared_deps(loose, {"groups": "G", "null_label": 7}) == {}


def test_guidance_gets_null_label_by_its_signature(monkeypatch):
    """A guidance plugin that names `null_label` receives it; one that does not is built without it."""
    monkeypatch.setattr(GUIDANCE, "_items", dict(GUIDANCE._items))     # registrations undone after the test

    @GUIDANCE.register("labelled-test")
    class Labelled:
        def __init__(self, scale: float, null_label: int) -> None:
            self.scale, self.null_label = scale, null_label

    @GUIDANCE.register("unlabelled-test")
    class Unlabelled:
        def __init__(self, scale: float) -> None:
            self.scale = scale

    assert build_guidance({"name": "labelled-test", "scale": 2.0}, null_label=10).null_label == 10
    assert build_guidance({"name": "unlabelled-test", "scale": 2.0}, null_label=10).scale == 2.0
    assert build_guidance({"name": "cfg", "scale": 2.0}, null_label=10).null_label == 10
