"""The tool-calling loop through the official openai client, against `loraforge serve`.

    .venv/bin/loraforge serve --adapter tools=runs/tools-demo --port 8000
    .venv/bin/python examples/tool_client.py "How much is 120 EUR in JPY?"

The model answers with tool calls; each is executed here by a real Python function, its result
is sent back as a `tool` message, and the loop goes on until the model answers in text.
"""

from __future__ import annotations

import argparse
import json

from openai import OpenAI

RATES = {"USD": 1.0, "EUR": 0.92, "GBP": 0.79, "JPY": 151.0, "CHF": 0.88, "AUD": 1.52}


def get_weather(city: str, unit: str = "celsius") -> dict:
    celsius = 12 + len(city) % 15  # a stand-in for a weather service
    temp = celsius if unit == "celsius" else round(celsius * 9 / 5 + 32)
    return {"city": city, "temperature": temp, "unit": unit, "condition": "cloudy"}


def convert_currency(amount: float, from_currency: str, to_currency: str) -> dict:
    value = amount / RATES[from_currency.upper()] * RATES[to_currency.upper()]
    return {"amount": amount, "from": from_currency, "to": to_currency, "result": round(value, 2)}


FUNCTIONS = {"get_weather": get_weather, "convert_currency": convert_currency}
TOOLS = [  # the tool set of examples/make_tools_demo.py, which the demo adapter learned
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


def run(
    question: str,
    base_url: str = "http://127.0.0.1:8000/v1",
    model: str = "tools",
    tool_choice="auto",
    api_key: str = "unused",
    max_rounds: int = 3,
) -> tuple[str, list[dict]]:
    """(the final answer, the calls executed as {"name", "arguments", "result"})."""
    client = OpenAI(base_url=base_url, api_key=api_key)
    messages = [{"role": "user", "content": question}]
    executed = []
    for _ in range(max_rounds):
        r = client.chat.completions.create(
            model=model, messages=messages, tools=TOOLS, tool_choice=tool_choice, temperature=0
        )
        msg = r.choices[0].message
        if not msg.tool_calls:
            return msg.content or "", executed
        messages.append(msg.model_dump(exclude_none=True))
        for call in msg.tool_calls:
            args = json.loads(call.function.arguments)
            result = FUNCTIONS[call.function.name](**args)
            executed.append({"name": call.function.name, "arguments": args, "result": result})
            messages.append(
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)}
            )
        tool_choice = "auto"  # a forced first call, then the model may answer
    return "", executed


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="tools")
    args = parser.parse_args()
    answer, calls = run(args.question, args.base_url, args.model)
    for call in calls:
        print(f"called {call['name']}({call['arguments']}) -> {call['result']}")
    print(answer)
