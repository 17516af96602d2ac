"""Writes the small inputs the example jobs in jobs/ use (run once: python sample_data/make_sample_data.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).parent

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about autumn.",
    "What is 12 times 12?",
    "Give one tip for writing clear code.",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue? Answer in one sentence.",
    "List two uses of a paperclip.",
]
REVIEWS = [
    ("The battery lasts all day and the screen is bright.", "positive"),
    ("It broke after two days and support never answered.", "negative"),
    ("Does what it says, nothing more.", "neutral"),
    ("Absolutely love it, would buy again!", "positive"),
    ("The instructions were confusing and parts were missing.", "negative"),
    ("Arrived on time. Works fine.", "neutral"),
]
COUNTRIES = ["France", "Japan", "Brazil", "Canada", "Egypt", "India", "Kenya", "Norway", "Peru",
             "Spain", "Italy", "Mexico", "Chile", "Greece", "Ireland", "Vietnam"]


def main() -> None:
    with open(HERE / "prompts.jsonl", "w") as f:
        for i, p in enumerate(PROMPTS):
            f.write(json.dumps({"id": f"q{i}", "prompt": p}) + "\n")
    messages = [[{"role": "system", "content": "Classify the sentiment of the review as positive, "
                  "negative or neutral. Answer with one word."},
                 {"role": "user", "content": text}] for text, _ in REVIEWS]
    table = pa.table({"review_id": [f"rev{i}" for i in range(len(REVIEWS))],
                      "messages": messages, "label": [label for _, label in REVIEWS]})
    pq.write_table(table, HERE / "reviews_chat.parquet")
    with open(HERE / "openai_batch.jsonl", "w") as f:
        for i, p in enumerate(PROMPTS[:4]):
            f.write(json.dumps({"custom_id": f"request-{i}", "method": "POST",
                                "url": "/v1/chat/completions",
                                "body": {"model": "smollm2-135m", "max_tokens": 16,
                                         "messages": [{"role": "user", "content": p}]}}) + "\n")
    with open(HERE / "countries.jsonl", "w") as f:
        for c in COUNTRIES:
            f.write(json.dumps({"country": c, "prompt": f"What is the capital of {c}?"}) + "\n")


if __name__ == "__main__":
    main()
