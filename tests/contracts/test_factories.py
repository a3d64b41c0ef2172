"""The factory allow-list both the operator and the job apply (unlearning_contracts.factories)."""

from __future__ import annotations

import pytest

from unlearning_contracts.factories import factory_allowed, factory_module, parse_allowed_modules

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("factory", "prefixes", "allowed"),
    [
        # nothing allowed by default
        ("mycompany.models:resnet", (), False),
        ("os:system", (), False),
        # a prefix allows the module itself and what lies below it
        ("mycompany:build", ("mycompany",), True),
        ("mycompany.models:resnet", ("mycompany",), True),
        ("mycompany.models.vision:resnet", ("mycompany.models",), True),
        # ... matched on whole components, never on characters
        ("mycompanyx.models:resnet", ("mycompany",), False),
        ("mycompany_evil:run", ("mycompany",), False),
        ("mycompany:build", ("mycompany.models",), False),
        # one of several
        ("unlearn.demo:mlp", ("mycompany", "unlearn.demo"), True),
        ("os:system", ("mycompany", "unlearn.demo"), False),
        ("os.path:join", ("os.pathx",), False),
        # malformed prefixes allow nothing; an empty one never means "everything"
        ("os:system", ("",), False),
        ("os:system", ("*",), False),
        ("os:system", (".",), False),
        ("mycompany.models:resnet", ("mycompany.",), False),
        ("mycompany.models:resnet", (" mycompany",), False),
        # a malformed factory matches nothing
        (".mycompany:build", ("mycompany",), False),
        ("mycompany..models:build", ("mycompany",), False),
    ],
)
def test_factory_allowed(factory: str, prefixes: tuple[str, ...], allowed: bool) -> None:
    assert factory_allowed(factory, prefixes) is allowed


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("", ()),
        (" , ,", ()),
        ("mycompany", ("mycompany",)),
        ("mycompany.models, unlearn.demo", ("mycompany.models", "unlearn.demo")),
        (["a", " b.c "], ("a", "b.c")),
    ],
)
def test_parse_allowed_modules(value: str | list[str], parsed: tuple[str, ...]) -> None:
    assert parse_allowed_modules(value) == parsed


@pytest.mark.parametrize("value", ["os system", "pkg.", "*", "pkg/sub", "a,1b"])
def test_parse_allowed_modules_names_a_bad_entry(value: str) -> None:
    with pytest.raises(ValueError, match="is not a module prefix"):
        parse_allowed_modules(value)


def test_factory_module() -> None:
    assert factory_module("mycompany.models:resnet") == "mycompany.models"
