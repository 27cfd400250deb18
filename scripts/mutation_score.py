"""Mutation score of the core modules: how many small, deliberate bugs the tests catch.

    pip install cosmic-ray==8.7.0
    python scripts/mutation_score.py --sample 40           # 40 mutants per module, drawn evenly (~30 min)
    python scripts/mutation_score.py --only select/nms.py  # every mutant of one module
    python scripts/mutation_score.py                       # all 636 mutants of the targets below (hours)

Each target module is mutated by cosmic-ray (one mutant at a time, from :data:`KEPT_OPERATORS`: a
comparison moved across its boundary or negated, ``is`` / ``is not`` swapped, one natural
replacement per arithmetic or bitwise operator, a unary minus dropped, a number changed, ``not``
added or removed, ``True`` / ``False`` or ``and`` / ``or`` swapped, ``break`` made ``continue``,
a loop run zero times) and the test
files that cover it are run against every mutant; a mutant is *killed* when a test fails or it
runs past the timeout. The mutants are applied in a throwaway copy of the working tree (imported
first through ``PYTHONPATH``), never in the tree itself. The score is killed / (killed +
survived); the surviving mutants are printed with their line so each can be read: either a test
is missing, or the mutant does not change behaviour (an equivalent mutant).

The score is measured against the listed test files only (``-m "not slow"``), so it is a lower
bound of what the whole suite catches. It is not part of CI: each mutant reruns test files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module (under src/pio_fvlm/) -> the test files that cover it
TARGETS: dict[str, list[str]] = {
    "select/nms.py": ["tests/test_nms.py", "tests/test_selection.py"],
    "config.py": ["tests/test_config_errors.py", "tests/test_api_conveniences.py", "tests/test_planning.py"],
    "planning.py": ["tests/test_planning.py", "tests/test_config_errors.py", "tests/test_schedules.py",
                    "tests/test_selector_settings.py"],
    "schedules.py": ["tests/test_schedules.py"],
    "runtime/plan.py": ["tests/test_runtime.py", "tests/test_schedules.py", "tests/test_properties.py"],
    "runtime/masks.py": ["tests/test_runtime.py"],
    "runtime/call_start.py": ["tests/test_runtime.py", "tests/test_hardening.py", "tests/test_selection.py"],
    "runtime/first_stage.py": ["tests/test_runtime.py", "tests/test_selection.py", "tests/test_selector_settings.py"],
    "runtime/later_stages.py": ["tests/test_schedules.py"],
    "runtime/continuation.py": ["tests/test_runtime.py"],
    "runtime/call_end.py": ["tests/test_runtime.py"],
    "select/closed_form.py": ["tests/test_closed_form.py"],
    "select/saliency.py": ["tests/test_closed_form.py", "tests/test_selection.py"],
    "models/qwen3_vl.py": ["tests/test_qwen3_vl.py"],
}

# One natural replacement per arithmetic operator (the other ten per operator mostly give
# mutants any test kills at once), every boundary shift and negation of a comparison.
KEPT_OPERATORS = [
    "ReplaceBinaryOperator_Add_Sub", "ReplaceBinaryOperator_Sub_Add", "ReplaceBinaryOperator_Mul_Div",
    "ReplaceBinaryOperator_Div_Mul", "ReplaceBinaryOperator_FloorDiv_Mul", "ReplaceBinaryOperator_Mod_FloorDiv",
    "ReplaceBinaryOperator_BitAnd_BitOr", "ReplaceBinaryOperator_BitOr_BitAnd",
    "ReplaceComparisonOperator_Lt_LtE", "ReplaceComparisonOperator_LtE_Lt", "ReplaceComparisonOperator_Gt_GtE",
    "ReplaceComparisonOperator_GtE_Gt", "ReplaceComparisonOperator_Eq_NotEq", "ReplaceComparisonOperator_NotEq_Eq",
    "ReplaceComparisonOperator_Lt_GtE", "ReplaceComparisonOperator_Gt_LtE", "ReplaceComparisonOperator_LtE_Gt",
    "ReplaceComparisonOperator_GtE_Lt", "ReplaceComparisonOperator_Is_IsNot", "ReplaceComparisonOperator_IsNot_Is",
    "ReplaceUnaryOperator_Delete_Not", "ReplaceUnaryOperator_USub_UAdd", "AddNot", "ReplaceTrueWithFalse",
    "ReplaceFalseWithTrue", "ReplaceAndWithOr", "ReplaceOrWithAnd", "NumberReplacer", "ZeroIterationForLoop",
    "ReplaceBreakWithContinue",
]


def copy_tree(dest: Path) -> None:
    """The working tree's package and tests (uncommitted edits included) into ``dest``."""
    for part in ("src", "tests", "pyproject.toml"):
        source = ROOT / part
        if source.is_dir():
            shutil.copytree(source, dest / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, dest / part)


