"""How long hostile text holds the event loop: every audited pattern, the longest answers, json-repair (issue 22).

    python -m bench.regex [--root DIR] [--size 65536]

1. For each regular expression in adapter/ that reads hostile text (tests/text_audit.py `HOSTILE`), the
   longest CPU time of one call (search, match, fullmatch, a walk over every match: what `sub`,
   `split` and `finditer` do) on the adversarial corpus (tests/text_audit.py `corpus`: each piece
   repeated, each shape found quadratic), at `--size` characters. A call over 0.5 s on the first
   16 KiB is timed once at full size and ends that pattern's corpus (marked `>=`).
2. Per task, the time to read, validate and guide the worst answer (the worst of tests/text_audit.py
   `FILLS`) of 16 KiB, 64 KiB, the longest accepted (MAX_TEXT) and 1 MiB, as fresh (validation, then
   the served body's headers), and as each cache hit (the headers alone). Larger sizes are skipped
   once one takes over 2 s.
3. json-repair on the worst answer for it: as many `{a: b, a: b, ...}` objects of REPAIR_MAX
   characters as MAX_TEXT and MAX_CANDIDATES allow (stopped after 5 s).

DIR (default: this checkout) is the checkout whose `adapter` is measured, with this list and corpus:
`mkdir /tmp/base && git archive c0a4b67 | tar -x -C /tmp/base`, then `--root /tmp/base`.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.text_audit import CALLS, FILLS, HOSTILE, corpus, worst_answer

ROOT = Path(__file__).resolve().parent.parent
RECORD_ID = "65f1c0ffee0000000000a001"  # as tests/helpers.py's (not imported here: it would import this checkout's adapter)
SCREEN = 16 * 1024


def cpu(call: Callable[[], Any]) -> float:
    t0 = time.process_time()
    call()
    return time.process_time() - t0


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms" if seconds < 1 else f"{seconds:,.1f} s"


def patterns(size: int) -> float:
    texts = corpus(size)
    print(f"| pattern (reads) | longest call on the corpus ({len(texts)} texts of {size} characters) | on |")
    print("|---|---|---|")
    longest = 0.0
    for audited in HOSTILE:
        try:
            pattern, worst, where, stopped = audited.pattern, 0.0, "", False
        except AttributeError:  # an older checkout
            print(f"| `{audited.label}` | not in this checkout | |")
            continue
        for label, text in texts.items():
            for name, call in CALLS:
                if cpu(lambda: call(pattern, text[:SCREEN])) > 0.5:
                    took, stopped = cpu(lambda: call(pattern, text)), True
                else:
                    took = cpu(lambda: call(pattern, text))
                if took > worst:
                    worst, where = took, f"{name}, {label}"
                if stopped:
                    break
            if stopped:
                break
        longest = max(longest, worst)
        print(f"| `{audited.label}` ({audited.reads}) | {'>= ' if stopped else ''}{ms(worst)} | {where} |", flush=True)
    print(f"\nLongest call of any pattern: {ms(longest)}\n")
    return longest


def answers() -> None:
    from adapter.pipeline.answers import Answer
    from adapter.tasks import TASKS
    from adapter.tasks.extract import MAX_TEXT
    from adapter.tasks.reading import OutputInvalid
    import msgspec

    sizes = (16 * 1024, 64 * 1024, MAX_TEXT - 256, 1024 * 1024)
    print("| task: worst answer, fresh (validated, then served) / each hit | "
          + " | ".join(f"{s // 1024} KiB" for s in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for task in TASKS.values():
        cells, skip = [], False
        for size in sizes:
            if skip:
                cells.append("skipped")
                continue
            fresh = hit = 0.0
            fresh_fill = ("", "")
            refused = False
            for fill in FILLS:
                text = worst_answer(task, fill, size)
                t0 = time.process_time()
                try:
                    verdict = task.validate(text, RECORD_ID, task.agent_id)
                except OutputInvalid:
                    verdict, refused = None, True
                body = msgspec.json.encode(verdict.result) if verdict is not None else b""
                served = cpu(lambda: (answer := Answer.of(task, body, None, "HIT"), answer.headers, answer.event)) \
                    if body else 0.0
                took = time.process_time() - t0
                if took > fresh:
                    fresh, fresh_fill = took, fill
                hit = max(hit, served)
                if took > 2:
                    skip = True
                    break
            cells.append(f"{ms(fresh)} / {ms(hit)}{' (refused)' if refused else ''} [{fresh_fill[0]!r}+{fresh_fill[1]!r}…]")
        print(f"| {task.name} | " + " | ".join(cells) + " |", flush=True)
    print()


def json_repair_worst() -> None:
    from adapter.tasks import extract

    size = extract.REPAIR_MAX
    one = "{" + ("a: b, " * size)[: size - 2] + "}"
    count = min(extract.MAX_CANDIDATES, extract.MAX_TEXT // (size + 1))
    text = " ".join([one] * count)
    t0 = time.process_time()
    read = 0
    try:
        for _ in extract.objects(text):
            read += 1
            if time.process_time() - t0 > 5:
                break
    except extract.NoJsonObject:
        pass
    took = time.process_time() - t0
    budget = getattr(extract, "REPAIR_BUDGET", None)
    print(f"json-repair, worst answer: {count} broken objects of {size} characters (REPAIR_MAX; REPAIR_BUDGET "
          f"{budget}): {ms(took)}{' (stopped)' if read < count and took > 5 else ''}, {read} of them read")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose adapter/ is measured")
    parser.add_argument("--size", type=int, default=64 * 1024, help="characters of each adversarial text")
    args = parser.parse_args()
    sys.path.insert(0, str(args.root.resolve()))  # before anything imports `adapter`
    import adapter

    print(f"adapter: {Path(adapter.__file__).parent}\n")
    gc.disable()  # a collection landing in one call would be timed as the pattern's
    try:
        patterns(args.size)
        answers()
        json_repair_worst()
    finally:
        gc.enable()


if __name__ == "__main__":
    main()
