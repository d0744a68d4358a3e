#!/usr/bin/env python3
"""A small mutation tester: how much of a module's behaviour do the tests pin?

For each target (`FILE` or `FILE:func,Class.method,...`) it makes one mutant at a time from
the AST of the chosen functions (comparison flipped, `and`/`or` swapped, `not` dropped, an
`if` condition made False, a raise or a `fail(...)`-style call dropped, a number changed,
True/False swapped), writes it into a private copy of the repository and runs the chosen
pytest subset there with a time limit (the tests spawn real `python -m fusecsi` processes,
which import the copy through PYTHONPATH). A mutant is killed when the tests fail or time
out. The report lists the score and every survivor, with the explanation given for it in
`--explain` (a JSON file {mutant key: why it is equivalent}) or "UNEXPLAINED".

    scripts/mutate.py --target fusecsi/csi/volumes.py --tests tests/controller/test_volumes.py \\
        --report docs/mutation/volumes.md

After tests were added, `--carry LOG` (the printed output of an earlier run on the same
code) counts the mutants that run killed as killed and runs only the others; and
`scripts/mutate.py relabel REPORT --explain FILE [--carry LOG]` refreshes a written report's
reasons and drops survivors a later run killed, without running anything.

Needs no CI; the report says how long the run took.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPY = ["fusecsi", "tests", "proto", "pyproject.toml"]
RAISING_CALLS = {"fail", "invalid", "_refuse_delete", "require"}
FLIPS = {
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Lt: ast.GtE,
    ast.GtE: ast.Lt,
    ast.Gt: ast.LtE,
    ast.LtE: ast.Gt,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}


@dataclass
class Mutant:
    key: str  # file:function:line:col:operator, stable while the code does not move
    line: int
    before: str
    after: str
    tree: ast.Module


def _functions(tree: ast.Module, wanted: set[str] | None):
    """(qualified name, node) of every function, or of the wanted ones."""

    def walk(node, prefix: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = prefix + child.name
                if wanted is None or name in wanted:
                    yield name, child
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, prefix + child.name + ".")

    yield from walk(tree, "")


def _points(func: ast.AST):
    """(node, operator, apply, line) for every mutation in `func`; apply(node) changes the
    node in place (for "notnot" the caller then puts the operand in the node's place)."""
    for node in ast.walk(func):
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in FLIPS:

                    def flip(n, i=i):
                        n.ops[i] = FLIPS[type(n.ops[i])]()

                    yield node, f"flip{i}", flip, node.lineno
        elif isinstance(node, ast.BoolOp):

            def swap(n):
                n.op = ast.Or() if isinstance(n.op, ast.And) else ast.And()

            yield node, "andor", swap, node.lineno
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            yield node, "notnot", lambda n: None, node.lineno
        elif isinstance(node, ast.If):

            def never(n):
                n.test = ast.Constant(False)

            yield node, "iffalse", never, node.lineno
        elif isinstance(node, ast.Constant) and type(node.value) is bool:

            def negate(n):
                n.value = not n.value

            yield node, "bool", negate, node.lineno
        elif isinstance(node, ast.Constant) and type(node.value) is int:

            def bump(n):
                n.value = n.value + 1

            yield node, "int", bump, node.lineno
        for field in ("body", "orelse", "finalbody", "handlers"):
            block = getattr(node, field, None)
            if not isinstance(block, list):
                continue
            for i, stmt in enumerate(block):
                if isinstance(stmt, ast.Raise) or (
                    isinstance(stmt, ast.Expr)
                    and isinstance(stmt.value, ast.Call)
                    and getattr(stmt.value.func, "id", getattr(stmt.value.func, "attr", ""))
                    in RAISING_CALLS
                ):

                    def drop(n, field=field, i=i):
                        getattr(n, field)[i] = ast.Pass()

                    yield node, f"drop-{field}{i}", drop, stmt.lineno


def mutants(path: Path, wanted: set[str] | None) -> list[Mutant]:
    source = path.read_text()
    lines = source.splitlines()
    out = []
    base = ast.parse(source)
    for qualname, func in _functions(base, wanted):
        for index, (_node, operator, _, line) in enumerate(list(_points(func))):
            tree = copy.deepcopy(base)
            twin = dict(_functions(tree, {qualname}))[qualname]
            twin_node, twin_op, apply, _ = list(_points(twin))[index]
            assert twin_op == operator
            apply(twin_node)
            if operator == "notnot":  # `not x` becomes `x`
                _replace(tree, twin_node, twin_node.operand)
                twin_node = twin_node.operand
            after = ast.unparse(twin_node).splitlines()[0]
            if operator.startswith("drop-"):
                after = "pass"
            key = f"{path.relative_to(ROOT)}:{qualname}:{line}:{operator}"
            same = sum(m.key.split("#")[0] == key for m in out)
            if same:
                key += f"#{same + 1}"  # the n-th such mutant on that line
            out.append(Mutant(key, line, lines[line - 1].strip(), after[:100], tree))
    return out


def _replace(tree: ast.AST, old: ast.AST, new: ast.AST) -> None:
    for parent in ast.walk(tree):
        for field, value in ast.iter_fields(parent):
            if value is old:
                setattr(parent, field, new)
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    if item is old:
                        value[i] = new


def run_tests(workdir: Path, tests: list[str], timeout: float) -> tuple[str, float]:
    env = {**os.environ, "PYTHONPATH": str(workdir), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    started = time.monotonic()
    try:
        result = subprocess.run(
            command,
            cwd=workdir,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - started
    return ("survived" if result.returncode == 0 else "killed"), time.monotonic() - started


def make_copy() -> Path:
    workdir = Path(tempfile.mkdtemp(prefix="fusecsi-mutant-"))
    for name in COPY:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, workdir / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, workdir / name)
    return workdir


def relabel(report: Path, explained: dict[str, str], carry: list[Path]) -> int:
    """Refresh a written report: each survivor's reason from the current --explain file, and
    survivors that a later run (--carry, same code) killed move to the killed ones."""
    later = set()
    for log in carry:
        for row in log.read_text().splitlines():
            verdict, _, key = row.partition(" ")
            if verdict in ("killed", "timeout"):
                later.add(key.strip())
    out, survivors, total, moved = [], [], 0, 0
    for line in report.read_text().splitlines():
        if line.startswith("| `"):
            cells = re.split(r"(?<!\\) \| ", line[2:-2])
            key = cells[0].strip("`")
            if key in later:
                moved += 1
                continue
            cells[3] = explained.get(key, "UNEXPLAINED").replace("|", "\\|")
            survivors.append(key)
            line = "| " + " | ".join(cells) + " |"
        elif line.startswith("- mutants: "):
            total = int(line.split()[2].rstrip(";"))
            line = (
                "- mutants: {total}; killed {killed}; survived {survived} ({explained_n} "
                "explained as equivalent, {unexplained} unexplained)"
            )
        elif line.startswith("- score "):
            line = "- score (killed / all): {score}; with equivalent ones left out: {strict}"
        out.append(line)
    unexplained = [k for k in survivors if k not in explained]
    killed = total - len(survivors)
    values = {
        "total": total,
        "killed": killed,
        "survived": len(survivors),
        "explained_n": len(survivors) - len(unexplained),
        "unexplained": len(unexplained),
        "score": f"{killed / max(1, total):.1%}",
        "strict": f"{killed / max(1, killed + len(unexplained)):.1%}",
    }
    text = "\n".join(
        line.format(**values) if "{" in line and line.startswith("- ") else line for line in out
    )
    if moved:
        note = (
            f"- relabelled: {moved} survivor(s) killed by a later run on the same code "
            f"({', '.join(str(c) for c in carry)})"
        )
        text = text.replace("\n\n## Survivors", f"\n{note}\n\n## Survivors", 1)
    report.write_text(text + "\n")
    print(f"{len(survivors)} survivors, {len(unexplained)} unexplained; {report}")
    return 1 if unexplained else 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "relabel":
        # scripts/mutate.py relabel REPORT [--explain FILE] [--carry LOG ...]
        parser = argparse.ArgumentParser(prog="mutate.py relabel")
        parser.add_argument("report", type=Path)
        parser.add_argument("--explain", type=Path)
        parser.add_argument("--carry", type=Path, action="append", default=[])
        args = parser.parse_args(argv[1:])
        explained = json.loads(args.explain.read_text()) if args.explain else {}
        return relabel(args.report, explained, args.carry)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", action="append", required=True, help="FILE[:func,...]")
    parser.add_argument("--tests", action="append", required=True, help="pytest arguments")
    parser.add_argument("--timeout", type=float, default=0, help="per mutant (default 3x base)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--explain", type=Path, help="JSON {mutant key: why it is equivalent}")
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--only", help="run only mutants whose key contains one of A,B,...")
    parser.add_argument(
        "--carry",
        type=Path,
        action="append",
        default=[],
        help="output of an earlier run on the same code: the mutants it killed count as killed "
        "without running again (sound while tests were only added or tightened since)",
    )
    args = parser.parse_args(argv)
    explained = json.loads(args.explain.read_text()) if args.explain else {}

    everything: list[Mutant] = []
    for target in args.target:
        file, _, names = target.partition(":")
        wanted = set(names.split(",")) if names else None
        everything += mutants(ROOT / file, wanted)
    if args.only:
        everything = [m for m in everything if any(k in m.key for k in args.only.split(","))]

    carried: dict[str, tuple[str, float]] = {}
    for log in args.carry:
        for row in log.read_text().splitlines():
            verdict, _, key = row.partition(" ")
            if verdict in ("killed", "timeout"):
                carried[key.strip()] = ("killed", 0.0)
    carried = {m.key: carried[m.key] for m in everything if m.key in carried}

    started = time.monotonic()
    copies = [make_copy() for _ in range(args.jobs)]
    verdict, base_time = run_tests(copies[0], args.tests, 3600)
    if verdict != "survived":
        print("the tests fail without any mutant", file=sys.stderr)
        return 2
    timeout = args.timeout or max(30.0, 3 * base_time)
    print(f"{len(everything)} mutants; unmutated tests took {base_time:.1f}s", flush=True)

    free = list(copies)
    results: dict[str, tuple[str, float]] = dict(carried)

    def one(mutant: Mutant) -> None:
        workdir = free.pop()
        file = workdir / mutant.key.split(":")[0]
        original = file.read_text()
        try:
            file.write_text(ast.unparse(mutant.tree) + "\n")
            results[mutant.key] = run_tests(workdir, args.tests, timeout)
        finally:
            file.write_text(original)
            free.append(workdir)
        print(f"{results[mutant.key][0]:8} {mutant.key}", flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, [m for m in everything if m.key not in carried]))
    for workdir in copies:
        shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - started

    killed = [m for m in everything if results[m.key][0] != "survived"]
    survivors = [m for m in everything if results[m.key][0] == "survived"]
    unexplained = [m for m in survivors if m.key not in explained]
    score = len(killed) / len(everything) if everything else 1.0
    lines = [
        f"# Mutation testing: {', '.join(args.target)}",
        "",
        f"- command: `scripts/mutate.py {' '.join(argv or sys.argv[1:])}`",
        f"- tests run per mutant: `{' '.join(args.tests)}` (stop at the first failure)",
        f"- mutants: {len(everything)}; killed {len(killed)}; survived {len(survivors)} "
        f"({len(survivors) - len(unexplained)} explained as equivalent, "
        f"{len(unexplained)} unexplained)",
        f"- score (killed / all): {score:.1%}; with equivalent ones left out: "
        f"{len(killed) / max(1, len(everything) - len(survivors) + len(unexplained)):.1%}",
        f"- run time: {elapsed / 60:.1f} min with {args.jobs} job(s); unmutated tests "
        f"{base_time:.1f}s",
        *(
            [
                f"- {len(carried)} mutants counted as killed by the earlier run(s) in "
                f"{', '.join(str(c) for c in args.carry)} (same code) and not run again"
            ]
            if carried
            else []
        ),
        "",
        "## Survivors",
        "",
        "| mutant | line | change | why it survives |",
        "| --- | --- | --- | --- |",
    ]
    for m in survivors:
        change = f"`{m.before[:60]}` -> `{m.after[:60] or '(operand)'}`".replace("|", "\\|")
        why = explained.get(m.key, "UNEXPLAINED").replace("|", "\\|")
        lines.append(f"| `{m.key}` | {m.line} | {change} | {why} |")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text("\n".join(lines) + "\n")
    print(f"score {score:.1%}, {len(unexplained)} unexplained survivors; {args.report}")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
