"""Which architecture factories a request may name: the cluster admin's allow-list.

``spec.model.architecture.factory`` names a ``package.module:function`` that
the job imports and calls. Importing a module runs its code, so a request
must never name one the cluster admin did not allow: ``os:system`` with
``kwargs: {command: ...}`` would otherwise run a shell command in the job
pod, with the GPU and the read-write output claim.

The admin lists module prefixes (the operator's setting and chart value;
empty by default, so no factory runs). The operator rejects a request whose
factory is not allowed and hands the same list to the Job's container in
``ENV_ALLOWED_FACTORY_MODULES``; the job checks it again before it imports
anything the request names. Both sides call ``factory_allowed`` below, so
they cannot disagree about what a prefix allows.

A prefix allows the module itself and the modules below it: ``pkg`` allows
``pkg`` and ``pkg.models``, never ``pkgx`` (a prefix is matched on whole
dotted components, not on characters).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

ENV_ALLOWED_FACTORY_MODULES = "UNLEARN_ALLOWED_FACTORY_MODULES"
"""Environment variable of the Job's container: the allowed module prefixes, comma-separated."""

# A dotted Python module name: what a prefix and the module part of a factory must look like.
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def factory_module(factory: str) -> str:
    """The module part of ``package.module:function`` (what would be imported)."""
    return factory.partition(":")[0]


def is_module_prefix(prefix: str) -> bool:
    """Whether ``prefix`` is a dotted module name (``pkg``, ``pkg.sub``); nothing else can allow a factory."""
    return bool(_MODULE.match(prefix))


def factory_allowed(factory: str, prefixes: Sequence[str]) -> bool:
    """Whether the module of ``factory`` is one of ``prefixes`` or lies below one of them.

    A malformed prefix (empty, ``pkg.``, ``*``) allows nothing: an empty
    string must never read as "every module".
    """
    module = factory_module(factory)
    if not is_module_prefix(module):
        return False
    return any(is_module_prefix(p) and (module == p or module.startswith(p + ".")) for p in prefixes)


def parse_allowed_modules(value: str | Iterable[str]) -> tuple[str, ...]:
    """Prefixes from the environment variable's comma-separated text (or a list), blanks dropped.

    Raises ValueError naming the first entry that is not a dotted module name,
    so that a typo in the admin's setting is reported instead of silently
    allowing nothing.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    prefixes = tuple(item.strip() for item in items if item.strip())
    for prefix in prefixes:
        if not is_module_prefix(prefix):
            raise ValueError(f"{prefix!r} is not a module prefix (a dotted module name such as mycompany.models)")
    return prefixes
