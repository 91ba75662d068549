"""No lesson selects, promotes or tunes on test data (design.md §7): the test set is touched once, for the final model.

The check reads every notebook's code with `ast` and follows, cell after cell, which names hold test-set
numbers ("tainted": assigned from an expression that names the test split, or from a function that returns
one). It flags:

- a selection whose criterion names test data: `max`/`min`/`sorted`/`heapq.nlargest`/`nsmallest` with a
  `key=` that does, or a `best_*`/`select*`/`choose*`/`pick*`/`rank*` call given a test metric or result;
- a `metric=`/`monitor=` argument (checkpoint callbacks, registries) that names test data;
- training that validates (early stopping, best-epoch restore) on the test split: `fit(model, train, <test>)`
  or a `val_loader=`/`val_data=`/`validation_data=`/`eval_loader=` argument that names it;
- a promotion gate that reads test data: an `if`/`while`/conditional expression whose condition names test
  data, around a `promote`/`set_alias`/`transition*` call.

"Names test data": an identifier, attribute or string whose words include `test` (`loaders.test`, `test_acc`,
`"test_loss"`, `test16`), not `latest` or `contest`. Each pattern is shown catching a planted bad cell below,
next to its validation twin that passes.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass

import nbformat
import pytest
from IPython.core.inputtransformer2 import TransformerManager

from notebook_utils import NOTEBOOKS, code_cells, read

TEST_WORD = re.compile(r"(?<![A-Za-z])test", re.IGNORECASE)       # test_acc, loaders.test, test16; not latest
SELECTORS = {"max", "min", "sorted", "nlargest", "nsmallest"}
CHOOSER = re.compile(r"^(best|select|choose|pick|rank)", re.IGNORECASE)
CRITERION_KEYWORDS = {"metric", "monitor"}
VALIDATION_KEYWORDS = {"val_loader", "val_data", "validation_data", "eval_loader", "valid_loader", "val_dataloaders"}
PROMOTERS = re.compile(r"^(promote|set_alias|transition)", re.IGNORECASE)
FITTERS = re.compile(r"(^|_)fit($|_)", re.IGNORECASE)
COLLECTORS = {"append", "extend", "update", "add", "insert", "setdefault"}


@dataclass(frozen=True)
class Finding:
    kind: str       # 'selection', 'criterion', 'validation', 'gate'
    line: int
    code: str


def _call_name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


class _Checker:
    """Walks a notebook's cells in order, remembering which names hold test-set numbers."""

    def __init__(self):
        self.tainted: set[str] = set()        # variables assigned from test data
        self.test_functions: set[str] = set()  # functions whose return value names test data

    # -- does an expression name test data? ---------------------------------------------------------------
    def names_test(self, node: ast.AST | None) -> bool:
        if node is None:
            return False
        local = {a.arg for sub in ast.walk(node) if isinstance(sub, ast.Lambda) for a in sub.args.args}
        local |= {n for sub in ast.walk(node) if isinstance(sub, ast.comprehension) for n in _bound_names(sub.target)}
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and (TEST_WORD.search(sub.id) or (
                    sub.id not in local and (sub.id in self.tainted or sub.id in self.test_functions))):
                return True
            if isinstance(sub, ast.Attribute) and TEST_WORD.search(sub.attr):
                return True
            if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and TEST_WORD.search(sub.value):
                return True
            if isinstance(sub, ast.Call) and _call_name(sub) in self.test_functions:
                return True
        return False

    # -- the patterns ---------------------------------------------------------------------------------------
    def check_call(self, call: ast.Call, source: str) -> list[Finding]:
        name, found = _call_name(call), []

        def flag(kind):
            found.append(Finding(kind, call.lineno, ast.get_source_segment(source, call) or name))

        keywords = {kw.arg: kw.value for kw in call.keywords if kw.arg}
        if name in SELECTORS and self.names_test(keywords.get("key")):
            flag("selection")
        elif CHOOSER.match(name) and any(self.names_test(a) for a in [*call.args, *keywords.values()]):
            flag("selection")
        if any(self.names_test(keywords.get(k)) for k in CRITERION_KEYWORDS):
            flag("criterion")
        if any(self.names_test(keywords.get(k)) for k in VALIDATION_KEYWORDS) or (
                FITTERS.search(name) and len(call.args) >= 3 and self.names_test(call.args[2])):
            flag("validation")
        return found

    def check_gate(self, node: ast.AST, source: str) -> list[Finding]:
        body = node.body + node.orelse if isinstance(node, (ast.If, ast.While)) else [node.body, node.orelse]
        test = node.test
        promotes = [sub for part in body for sub in ast.walk(part)
                    if isinstance(sub, ast.Call) and PROMOTERS.match(_call_name(sub))]
        if promotes and self.names_test(test):
            return [Finding("gate", node.lineno, ast.get_source_segment(source, test) or "")]
        return []

    # -- following the taint ----------------------------------------------------------------------------------
    def learn(self, statement: ast.stmt) -> None:
        """Update which names hold test data after `statement` (in source order; branches are not followed)."""
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
            returns = [sub.value for sub in ast.walk(statement) if isinstance(sub, ast.Return)]
            if any(self.names_test(value) for value in returns):
                self.test_functions.add(statement.name)
            else:
                self.test_functions.discard(statement.name)
            return
        for node in ast.walk(statement):
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.NamedExpr)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                value_tainted = self.names_test(node.value)
                for target in targets:
                    for name in _bound_names(target):
                        if value_tainted:
                            self.tainted.add(name)
                        elif isinstance(target, ast.Name) and not isinstance(node, ast.AugAssign):
                            self.tainted.discard(name)          # plain re-assignment from clean data
            elif isinstance(node, (ast.For, ast.comprehension)) and self.names_test(node.iter):
                self.tainted.update(_bound_names(node.target))
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in COLLECTORS and isinstance(node.func.value, ast.Name)
                  and any(self.names_test(a) for a in [*node.args, *(kw.value for kw in node.keywords)])):
                self.tainted.add(node.func.value.id)            # results.append(evaluate(m, loaders.test))

    def check_cell(self, source: str) -> list[Finding]:
        python = TransformerManager().transform_cell(source)   # %magics and !shell lines become plain calls
        tree = ast.parse(python)
        found = []
        for statement in tree.body:
            for node in ast.walk(statement):
                if isinstance(node, ast.Call):
                    found += self.check_call(node, python)
                elif isinstance(node, (ast.If, ast.While, ast.IfExp)):
                    found += self.check_gate(node, python)
            self.learn(statement)
        return found


