"""Regenerate ``tests/trt_api/api_<version>.py``: the Python API surface of a TensorRT release, read from
NVIDIA's pybind11 binding sources (no NVIDIA code is copied: only the names it binds).

    python tests/trt_api/generate.py /path/to/NVIDIA/TensorRT/.git

For each branch in :data:`BRANCHES` it reads ``python/src/infer/{pyCore,pyGraph,pyFoundationalTypes}.cpp``
and ``python/src/parsers/pyOnnx.cpp`` and records, per bound class or enum: the constructor's and every
method's keyword-argument names (one list per overload), the properties (read-only or writable) and the
enum values. The stand-in ``tensorrt`` (tests/trt_api/standin.py) exposes exactly these names.

The parse is deliberately simple (pybind11's fluent ``py::class_<...>(m, "Name").def(...)...;`` chains and
``var.def(...)`` statements on a named binding); ``tests/test_trt_standin.py`` checks the result contains the
classes pcedge uses, so a change in NVIDIA's layout that this parser misses fails loudly rather than
producing an empty API.
"""

from __future__ import annotations

import pprint
import re
import subprocess
import sys
from pathlib import Path

BRANCHES = {"8.6": "release/8.6", "10.3": "release/10.3", "10.16": "release/10.16", "11": "main"}
FILES = ["python/src/infer/pyCore.cpp", "python/src/infer/pyGraph.cpp",
         "python/src/infer/pyFoundationalTypes.cpp", "python/src/parsers/pyOnnx.cpp"]

_CLASS_START = re.compile(r"py::(class_|enum_)\s*<")
_NAME_AFTER = re.compile(r"\s*(\w+)?\s*[({]\s*(\w+)\s*,\s*\"(\w+)\"")
_MEMBER = re.compile(r"\.(def|def_static|def_property|def_property_readonly|def_readwrite|def_readonly|value)\s*\(")
_ARG = re.compile(r"\"(\w+)\"_a|py::arg\(\s*\"(\w+)\"\s*\)")


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def _match(text: str, i: int, open_ch: str, close_ch: str) -> int:
    """Index just past the bracket that closes the one at ``text[i]`` (strings skipped)."""
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c == '"':
            j += 1
            while text[j] != '"':
                j += 2 if text[j] == "\\" else 1
        elif c == open_ch:
            depth += 1
        elif c == close_ch:
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    raise ValueError("unbalanced")


def _statement_end(text: str, i: int) -> int:
    """Index of the ``;`` that ends the statement starting at ``i`` (brackets and strings skipped)."""
    j = i
    while j < len(text):
        c = text[j]
        if c == '"':
            j += 1
            while text[j] != '"':
                j += 2 if text[j] == "\\" else 1
        elif c in "({[":
            j = _match(text, j, c, {"(": ")", "{": "}", "[": "]"}[c]) - 1
        elif c == ";":
            return j
        j += 1
    return j


def _members(chain: str, entry: dict) -> None:
    for m in _MEMBER.finditer(chain):
        kind = m.group(1)
        start = m.end() - 1
        try:
            body = chain[start:_match(chain, start, "(", ")")]
        except (ValueError, IndexError):
            continue
        inner = body[1:-1].strip()
        if kind == "value":
            name = re.match(r"\"(\w+)\"", inner)
            if name:
                entry["values"].append(name.group(1))
            continue
        if inner.startswith("py::init"):
            args = [a or b for a, b in _ARG.findall(inner)]
            entry["init"].append(args)
            continue
        name = re.match(r"\"(\w+)\"", inner)
        if not name:
            continue
        name = name.group(1)
        if kind in ("def", "def_static"):
            args = [a or b for a, b in _ARG.findall(inner)]
            entry["methods"].setdefault(name, [])
            if args not in entry["methods"][name]:
                entry["methods"][name].append(args)
        elif kind in ("def_property", "def_readwrite"):
            # def_property(name, getter, nullptr-or-setter): a nullptr getter makes it write-only.
            entry["properties"][name] = "rw"
        else:
            entry["properties"].setdefault(name, "ro")


