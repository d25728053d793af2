"""Write the small sentiment data set shipped in data/ (deterministic; run to regenerate).

Short product and film reviews built from templates, labelled "positive" or "negative". The
training and evaluation files share no sentence. Small enough to train on a CPU in a minute.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SUBJECTS = [
    "the film", "this movie", "the plot", "the acting", "the soundtrack", "this phone",
    "the battery", "the screen", "the service", "the food", "this book", "the ending",
    "the camera", "the hotel room", "the staff", "this game", "the story", "the coffee",
]
POSITIVE = [
    "wonderful", "excellent", "delightful", "brilliant", "great", "superb", "lovely",
    "fantastic", "charming", "impressive", "enjoyable", "amazing",
]
NEGATIVE = [
    "terrible", "awful", "boring", "dreadful", "poor", "disappointing", "horrible",
    "dull", "annoying", "mediocre", "painful", "weak",
]
TEMPLATES = [
    "{s} was {a}.",
    "honestly, {s} is {a}.",
    "i thought {s} was really {a}.",
    "{s} turned out to be {a}, as my friends said.",
    "overall {s} felt {a} from start to finish.",
    "my verdict: {s} is {a}.",
]


def rows(rng: random.Random) -> list[dict[str, str]]:
    out = []
    for s in SUBJECTS:
        for label, adjectives in (("positive", POSITIVE), ("negative", NEGATIVE)):
            for a in adjectives:
                t = rng.choice(TEMPLATES)
                out.append({"text": t.format(s=s, a=a).capitalize(), "label": label})
    rng.shuffle(out)
    return out


def main() -> None:
    rng = random.Random(13)
    data = rows(rng)
    here = Path(__file__).resolve().parents[1] / "data"
    here.mkdir(exist_ok=True)
    splits = {"sentiment-train.jsonl": data[:320], "sentiment-eval.jsonl": data[320:432]}
    for name, part in splits.items():
        with (here / name).open("w", encoding="utf-8") as f:
            for row in part:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