def _bound_names(target: ast.AST) -> list[str]:
    """The variable a target binds: `x`, `x[k]`, `x.attr` -> 'x'; tuples -> each."""
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for element in target.elts for n in _bound_names(element)]
    while isinstance(target, (ast.Subscript, ast.Attribute, ast.Starred)):
        target = target.value
    return [target.id] if isinstance(target, ast.Name) else []


def findings(cells: list[str]) -> list[tuple[int, Finding]]:
    """(cell number, finding) for a notebook given as its code cells' sources, in order."""
    checker = _Checker()
    return [(i, f) for i, source in enumerate(cells) for f in checker.check_cell(source)]


def notebook_findings(notebook) -> list[tuple[int, Finding]]:
    return findings([cell.source for cell in code_cells(notebook)])


# -- the bar: every lesson ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_no_lesson_selects_promotes_or_tunes_on_test_data(path):
    found = notebook_findings(read(path))
    assert not found, f"{path.name} chooses on test data (choose on validation data; report test once):\n" + "\n".join(
        f"  code cell {i + 1}, line {f.line} [{f.kind}]: {f.code}" for i, f in found)


def test_the_check_reads_every_lesson():
    assert len(NOTEBOOKS) >= 10 and all(code_cells(read(p)) for p in NOTEBOOKS)


def test_lesson_04_reads_the_test_set_in_one_cell_only():
    """Lesson 04 chooses and promotes on validation data; one cell, the final report, touches the test split."""
    path = next(p for p in NOTEBOOKS if p.name.startswith("04_"))
    touching = [cell.source for cell in code_cells(read(path)) if re.search(r"loaders\.test\b", cell.source)]
    assert len(touching) == 1, f"{path.name}: {len(touching)} cells read the test split:\n" + "\n---\n".join(touching)
    assert "promoted" in touching[0] and "NBVAL_IGNORE_OUTPUT" in touching[0]


# -- each pattern catches a planted bad cell, and passes its validation twin -----------------------------------

