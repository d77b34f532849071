"""YAML that cannot cost more than its size: a cap on the file and on what its aliases expand to.

A rules or settings file is read by the agent on its ingest loop (a reload). YAML aliases (``*name``)
reuse a node, and nested aliases expand exponentially: a few hundred bytes can stand for billions of
nodes and take the loader minutes and gigabytes. The document is composed first (aliases stay shared,
linear in the file) and its expanded size counted, before anything is constructed.
"""

from __future__ import annotations

import io

import yaml

from gradwatch.errors import ConfigError

MAX_YAML_BYTES = 1024 * 1024  # a rules file is a few kilobytes
MAX_EXPANDED_NODES = 100_000  # nodes once every alias is expanded


def named_stream(text: str, name: str) -> io.StringIO:
    stream = io.StringIO(text)
    stream.name = name  # read by YAML's reader for its error marks
    return stream


def compose_bounded(text: str, source: str) -> yaml.Node | None:
    """The composed document of ``text`` (None when empty), refused with a ConfigError naming ``source``
    when the text is over MAX_YAML_BYTES or its aliases expand beyond MAX_EXPANDED_NODES.
    yaml.YAMLError for text that is not YAML."""
    size = len(text.encode("utf-8", errors="replace"))
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"{source}: {size} bytes; a rules or settings file may have at most {MAX_YAML_BYTES} bytes")
    node = yaml.compose(named_stream(text, source), Loader=yaml.SafeLoader)
    if node is not None and _expanded_size(node) > MAX_EXPANDED_NODES:
        raise ConfigError(f"{source}: its YAML aliases (*name) expand to more than {MAX_EXPANDED_NODES} nodes; "
                          "write the values out instead of nesting aliases")
    return node


def load_bounded(text: str, source: str) -> object:
    """yaml.safe_load of ``text`` after compose_bounded() accepted it."""
    compose_bounded(text, source)
    return yaml.safe_load(named_stream(text, source))


def _expanded_size(root: yaml.Node) -> int:
    """Nodes of the document with every alias expanded, counted once per distinct node (memoised), so the
    count is linear in the file however deep the aliases nest; it stops early past the limit."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node, depth: int) -> int:
        known = sizes.get(id(node))
        if known is not None:
            return known
        if depth > 1000:  # deeper than any rules file: refuse rather than recurse on
            return MAX_EXPANDED_NODES + 1
        total = 1
        if isinstance(node, yaml.SequenceNode):
            for child in node.value:
                total += size(child, depth + 1)
                if total > MAX_EXPANDED_NODES:
                    break
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                total += size(key, depth + 1) + size(value, depth + 1)
                if total > MAX_EXPANDED_NODES:
                    break
        sizes[id(node)] = total
        return total

    return size(root, 0)
