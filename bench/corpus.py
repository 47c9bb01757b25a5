"""First-pass acceptance and validation time over the agent-output corpus, before and after.

    python -m bench.corpus [--before 1db35b5] [--repeat 300]

"Before" is the validator of an older commit (read with `git show`, imported from a temporary
package); "after" is the working tree's. For each: the share of answers whose expected outcome is
not `repair` that are accepted without a model call, the `repair` answers that come back as a result
anyway (wrong output served as valid), the repair calls saved, and the time of one validation
(median of `--repeat` runs per answer; p50 and p95 over the corpus), json-repair included.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from adapter.tasks import TASKS
from adapter.settings import Settings
from adapter.tasks.reading import OutputInvalid as OutputInvalidNow
from tests.agent_outputs import Answer, load_corpus
from tests.helpers import RECORD_ID

ROOT = Path(__file__).resolve().parent.parent
Validate = Callable[[Answer], Any]


def validator_at(commit: str) -> Validate:
    """The validator as it was at `commit`: its modules copied into a throwaway package."""
    package = Path(tempfile.mkdtemp(prefix="validator_")) / "validator_before"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for module in ("validation", "extract", "models"):
        source = subprocess.run(["git", "show", f"{commit}:adapter/{module}.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
        (package / f"{module}.py").write_text(source)
    sys.path.insert(0, str(package.parent))
    old = importlib.import_module("validator_before.validation")
    by_task = {"email.generate": old.email_result, "lead.qualify": old.lead_result, "deal.predict": old.deal_result}

    def validate(answer: Answer) -> Any:
        try:
            return by_task[answer.task](answer.text, RECORD_ID, TASKS[answer.task].agent_id)
        except old.OutputInvalid:
            return None

    return validate


def validator_now(answer: Answer) -> Any:
    task = TASKS[answer.task]
    try:
        return task.validate(answer.text, RECORD_ID, task.agent_id)
    except OutputInvalidNow:
        return None


def _runs(call: Callable[[], Any], repeat: int) -> list[float]:
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        call()
        runs.append((time.perf_counter_ns() - t0) / 1000)  # µs
    return runs


def timed(validate: Validate, answer: Answer, repeat: int) -> float:
    return statistics.median(_runs(lambda: validate(answer), repeat))


def pct(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100 * part / whole:.1f} %)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="1db35b5", help="commit whose validator is the baseline")
    parser.add_argument("--repeat", type=int, default=300, help="runs per answer for the timing")
    args = parser.parse_args()

    corpus = load_corpus()
    usable = [a for a in corpus if a.outcome != "repair"]
    broken = [a for a in corpus if a.outcome == "repair"]
    before = validator_at(args.before)
    rows = {}
    gc.disable()  # a collection landing in one run would be timed as validation
    try:
        for name, validate in ((f"before ({args.before})", before), ("after (working tree)", validator_now)):
            accepted = [a for a in usable if validate(a) is not None]
            served_wrong = [a for a in broken if validate(a) is not None]
            times = sorted(timed(validate, a, args.repeat) for a in corpus)
            repaired_json = [timed(validate, a, args.repeat) for a in corpus
                             if name.startswith("after") and (v := validate(a)) is not None
                             and "the JSON's syntax was repaired" in v.normalised]
            rows[name] = (accepted, served_wrong, times, repaired_json)
    finally:
        gc.enable()

    print(f"Corpus: {len(corpus)} answers in conductor-agents/*/corpus/ ({len(usable)} usable: accept or accept-normalised; "
          f"{len(broken)} repair)\n")
    print("| validator | first-pass acceptance of usable answers | `repair` answers served as a result "
          "| p50 validation | p95 validation |")
    print("|---|---|---|---|---|")
    for name, (accepted, served_wrong, times, _) in rows.items():
        p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
        print(f"| {name} | {pct(len(accepted), len(usable))} | {len(served_wrong)} | {statistics.median(times):.0f} µs "
              f"| {p95:.0f} µs |")
    (old_ok, old_wrong, _, _), (new_ok, new_wrong, _, repaired_json) = rows.values()
    saved = {a.id for a in new_ok} - {a.id for a in old_ok}
    attempts = Settings.from_env({}).agent_repair_attempts
    print(f"\nRepair calls saved per pass over the corpus: {len(saved) * attempts} ({len(saved)} usable answers no "
          f"longer go to repair; AGENT_REPAIR_ATTEMPTS={attempts}, the default, and a model that answers the same way "
          f"again ended each of them in a 502).")
    if repaired_json:
        print(f"Answers read through json-repair: {len(repaired_json)}; p50 of their validation "
              f"{statistics.median(repaired_json):.0f} µs, max {max(repaired_json):.0f} µs.")
    # What a cache hit pays for its X-Agent-Warnings: decode the served body, check the guidance again.
    bodies = [(msgspec.json.encode(v.result), TASKS[a.task]) for a in usable if (v := validator_now(a)) is not None]
    recompute = sorted(statistics.median(_runs(lambda b=b, t=t: t.warnings(b), args.repeat)) for b, t in bodies)
    print(f"Warnings recomputed from a cached body (every hit): p50 {statistics.median(recompute):.1f} µs, "
          f"max {recompute[-1]:.1f} µs over {len(bodies)} bodies.")
    if old_wrong:
        print("Served as valid before, though they break the contract: " + ", ".join(a.id for a in old_wrong))
    lost = {a.id for a in old_ok} - {a.id for a in new_ok}
    if lost:
        print("Accepted before, not now: " + ", ".join(sorted(lost)))
    print("Now accepted, before sent to repair: " + ", ".join(sorted(saved)))


if __name__ == "__main__":
    main()
