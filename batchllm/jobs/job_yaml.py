"""Reading a job file: safe YAML (no Python tags), bounded in size, nesting and alias expansion
("billion laughs"), with duplicate keys refused by name and line."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from batchllm.jobs.errors import JobSpecError

MAX_BYTES = 1 << 20  # a job file is a few hundred bytes; a megabyte is already suspicious
MAX_NODES = 100_000  # scalars, lists and mappings once every alias is expanded
MAX_DEPTH = 64


class _JobLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges; keys given beside it override on purpose
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _Duplicate(key, seen[key], line)
                seen[key] = line
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, f"a mapping key must be a plain value, got {type(key).__name__}",
                    key_node.start_mark) from None
        return super().construct_mapping(node, deep=deep)


class _Duplicate(Exception):
    def __init__(self, key: Any, first: int, again: int) -> None:
        super().__init__(key)
        self.key, self.first, self.again = key, first, again


def _expanded_size(node: yaml.Node, limit: int) -> int:
    """Nodes `node` stands for once every alias is expanded (stops counting past `limit`); shared
    nodes are counted each time they are used, without expanding them (memoized by identity)."""
    sizes: dict[int, int] = {}

    def size(n: yaml.Node, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise _TooDeep()
        if id(n) in sizes:
            return sizes[id(n)]
        total = 1
        if isinstance(n, yaml.SequenceNode):
            for child in n.value:
                total += size(child, depth + 1)
                if total > limit:
                    break
        elif isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                total += size(k, depth + 1) + size(v, depth + 1)
                if total > limit:
                    break
        sizes[id(n)] = min(total, limit + 1)
        return sizes[id(n)]

    return size(node, 0)


class _TooDeep(Exception):
    pass


def parse_job_yaml(text: str, where: str) -> Any:
    """The YAML document in `text`, refusing what a job file never needs (see module doc)."""
    if len(text) > MAX_BYTES:
        raise JobSpecError(f"{where}: {len(text)} characters; a job file may hold at most "
                           f"{MAX_BYTES} (is this really a job file?)")
    loader = _JobLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, MAX_NODES) > MAX_NODES:
            raise JobSpecError(f"{where}: the YAML expands to more than {MAX_NODES} values "
                               "(aliases referring to aliases); a job file needs a few dozen")
        return loader.construct_document(node)
    except _TooDeep:
        raise JobSpecError(f"{where}: the YAML nests deeper than {MAX_DEPTH} levels") from None
    except RecursionError:
        raise JobSpecError(f"{where}: the YAML nests too deeply to read") from None
    except _Duplicate as d:
        raise JobSpecError(f"{where}: key {d.key!r} is given twice (lines {d.first} and "
                           f"{d.again}); YAML would silently keep only the last one") from None
    except yaml.YAMLError as e:
        raise JobSpecError(f"{where}: not valid YAML: {e}") from None
    finally:
        loader.dispose()


def read_job_file(path: str | Path) -> dict[str, Any]:
    """The job file at `path` as a dict; every problem is a JobSpecError naming the file."""
    p = Path(path)
    try:
        if p.is_file() and p.stat().st_size > MAX_BYTES:
            raise JobSpecError(f"{p}: {p.stat().st_size} bytes; a job file may hold at most "
                               f"{MAX_BYTES} (is this really a job file?)")
        data = p.read_bytes()
    except OSError as e:
        raise JobSpecError(f"cannot read job file {p}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise JobSpecError(f"{p}: not UTF-8 text (byte {e.start}); a job file is YAML text"
                           ) from None
    raw = parse_job_yaml(text, str(p))
    if not isinstance(raw, dict):
        raise JobSpecError(f"{p}: a job file must be a mapping of keys (model, input, output, ...)")
    return raw
