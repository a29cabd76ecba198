"""docs/errors.md lists every message the package raises: each row's template is a message that some
check in csrc/ or vllm_mla_ops/ builds, with the right exception class, and every message those checks
build has a row. The sources are read, not imported, so a new check without a row fails here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = ROOT / "vllm_mla_ops"



def _split_call_args(source: str, start: int) -> list[str]:
    """The top-level arguments of the C/C++ call whose '(' ends just before `start`."""
    args, depth, current, i = [], 0, [], start
    while True:
        c = source[i]
        if c in "\"'":  # a string or character literal, escapes included
            j = i + 1
            while source[j] != c:
                j += 2 if source[j] == "\\" else 1
            current.append(source[i : j + 1])
            i = j + 1
            continue
        if source.startswith("//", i):
            i = source.index("\n", i)
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            if depth == 0:
                args.append("".join(current))
                return args
            depth -= 1
        elif c == "," and depth == 0:
            args.append("".join(current))
            current = []
            i += 1
            continue
        current.append(c)
        i += 1


STRING_LITERALS = re.compile(r'\s*(?:"(?:[^"\\]|\\.)*"\s*)+')


def _cpp_templates() -> list[tuple[str, list, str]]:
    """The message of every check in csrc/ (MLA_CHECK and STD_TORCH_CHECK after their condition,
    fail() whole): a list of literal strings (adjacent literals joined) and None for each
    interpolated expression; all raise RuntimeError in Python."""
    found = []
    for path in sorted((ROOT / "csrc").glob("*")):
        if path.suffix not in (".cpp", ".cu", ".h", ".cuh"):
            continue
        source = path.read_text()
        for call in re.finditer(r"(?<![\w#])(MLA_CHECK|STD_TORCH_CHECK|fail)\s*\(", source):
            line_start = source.rfind("\n", 0, call.start()) + 1
            if source[line_start:call.start()].lstrip().startswith(("#define", "[[noreturn]]", "void")):
                continue  # the definitions themselves
            args = _split_call_args(source, call.end())
            if args == ["__VA_ARGS__"]:
                continue
            pieces = []
            for arg in args[0 if call.group(1) == "fail" else 1:]:
                if STRING_LITERALS.fullmatch(arg):
                    pieces.append("".join(ast.literal_eval(s) for s in re.findall(r'"(?:[^"\\]|\\.)*"', arg)))
                else:
                    pieces.append(None)
            found.append((f"{path.name}:{source.count(chr(10), 0, call.start()) + 1}", pieces, "RuntimeError"))
    return found


def _py_templates() -> list[tuple[str, list, str]]:
    """The message of every torch._check(..., lambda: message) (a RuntimeError) and
    `raise X(message)` (an X) in vllm_mla_ops/, where `message` is a string, or a call of a function
    of the module whose returned strings are the messages; f-string fields naming a module-level
    string constant are inlined."""
    found = []
    # The op modules; testing.py's assertion messages are the test helpers', not the package's errors.
    for path in sorted(p for p in PACKAGE_DIR.glob("*.py") if p.name != "testing.py"):
        tree = ast.parse(path.read_text())
        constants = {t.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                     and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                     for t in node.targets if isinstance(t, ast.Name)}

        def pieces(node):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                return [node.value]
            if isinstance(node, ast.JoinedStr):
                out = []
                for value in node.values:
                    if isinstance(value, ast.Constant):
                        out.append(value.value)
                    elif isinstance(value.value, ast.Name) and value.value.id in constants:
                        out.append(constants[value.value.id])
                    else:
                        out.append(None)
                return out
            return None

        returned = {node.name: [r.value for r in ast.walk(node) if isinstance(r, ast.Return) and r.value is not None]
                    for node in tree.body if isinstance(node, ast.FunctionDef)}
        for node in ast.walk(tree):
            messages = []
            if (isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch._check", "_check")
                    and len(node.args) > 1 and isinstance(node.args[1], ast.Lambda)):
                messages, raised = [node.args[1].body], "RuntimeError"
            elif isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
                message, raised = node.exc.args[0], ast.unparse(node.exc.func)
                messages = [message]
                if isinstance(message, ast.Call) and isinstance(message.func, ast.Name):
                    messages = returned.get(message.func.id, [])
            for message in messages:
                if pieces(message) is not None:
                    found.append((f"{path.name}:{message.lineno}", pieces(message), raised))
    return found


def _template_regex(pieces: list) -> re.Pattern:
    return re.compile("".join(".+?" if p is None else re.escape(p) for p in pieces), re.S)


def _documented() -> list[dict]:
    """The rows of the table in docs/errors.md, as {column header: cell}."""
    lines = [line for line in (ROOT / "docs" / "errors.md").read_text().splitlines() if line.startswith("|")]
    split = lambda line: [cell.strip() for cell in line.strip().strip("|").split("|")]  # noqa: E731
    header = split(lines[0])
    rows = [dict(zip(header, split(line))) for line in lines[2:]]
    for row in rows:
        cell = row["Message template"]
        delimiter = "``" if cell.startswith("``") else "`"
        assert cell.startswith(delimiter) and cell.endswith(delimiter), cell
        row["template"] = cell[len(delimiter) : -len(delimiter)].strip()
    return rows


def test_error_table_matches_the_sources():
    """Every template in docs/errors.md is a message the code builds ({placeholders} where the code
    interpolates a value), with the right exception class; every message the code builds has a row."""
    sources = [(where, pieces, raised, _template_regex(pieces))
               for where, pieces, raised in _cpp_templates() + _py_templates()]
    assert len(sources) >= 20, [where for where, *_ in sources]
    rows = _documented()
    unmatched = []
    for row in rows:
        matches = [(where, raised) for where, _, raised, regex in sources if regex.fullmatch(row["template"])]
        if not matches:
            unmatched.append(row["template"])
            continue
        (expected,) = {raised for _, raised in matches}  # one template, one exception class
        assert row["Exception"].startswith(expected), (row["template"], row["Exception"], matches)
    assert not unmatched, "documented messages that no source builds:\n" + "\n".join(unmatched)
    undocumented = [f"{where}: {''.join('{}' if p is None else p for p in pieces)}"
                    for where, pieces, _, regex in sources if not any(regex.fullmatch(r["template"]) for r in rows)]
    assert not undocumented, "messages missing from docs/errors.md:\n" + "\n".join(undocumented)
