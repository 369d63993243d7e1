"""Regenerate chat.jsonl: short multi-turn conversations with system prompts, deterministic,
written by this project (OpenAI-style ``messages`` rows for the ``chat`` data format).

Run: python examples/data/make_chat.py
"""

import json
import random
from pathlib import Path

WORDS = "apple river stone cloud garden lamp winter orange candle forest silver ocean paper window bridge tiger music pencil castle".split()
COLORS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red", "sun": "yellow", "milk": "white"}
NAMES = "Ada Ben Cleo Dan Eve Finn Gia Hugo Iris Jon".split()
SYSTEMS = {
    "plain": "You are a helpful assistant.",
    "brief": "You are a helpful assistant. Answer in as few words as possible.",
    "upper": "You are a helpful assistant. Always answer in capital letters.",
    "tutor": "You are a patient math tutor. Show the working.",
}


def style(system: str, answer: str) -> str:
    return answer.upper() if system == "upper" else answer


def arithmetic(rng: random.Random, system: str) -> list[tuple[str, str]]:
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    if system == "tutor":
        first = (f"What is {a} + {b}?", f"Add the numbers: {a} + {b} = {a + b}. The answer is {a + b}.")
    elif system == "brief":
        first = (f"What is {a} + {b}?", f"{a + b}")
    else:
        first = (f"What is {a} + {b}?", f"{a} + {b} = {a + b}.")
    c = rng.randint(2, 9)
    second = (f"And times {c}?", f"{a + b} * {c} = {(a + b) * c}.")
    return [first, second][: rng.randint(1, 2)]


def colors(rng: random.Random, system: str) -> list[tuple[str, str]]:
    things = rng.sample(sorted(COLORS), 3)
    turns = []
    for thing in things[: rng.randint(1, 3)]:
        answer = COLORS[thing] if system == "brief" else f"The {thing} is {COLORS[thing]}."
        turns.append((f"What color is the {thing}?", answer))
    return turns


def words(rng: random.Random, system: str) -> list[tuple[str, str]]:
    word = rng.choice(WORDS)
    turns = [(f"Spell '{word}' backwards.", word[::-1])]
    if rng.random() < 0.6:
        turns.append(("How many letters does it have?", f"'{word}' has {len(word)} letters."))
    if rng.random() < 0.4:
        turns.append(("Thanks!", "You're welcome."))
    return turns


def greeting(rng: random.Random, system: str) -> list[tuple[str, str]]:
    name = rng.choice(NAMES)
    turns = [(f"Hi, I'm {name}.", f"Hello {name}, how can I help?")]
    turns.append(("What is my name?", f"Your name is {name}."))
    return turns


def conversations(rng: random.Random):
    kinds = [arithmetic, colors, words, greeting]
    for i in range(320):
        system = rng.choice(sorted(SYSTEMS))
        turns = kinds[i % len(kinds)](rng, system)
        messages = [{"role": "system", "content": SYSTEMS[system]}]
        for question, answer in turns:
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": style(system, answer)})
        yield {"messages": messages}


def text() -> str:
    """The file's content: one JSON object per line."""
    return "".join(json.dumps(row) + "\n" for row in conversations(random.Random(12)))


def main() -> None:
    out = Path(__file__).with_name("chat.jsonl")
    out.write_text(text(), encoding="utf-8")
    print(f"wrote {text().count(chr(10))} conversations to {out}")


if __name__ == "__main__":
    main()