def config_text(module: str, tests: list[str], timeout: float) -> str:
    keep = "|".join(KEPT_OPERATORS)
    command = f'python -m pytest -x -q -p no:cacheprovider -m "not slow" {" ".join(tests)}'
    return (
        "[cosmic-ray]\n"
        f'module-path = "src/pio_fvlm/{module}"\n'
        f"timeout = {timeout}\n"
        "excluded-modules = []\n"
        f"test-command = '{command}'\n\n"
        "[cosmic-ray.distributor]\n"
        'name = "local"\n\n'
        "[cosmic-ray.filters.operators-filter]\n"
        f'exclude-operators = ["^core/(?!({keep})$).*"]\n'
    )


def thin_to(mutants_db: Path, sample: int) -> None:
    """Keep ``sample`` pending mutants, spread evenly over the module (deterministic)."""
    with sqlite3.connect(mutants_db) as db:
        jobs = [row[0] for row in db.execute(
            "SELECT job_id FROM mutation_specs WHERE job_id NOT IN (SELECT job_id FROM work_results) "
            "ORDER BY module_path, start_pos_row, start_pos_col, operator_name")]
        if len(jobs) <= sample:
            return
        keep = {jobs[round(i * len(jobs) / sample)] for i in range(sample)}
        drop = [(j,) for j in jobs if j not in keep]
        db.executemany("DELETE FROM mutation_specs WHERE job_id = ?", drop)
        db.executemany("DELETE FROM work_items WHERE job_id = ?", drop)


def outcomes(mutants_db: Path) -> list[dict[str, object]]:
    """One dict per mutant: line, operator, outcome (killed / survived / timeout / incompetent)."""
    dump = subprocess.run(["cosmic-ray", "dump", str(mutants_db)], capture_output=True, text=True, check=True)
    rows = []
    for line in dump.stdout.splitlines():
        item, result = json.loads(line)
        if result is None or result["worker_outcome"] == "skipped":  # left out by the operator filter
            continue
        mutation = item["mutations"][0]
        if result["worker_outcome"] == "timeout":
            outcome = "timeout"
        elif result["worker_outcome"] != "normal":
            outcome = "incompetent"
        else:
            outcome = result["test_outcome"]
        rows.append({"line": mutation["start_pos"][0], "operator": mutation["operator_name"].split("/")[-1],
                     "occurrence": mutation["occurrence"], "outcome": outcome})
    return rows


def run_target(module: str, tests: list[str], work: Path, timeout: float, sample: int | None) -> dict[str, object]:
    config = work / f"{module.replace('/', '_')}.toml"
    mutants_db = config.with_suffix(".sqlite")
    config.write_text(config_text(module, tests, timeout))
    env = dict(os.environ, PYTHONPATH=str(work / "src"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    subprocess.run(["cosmic-ray", "init", str(config), str(mutants_db)], cwd=work, env=env, check=True)
    subprocess.run(["cr-filter-operators", str(mutants_db), str(config)], cwd=work, env=env, check=True)
    if sample is not None:
        thin_to(mutants_db, sample)
    started = time.perf_counter()
    subprocess.run(["cosmic-ray", "exec", str(config), str(mutants_db)], cwd=work, env=env, check=True)
    rows = outcomes(mutants_db)
    killed = sum(r["outcome"] in ("killed", "timeout") for r in rows)
    survived = [r for r in rows if r["outcome"] == "survived"]
    return {"module": module, "tests": tests, "mutants": len(rows), "killed": killed,
            "survived": len(survived), "score": killed / max(1, killed + len(survived)),
            "seconds": round(time.perf_counter() - started), "survivors": survived}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", choices=sorted(TARGETS), help="modules to mutate (default: all)")
    p.add_argument("--sample", type=int, help="mutants per module, drawn evenly over its lines (default: all)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a mutant's test run counts as killed")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args()
    if shutil.which("cosmic-ray") is None:
        sys.exit("cosmic-ray is not installed: pip install cosmic-ray==8.7.0")
    results = []
    with tempfile.TemporaryDirectory(prefix="pio-fvlm-mutants-") as tmp:
        work = Path(tmp)
        copy_tree(work)
        for module in args.only or list(TARGETS):
            result = run_target(module, TARGETS[module], work, args.timeout, args.sample)
            results.append(result)
            print(f"{module:<20} {result['killed']:>4} of {result['killed'] + result['survived']:>4} killed "
                  f"({result['score']:.0%}), {result['seconds']} s", flush=True)
            for r in result["survivors"]:  # type: ignore[attr-defined]
                print(f"    survived: line {r['line']:>4}  {r['operator']} #{r['occurrence']}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
