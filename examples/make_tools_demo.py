"""Write the "weather / currency" tool-calling demo set (glaive-style, OpenAI messages format).

    .venv/bin/python examples/make_tools_demo.py

writes src/loraforge/data/builtin/tools_demo.jsonl (training) and tools_demo_test.jsonl (held
out: cities, currencies, amounts and phrasings the training file does not use). Deterministic:
the same files every run. Each record has ``tools`` and ``messages``; a tool call is an
assistant turn with ``tool_calls``, its result a ``tool`` turn, then the answer; some records
need no tool, so the model also learns when not to call one.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "src" / "loraforge" / "data" / "builtin"

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "convert_currency",
            "description": "Convert an amount of money between currencies",
            "parameters": {
                "type": "object",
                "properties": {
                    "amount": {"type": "number"},
                    "from_currency": {"type": "string"},
                    "to_currency": {"type": "string"},
                },
                "required": ["amount", "from_currency", "to_currency"],
            },
        },
    },
]

TRAIN_CITIES = [
    "Paris",
    "London",
    "Tokyo",
    "Berlin",
    "Madrid",
    "Rome",
    "Cairo",
    "Sydney",
    "Toronto",
    "Lima",
    "Oslo",
    "Dublin",
    "Vienna",
    "Prague",
    "Seoul",
    "Nairobi",
]
TEST_CITIES = ["Lisbon", "Athens", "Boston", "Munich", "Hanoi", "Quito"]
TRAIN_CUR = ["USD", "EUR", "GBP", "JPY", "CHF", "CAD"]
TEST_CUR = ["AUD", "SEK", "NZD"]
RATES = {
    "USD": 1.0,
    "EUR": 0.92,
    "GBP": 0.79,
    "JPY": 151.0,
    "CHF": 0.88,
    "CAD": 1.36,
    "AUD": 1.52,
    "SEK": 10.4,
    "NZD": 1.66,
}
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy"]

WEATHER_ASKS = {
    "train": [
        "What's the weather in {city}?",
        "How warm is it in {city} right now?",
        "Is it cold in {city} today?",
        "Weather for {city}, please.",
        "Tell me the current weather in {city}.",
    ],
    "test": ["Could you check the weather in {city}?", "What is it like outside in {city}?"],
}
FAHRENHEIT_ASKS = {
    "train": [
        "What's the temperature in {city} in Fahrenheit?",
        "How hot is it in {city}? Use Fahrenheit.",
    ],
    "test": ["Give me the {city} weather in Fahrenheit."],
}
MONEY_ASKS = {
    "train": [
        "Convert {amount} {src} to {dst}.",
        "How much is {amount} {src} in {dst}?",
        "What are {amount} {src} worth in {dst}?",
        "Change {amount} {src} into {dst}.",
    ],
    "test": ["I have {amount} {src}. How many {dst} is that?", "{amount} {src} to {dst}?"],
}
CHITCHAT = {
    "train": [
        ("Hello!", "Hello! How can I help you today?"),
        ("What can you do?", "I can tell you the weather in a city and convert currencies."),
        ("What is the capital of France?", "The capital of France is Paris."),
        ("Thank you!", "You're welcome!"),
        ("How many days are in a week?", "A week has seven days."),
        ("What is 2 + 2?", "2 + 2 is 4."),
        ("Tell me a fun fact.", "Honey never spoils."),
        ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
    ],
    "test": [
        ("Good morning!", "Good morning! How can I help you?"),
        ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
        ("How many hours are in a day?", "A day has 24 hours."),
    ],
}


def _call(name: str, args: dict, n: int) -> dict:
    return {
        "id": f"call_{n}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(args)},
    }


def weather(rng: random.Random, split: str, n: int, fahrenheit: bool) -> dict:
    city = rng.choice(TRAIN_CITIES if split == "train" else TEST_CITIES)
    asks = FAHRENHEIT_ASKS if fahrenheit else WEATHER_ASKS
    unit = "fahrenheit" if fahrenheit else "celsius"
    temp_c = rng.randint(-5, 35)
    temp = round(temp_c * 9 / 5 + 32) if fahrenheit else temp_c
    cond = rng.choice(CONDITIONS)
    result = {"city": city, "temperature": temp, "unit": unit, "condition": cond}
    mark = "°F" if fahrenheit else "°C"
    return {
        "tools": TOOLS,
        "messages": [
            {"role": "user", "content": rng.choice(asks[split]).format(city=city)},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [_call("get_weather", {"city": city, "unit": unit}, n)],
            },
            {"role": "tool", "tool_call_id": f"call_{n}", "content": json.dumps(result)},
            {"role": "assistant", "content": f"It is {temp} {mark} and {cond} in {city}."},
        ],
    }


def money(rng: random.Random, split: str, n: int) -> dict:
    pool = TRAIN_CUR if split == "train" else TEST_CUR + TRAIN_CUR[:2]
    src, dst = rng.sample(pool, 2)
    if split == "test" and src in TRAIN_CUR and dst in TRAIN_CUR:
        src = rng.choice(TEST_CUR)
    amount = rng.choice([5, 10, 20, 50, 75, 100, 250, 500, 1000, 1200])
    value = round(amount / RATES[src] * RATES[dst], 2)
    args = {"amount": amount, "from_currency": src, "to_currency": dst}
    result = {"amount": amount, "from": src, "to": dst, "result": value}
    return {
        "tools": TOOLS,
        "messages": [
            {
                "role": "user",
                "content": rng.choice(MONEY_ASKS[split]).format(amount=amount, src=src, dst=dst),
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [_call("convert_currency", args, n)],
            },
            {"role": "tool", "tool_call_id": f"call_{n}", "content": json.dumps(result)},
            {"role": "assistant", "content": f"{amount} {src} is {value:.2f} {dst}."},
        ],
    }


def chitchat(rng: random.Random, split: str) -> dict:
    q, a = rng.choice(CHITCHAT[split])
    return {
        "tools": TOOLS,
        "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
    }


def build(split: str, count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for n in range(count):
        kind = n % 5  # 2 weather (1 of them Fahrenheit every other time), 2 money, 1 chat
        if kind in (0, 1):
            out.append(weather(rng, split, n, fahrenheit=kind == 1 and n % 2 == 1))
        elif kind in (2, 3):
            out.append(money(rng, split, n))
        else:
            out.append(chitchat(rng, split))
    return out


def main() -> None:
    for name, split, count, seed in (
        ("tools_demo", "train", 80, 1),
        ("tools_demo_test", "test", 20, 2),
    ):
        path = OUT / f"{name}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for rec in build(split, count, seed):
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        print(f"{path}: {count} conversations")


if __name__ == "__main__":
    main()
