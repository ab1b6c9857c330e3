"""Reading files people edit by hand: UTF-8 text (BOM allowed) and YAML whose duplicate keys are errors."""

from __future__ import annotations

from pathlib import Path

import yaml

from mlx_lora.core.errors import located


def not_utf8(path, line: int, byte: int, column: int | None = None):
    """The one error for bytes that are not UTF-8, wherever a file is decoded."""
    where = f"byte 0x{byte:02x}" + (f" at column {column}" if column is not None else "")
    return located(path, line, f"not UTF-8 ({where}); re-save the file as UTF-8")


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
    finally:
        loader.dispose()
    return data, root