def parse_sources(texts: list[str]) -> dict:
    api: dict[str, dict] = {}
    variables: dict[str, str] = {}
    for text in texts:
        text = _strip_comments(text)
        for m in _CLASS_START.finditer(text):
            kind = "enum" if m.group(1) == "enum_" else "class"
            close = _match(text, m.end() - 1, "<", ">")
            named = _NAME_AFTER.match(text, close)
            if not named:
                continue
            var, scope, name = named.group(1), named.group(2), named.group(3)
            if scope != "m":
                if scope not in variables:
                    continue  # bound into a scope this parser does not follow
                # A nested binding, e.g. ILogger.Severity; export_values() also puts its values on the parent.
                name = f"{variables[scope]}.{name}"
            entry = api.setdefault(name, {"kind": kind, "init": [], "methods": {}, "properties": {}, "values": []})
            if var:
                variables[var] = name
            end = _statement_end(text, close)
            _members(text[close:end], entry)
            if "." in name and ".export_values()" in text[close:end]:
                entry["export_values"] = True
            decl_open = min(i for i in (text.find("(", close), text.find("{", close)) if i >= 0)
            decl_end = _match(text, decl_open, text[decl_open], ")" if text[decl_open] == "(" else "}")
            if "py::buffer_protocol()" in text[decl_open:decl_end]:
                entry["buffer"] = True
            # Python base class: a later template argument naming an already bound class (Logger: ILogger).
            template = text[m.end():close - 1]
            for arg in (a.strip() for a in template.split(",")[1:]):
                if arg in api and api[arg]["kind"] == "class" and arg != name:
                    entry["base"] = arg
        for var, name in variables.items():
            for m in re.finditer(rf"(?<![\w.]){re.escape(var)}\s*\.", text):
                end = _statement_end(text, m.start())
                _members(text[m.start() + len(var):end], api[name])
    return api


def git_show(git_dir: str, branch: str, path: str) -> str:
    return subprocess.run(["git", "--git-dir", git_dir, "show", f"{branch}:{path}"], check=True,
                          capture_output=True, text=True).stdout


def version_of(git_dir: str, branch: str) -> str:
    text = git_show(git_dir, branch, "include/NvInferVersion.h")
    parts = []
    for key in ("MAJOR", "MINOR", "PATCH"):
        m = re.search(rf"#define (?:NV_TENSORRT|TRT)_{key}(?:_ENTERPRISE)?\s+(\d+)", text)
        parts.append(m.group(1))
    return ".".join(parts)


def main(git_dir: str) -> None:
    out_dir = Path(__file__).parent
    commit = lambda b: subprocess.run(["git", "--git-dir", git_dir, "rev-parse", b], check=True,  # noqa: E731
                                      capture_output=True, text=True).stdout.strip()
    for tag, branch in BRANCHES.items():
        api = parse_sources([git_show(git_dir, branch, f) for f in FILES])
        version = version_of(git_dir, branch)
        header = (
            f'"""TensorRT {version} Python API surface, generated by tests/trt_api/generate.py.\n\n'
            f"Source: github.com/NVIDIA/TensorRT, branch {branch} (commit {commit(branch)}), files\n"
            + "".join(f"    {f}\n" for f in FILES)
            + "Only the bound names are recorded (class, method and keyword-argument names, properties, enum\n"
              "values); no NVIDIA code. Do not edit by hand: rerun the generator.\n"
            '"""\n\n'
        )
        body = f"VERSION = {version!r}\nBRANCH = {branch!r}\n\nAPI = " + pprint.pformat(api, width=118, sort_dicts=True) + "\n"
        (out_dir / f"api_{tag.replace('.', '_')}.py").write_text(header + body)
        print(f"{branch}: TensorRT {version}, {len(api)} classes/enums")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/.mirror/NVIDIA+TensorRT/repo")
