"""Reading files people edit by hand: UTF-8 text (BOM allowed) and YAML whose duplicate keys are errors."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from mlx_lora.core.errors import located


def not_utf8(path, line: int, byte: int, column: int | None = None):
    """The one error for bytes that are not UTF-8, wherever a file is decoded."""
    where = f"byte 0x{byte:02x}" + (f" at column {column}" if column is not None else "")
    return located(path, line, f"not UTF-8 ({where}); re-save the file as UTF-8")


# Half of a UTF-16 pair. UTF-8 cannot hold one, so decoding never yields it; a JSON or YAML escape ("\ud800")
# can, and the text then breaks every later encode (tokenizer, regex engine, output file) with a traceback.
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(value) -> str | None:
    """The first lone surrogate in a parsed value's strings (dict keys included), or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found:
                return found.group()
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def surrogate_error(path, line: int | None, char: str):
    """The one error for an escaped lone surrogate, wherever a file is parsed."""
    return located(
        path,
        line,
        f"escape \\u{ord(char):04x} is half of a UTF-16 pair, not a character; write the character itself "
        "(or both halves of its pair), or remove the escape",
    )


def read_text(path: str | Path) -> str:
    """The file as text; bytes that are not UTF-8 are a file:line error (the line holding the first bad byte)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a BOM, as some Windows editors write, is not part of the content
    except UnicodeDecodeError as exc:
        raise not_utf8(path, data[: exc.start].count(b"\n") + 1, data[exc.start]) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key!r} (first at line {seen[key]}); merge the two",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path, what: str = "YAML"):
    """(data, root node) of a YAML file: the node gives line numbers for later errors. None, None when empty."""
    path = Path(path)
    loader = _UniqueKeyLoader(read_text(path))
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise located(path, mark.line + 1 if mark else None, f"{problem}; fix the {what}") from None
    except RecursionError:  # lists or mappings nested thousands deep: no config, bank or rules file looks like that
        raise located(path, None, f"nested too deeply to read; fix the {what}") from None
    finally:
        loader.dispose()
    if root is not None and lone_surrogate(data) is not None:  # rare: find the line only then
        _raise_surrogate(path, root)
    return data, root


def _raise_surrogate(path: Path, root) -> None:
    """The surrogate_error for the first line holding one (the parsed value has lost the lines)."""
    found, stack = [], [root]
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.ScalarNode) and (match := _SURROGATE.search(node.value)):
            found.append((node.start_mark.line + 1, match.group()))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend(part for pair in node.value for part in pair)
    line, char = min(found) if found else (None, "\ud800")
    raise surrogate_error(path, line, char)
