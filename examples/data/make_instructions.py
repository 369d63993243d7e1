"""Regenerate instructions.jsonl: small, deterministic instruction data written by this project.

Run: python examples/data/make_instructions.py
"""

import json
import random
from pathlib import Path

WORDS = (
    "apple river stone cloud garden lamp winter orange candle forest silver ocean paper window bridge yellow tiger music pencil castle"
).split()
COLORS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red", "sun": "yellow"}


def examples(rng: random.Random):
    for _ in range(80):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        yield {"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)}
    for _ in range(60):
        w = rng.choice(WORDS)
        yield {"instruction": "Reverse the letters of the word.", "input": w, "output": w[::-1]}
    for _ in range(60):
        w = " ".join(rng.sample(WORDS, 3))
        yield {"instruction": "Write the words in upper case.", "input": w, "output": w.upper()}
    for _ in range(40):
        ws = rng.sample(WORDS, 4)
        yield {"instruction": "Sort the words alphabetically.", "input": ", ".join(ws), "output": ", ".join(sorted(ws))}
    for thing, color in COLORS.items():
        yield {"instruction": f"What color is {thing}?", "input": "", "output": f"The {thing} is {color}."}
    for _ in range(30):
        n = rng.randint(2, 9)
        yield {"instruction": "Count from one to the given number.", "input": str(n), "output": " ".join(str(i) for i in range(1, n + 1))}


if __name__ == "__main__":
    rows = list(examples(random.Random(1234)))
    random.Random(99).shuffle(rows)
    out = Path(__file__).with_name("instructions.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {out}")
