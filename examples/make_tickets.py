"""Generate the sample dataset: support-ticket triage as chat (category + priority).

The committed files in examples/data/tickets were made by running this script; it is
deterministic. Test tickets use phrasings and products that training never shows.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = "You triage customer support tickets. Reply with the category and the priority only."
CATEGORIES = {
    "billing": [
        "I was charged twice for my {product} subscription this month.",
        "My invoice for the {product} shows the wrong amount.",
        "Please refund the payment I made for {product} by mistake.",
        "Why did my card get billed again for {product}?",
        "The {product} plan price went up without notice.",
        "I need a copy of last month's receipt for {product}.",
    ],
    "shipping": [
        "My {product} order has not arrived after two weeks.",
        "The tracking number for my {product} does not work.",
        "The {product} was delivered to the wrong address.",
        "The box with my {product} arrived crushed.",
        "Can you ship the {product} to a different city?",
        "My {product} parcel says delivered but I never got it.",
    ],
    "technical": [
        "The {product} app crashes every time I open it.",
        "I cannot log in to my {product} account since the update.",
        "The {product} will not connect to my wifi.",
        "Sync between my phone and the {product} keeps failing.",
        "The {product} screen goes black after a few minutes.",
        "Error code 503 appears when I save in {product}.",
    ],
    "account": [
        "How do I change the email address on my {product} account?",
        "Please delete my {product} account and all my data.",
        "I want to add a second user to my {product} account.",
        "Someone else may have accessed my {product} account.",
        "I forgot the username for my {product} account.",
        "How can I transfer my {product} account to my partner?",
    ],
}
HELD_OUT = {
    "billing": ["I see an unknown charge from you linked to my {product}.", "The discount for {product} was never applied to my bill."],
    "shipping": ["The courier lost my {product} package somewhere.", "Only half of my {product} order was in the delivery."],
    "technical": ["The {product} freezes when I try to update the firmware.", "Notifications from {product} stopped working today."],
    "account": ["My {product} profile shows someone else's name.", "I would like to merge two {product} accounts into one."],
}
URGENT = ["", " This is urgent, I need it fixed today!", " Please help as soon as possible, my business depends on it."]
CALM = ["", " No rush.", " Whenever you have time, thanks."]
PRODUCTS = ["Acme Router", "PhotoBox", "FitBand", "CloudNotes", "SmartLamp", "TaxMate", "HomeCam", "StreamPlus"]
TEST_PRODUCTS = ["KettlePro", "BikeLock X", "MapMate"]


def record(text: str, cat: str, prio: str) -> dict:
    return {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": text},
        {"role": "assistant", "content": f"Category: {cat}\nPriority: {prio}"},
    ]}


def make(rng: random.Random, templates: dict, products: list[str], n: int) -> list[dict]:
    out = []
    for _ in range(n):
        cat = rng.choice(sorted(templates))
        prio = rng.choice(["high", "normal"])
        tail = rng.choice(URGENT[1:] if prio == "high" else CALM)
        text = rng.choice(templates[cat]).format(product=rng.choice(products)) + tail
        out.append(record(text, cat, prio))
    return out


def main(out: Path = Path(__file__).parent / "data" / "tickets") -> None:
    rng = random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": make(rng, CATEGORIES, PRODUCTS, 320), "valid": make(rng, CATEGORIES, PRODUCTS, 32),
              "test": make(rng, HELD_OUT, TEST_PRODUCTS, 32)}
    for name, recs in splits.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


if __name__ == "__main__":
    main()