PLANTED = {
    "best_version on a test metric": (
        'best = best_version(registry, "digits", "test_acc")',
        'best = best_version(registry, "digits", "val_acc")', "selection"),
    "max with a test key": (
        'best = max(chain, key=lambda mv: mv.metrics["test_acc"])',
        'best = max(chain, key=lambda mv: mv.metrics["val_acc"])', "selection"),
    "sorted by test loss": (
        "ranked = sorted(runs, key=lambda r: r.test_loss)",
        "ranked = sorted(runs, key=lambda r: r.val_loss)", "selection"),
    "a grid tuned on test results": (
        "scores = {}\nfor lr in (1e-3, 3e-3):\n    scores[lr] = evaluate(train_one(lr), loaders.test).accuracy\n"
        "best_lr = max(scores, key=scores.get)",
        "scores = {}\nfor lr in (1e-3, 3e-3):\n    scores[lr] = evaluate(train_one(lr), loaders.val).accuracy\n"
        "best_lr = max(scores, key=scores.get)", "selection"),
    "a helper that returns test numbers": (
        "def score(model):\n    return evaluate(model, loaders.test).accuracy\n"
        "winner = max(models, key=score)",
        "def score(model):\n    return evaluate(model, loaders.val).accuracy\n"
        "winner = max(models, key=score)", "selection"),
    "a checkpoint callback monitoring test loss": (
        'callback = ModelCheckpoint(folder, monitor="test_loss")',
        'callback = ModelCheckpoint(folder, monitor="val_loss")', "criterion"),
    "early stopping on the test loader": (
        "fit(model, loaders.train, loaders.test, epochs=20, patience=3, restore_best=True)",
        "fit(model, loaders.train, loaders.val, epochs=20, patience=3, restore_best=True)", "validation"),
    "the test loader as val_loader": (
        "fit(model, loaders.train, val_loader=loaders.test, epochs=20)",
        "fit(model, loaders.train, val_loader=loaders.val, epochs=20)", "validation"),
    "a promotion gate on test accuracy": (
        'if registry.get("digits@staging").metrics["test_acc"] >= 0.9:\n    registry.promote("digits")',
        'if registry.get("digits@staging").metrics["val_acc"] >= 0.9:\n    registry.promote("digits")', "gate"),
    "a gate through a variable": (
        'passes = candidate.metrics["test_acc"] >= 0.90\nif passes:\n'
        '    registry.promote("digits", source="staging", target="production")',
        'passes = candidate.metrics["val_acc"] >= 0.90\nif passes:\n'
        '    registry.promote("digits", source="staging", target="production")', "gate"),
}


@pytest.mark.parametrize("bad, good, kind", PLANTED.values(), ids=list(PLANTED))
def test_a_planted_bad_cell_is_caught_and_its_validation_twin_passes(bad, good, kind):
    assert [f.kind for _, f in findings([bad])] == [kind]
    assert findings([good]) == []


def test_taint_crosses_cells_and_clears_on_reassignment():
    assert findings(["acc = evaluate(model, loaders.test).accuracy", "best = max(runs, key=lambda r: acc[r])"])
    # a lambda's own parameter is not the tainted variable of the same name
    assert not findings(["mv = registry.register('d', m, metrics={'test_acc': a})",
                         "best = max(scored, key=lambda mv: mv.metrics[metric])"])
    assert not findings(["acc = evaluate(model, loaders.test).accuracy", "acc = {}",
                         "best = max(runs, key=lambda r: acc[r])"])


def test_reporting_test_numbers_is_not_selection():
    report = ['%matplotlib inline',
              'test = evaluate(registry.load_model("digits@production"), loaders.test)',
              'print(f"test accuracy {test.accuracy:.3f}")\nassert test.accuracy >= 0.9',
              'print("latest:", max(versions, key=lambda mv: mv.version))',
              'assert min(v1["test_acc"], v2["test_acc"]) > 0.9']
    assert findings(report) == []


def test_a_planted_notebook_fails_the_bar(tmp_path):
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# a lesson"),
        nbformat.v4.new_code_cell("%matplotlib inline\nimport torch"),
        nbformat.v4.new_code_cell("test_scores = {m: evaluate(m, loaders.test).accuracy for m in models}"),
        nbformat.v4.new_code_cell("chosen = max(models, key=test_scores.get)"),
    ])
    path = tmp_path / "99_planted.ipynb"
    nbformat.write(notebook, path)
    found = notebook_findings(read(path))
    assert [(i, f.kind) for i, f in found] == [(2, "selection")]
    with pytest.raises(AssertionError, match="chooses on test data"):
        test_no_lesson_selects_promotes_or_tunes_on_test_data(path)
