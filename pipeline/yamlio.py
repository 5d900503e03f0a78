"""The one YAML reader of trtpipe (configs, params.yaml, dvc.yaml).

yaml.safe_load silently keeps the last of two equal keys and expands anchors/aliases
without a bound (a few lines of nested aliases, "billion laughs", stand for 10^9 nodes and
hang whatever walks the data). This loader refuses both, in one line naming the file:

* a key given twice in one mapping (a `<<: *base` merge that the mapping then overrides is
  fine: that is what merge keys are for);
* a document whose aliases expand to more than MAX_NODES nodes.

Anchors, aliases and merge keys are otherwise allowed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import ConfigError

MAX_NODES = 100_000  # a config or params file has a few hundred nodes; dvc.yaml a few thousand

_MERGE = "tag:yaml.org,2002:merge"


class YamlError(ConfigError):
    """A YAML file that cannot be read as trtpipe's YAML (invalid, duplicate keys, alias bomb)."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and bounds alias expansion."""

    def compose_mapping_node(self, anchor: Any) -> MappingNode:
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if not isinstance(key, ScalarNode) or key.tag == _MERGE:
                continue
            ident = (key.tag, key.value)
            if ident in seen:
                raise _Duplicate(key.value, key.start_mark.line + 1, seen[ident])
            seen[ident] = key.start_mark.line + 1
        return node

    def compose_document(self) -> Node:
        node = super().compose_document()
        n = _expanded_size(node)
        if n > MAX_NODES:
            raise _Bomb(n)
        return node


class _Duplicate(Exception):
    def __init__(self, key: str, line: int, first: int):
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


class _Bomb(Exception):
    def __init__(self, n: int):
        super().__init__(n)
        self.n = n


def _expanded_size(root: Node) -> int:
    """Nodes the document stands for once every alias is expanded (aliases share nodes, so
    count each node's subtree once and reuse it; stops early past the bound)."""
    memo: dict[int, int] = {}
    # iterative post-order: deep documents must not hit Python's recursion limit
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in memo:
            continue
        children: list[Node] = []
        if isinstance(node, SequenceNode):
            children = list(node.value)
        elif isinstance(node, MappingNode):
            children = [x for pair in node.value for x in pair]
        if not done:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in memo)
            continue
        total = 1
        for c in children:
            total += memo.get(id(c), 1)
            if total > MAX_NODES:
                break
        memo[id(node)] = min(total, MAX_NODES + 1)
    return memo[id(root)]


def load_yaml_text(text: str, source: Union[str, Path]) -> Any:
    """Parse `text` (read from `source`, named in errors)."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except _Duplicate as e:
        raise YamlError(f"{source}:{e.line}: key '{e.key}' is given twice in the same mapping (first on line "
                        f"{e.first}); YAML would silently keep the last one: remove one of them") from None
    except _Bomb as e:
        raise YamlError(f"{source}: its anchors and aliases expand to more than {MAX_NODES} values; "
                        "refusing it as an alias bomb: write the values out, or use fewer nested aliases") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise YamlError(f"{source}: not valid YAML ({e.problem or e.context}{where})") from None
    except yaml.YAMLError as e:
        raise YamlError(f"{source}: not valid YAML ({' '.join(str(e).split())})") from None
    except RecursionError:
        raise YamlError(f"{source}: nested too deeply to read; flatten it") from None


def load_yaml(path: Union[str, Path], what: str = "YAML file") -> Any:
    """Read and parse the YAML file at `path`; every failure is one YamlError naming it."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise YamlError(f"{path}: is a folder, not a {what}; point the setting at the file (or move the folder away)")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise YamlError(f"{path}: {what} not found") from None
    except UnicodeDecodeError as e:
        raise YamlError(f"{path}: {what} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise YamlError(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    return load_yaml_text(text, path)
