"""Build the offline lm-eval task in fair_moe/data/eval_tasks/fair_moe_heldout/ from the bundled held-out text.

    python scripts/build_eval_tasks.py

Each item is a passage of held-out text (never used for calibration or training) and four candidate
continuations: the true one and three spans taken from elsewhere in the same domain. A model that
knows the domain prefers the true continuation; pruning that hurts the domain lowers the accuracy.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fair_moe.calibration import BUNDLED_HELDOUT_DIR  # noqa: E402

OUT = ROOT / "fair_moe" / "data" / "eval_tasks" / "fair_moe_heldout" / "heldout_mc.jsonl"
CONTEXT_CHARS, CONTINUATION_CHARS, ITEMS_PER_DOMAIN = 300, 60, 80


def span_after(text: str, cut: int) -> str | None:
    """The words after position ``cut`` (a space), about CONTINUATION_CHARS long, single-line-safe."""
    end = text.find(" ", cut + 1 + CONTINUATION_CHARS)
    span = text[cut + 1 : end if end > 0 else None].strip()
    return span if len(span) >= CONTINUATION_CHARS // 2 else None


def items_for(domain: str, text: str, rng: random.Random) -> list[dict]:
    spaces = [i for i, ch in enumerate(text) if ch == " " and CONTEXT_CHARS <= i < len(text) - 3 * CONTINUATION_CHARS]
    items: list[dict] = []
    while len(items) < ITEMS_PER_DOMAIN:
        cut = rng.choice(spaces)
        gold = span_after(text, cut)
        distractors = []
        while gold and len(distractors) < 3:
            other = rng.choice(spaces)
            if abs(other - cut) > 4 * CONTINUATION_CHARS:
                span = span_after(text, other)
                if span and span != gold and span not in distractors:
                    distractors.append(span)
        if not gold:
            continue
        label = rng.randrange(4)
        choices = distractors[:label] + [gold] + distractors[label:]
        items.append({"domain": domain, "context": text[cut - CONTEXT_CHARS : cut], "choices": choices, "label": label})
    return items


def main() -> int:
    rng = random.Random(0)
    items = []
    for path in sorted(BUNDLED_HELDOUT_DIR.glob("*.txt")):
        items.extend(items_for(path.stem, path.read_text(encoding="utf-8"), rng))
    OUT.write_text("".join(json.dumps(item) + "\n" for item in items))
    print(f"wrote {len(items)} items to {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
