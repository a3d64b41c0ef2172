"""Reading a YAML manifest a tenant wrote: bounded, one document, every key once.

``yaml.safe_load`` constructs no Python objects, but it still has three
habits that a request written by someone we do not trust can use:

* aliases expand: nine nested anchors of ten aliases each ("billion laughs")
  are a few hundred bytes of YAML and 10^9 nodes for whatever walks the
  result (pydantic, ``json.dumps`` of the record). Here the number of
  aliases and the *expanded* size of the document are bounded on the node
  graph, before anything is constructed or validated;
* a key given twice in one mapping silently keeps the last value (a forget
  set of 20 samples became one). Here it is refused, naming the key's path
  and both lines;
* errors span several lines (a caret diagram). Here every error is one line
  with its position.

The file itself must be a regular file of at most ``MAX_MANIFEST_BYTES``: a
FIFO would block the reader and ``/dev/zero`` would never end. The limit is
the API server's own order of magnitude (an object is stored in etcd, whose
default request limit is 1.5 MiB), so no manifest that a cluster accepts is
refused here.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_MANIFEST_BYTES = 1 << 20
MAX_ALIASES = 64
"""Aliases per document: a hand-written manifest uses a few, a bomb needs dozens."""
MAX_NODES = 200_000
"""Nodes of the document with every alias expanded (the largest inline forget set is 100 001)."""
_MERGE_KEY = "tag:yaml.org,2002:merge"


class YamlInputError(ValueError):
    """The file cannot be read as one bounded YAML document; the message is one line."""


def read_text(path: Path, limit: int = MAX_MANIFEST_BYTES) -> str:
    """The file's text: a regular file (symlinks followed) of at most ``limit`` bytes, UTF-8."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise YamlInputError(f"{path}: cannot read the manifest ({strerror(error)})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise YamlInputError(f"{path}: not a regular file ({file_kind(info.st_mode)}): give a manifest file")
    with os.fdopen(fd, "rb") as handle:
        if info.st_size > limit:
            raise YamlInputError(f"{path}: {info.st_size} bytes, over the {limit}-byte limit for a manifest")
        data = handle.read(limit + 1)
    if len(data) > limit:  # it grew while we read it
        raise YamlInputError(f"{path}: over the {limit}-byte limit for a manifest")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        raise YamlInputError(f"{path}: not UTF-8 text (byte {error.start}): save the manifest as UTF-8") from None


class _Loader(yaml.SafeLoader):
    """The safe loader, counting aliases while it composes (before any node is built twice)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise YamlInputError(
                    f"line {mark.line + 1}: more than {MAX_ALIASES} aliases (*name): write the values out"
                )
        return super().compose_node(parent, index)


def load_document(text: str, source: str) -> Any:
    """The single YAML document in ``text``, checked for aliases, expanded size and duplicate keys.

    ``source`` names the file in messages. Returns None for an empty document.
    """
    loader: _Loader | None = None
    try:
        loader = _Loader(text)  # the reader refuses control characters here already
        if not loader.check_node():
            return None
        node = loader.get_node()
        if loader.check_node():
            raise YamlInputError(f"{source}: more than one YAML document (---): give exactly one request")
        if node is None:
            return None
        _check_size(node, source)
        _check_keys(node, "", source, set())
        return loader.construct_document(node)
    except YamlInputError as error:
        message = str(error)
        raise YamlInputError(message if message.startswith(source) else f"{source}: {message}") from None
    except yaml.MarkedYAMLError as error:
        raise YamlInputError(f"{source}: not valid YAML{_where(error)}: {_one_line(error.problem)}") from None
    except (yaml.YAMLError, ValueError, RecursionError) as error:
        # ReaderError (a control character), an integer of more than 4300 digits, nesting too deep
        raise YamlInputError(f"{source}: not valid YAML: {_one_line(str(error) or type(error).__name__)}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _check_size(root: Node, source: str) -> None:
    """Refuse a document whose alias-expanded size passes MAX_NODES (or that contains itself)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise YamlInputError(f"{source}: line {node.start_mark.line + 1}: an alias refers to itself")
        active.add(key)
        total = 1
        if isinstance(node, SequenceNode):
            total += sum(size(item) for item in node.value)
        elif isinstance(node, MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        active.discard(key)
        if total > MAX_NODES:
            raise YamlInputError(
                f"{source}: the document expands to more than {MAX_NODES} values (aliases repeat their anchor): "
                "write a smaller request"
            )
        sizes[key] = total
        return total

    size(root)


def _check_keys(node: Node, path: str, source: str, seen: set[int]) -> None:
    """Refuse a mapping that gives one key twice, naming the key's path and both lines."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, SequenceNode):
        for index, item in enumerate(node.value):
            _check_keys(item, f"{path}[{index}]", source, seen)
    elif isinstance(node, MappingNode):
        lines: dict[str, int] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, ScalarNode) else None
            where = f"{path}.{name}" if path else str(name)
            if name is not None and key.tag != _MERGE_KEY:
                line = key.start_mark.line + 1
                if name in lines:
                    shown = where if len(where) <= 200 else where[:200] + "..."
                    raise YamlInputError(f"{source}: {shown} is given twice (lines {lines[name]} and {line}): keep one")
                lines[name] = line
            _check_keys(value, where, source, seen)


def _where(error: yaml.MarkedYAMLError) -> str:
    mark = error.problem_mark or error.context_mark
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _one_line(text: str | None) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= 200 else flat[:200] + "..."


def strerror(error: OSError) -> str:
    """The OS error in words for a one-line message (its name when the OS gives no text)."""
    return error.strerror or errno.errorcode.get(error.errno or 0, type(error).__name__)


def file_kind(mode: int) -> str:
    """What a file of ``mode`` is, in words: every refusal of a file that is not a plain one names it."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISLNK(mode):
        return "a symlink"
    return "a regular file" if stat.S_ISREG(mode) else "not a plain file"
