"""instructor extracts a pydantic model through the stack: `python instructor_client.py BASE_URL MODEL MODE`, MODE one
of json (response_format json_object, the schema in the prompt), json_schema (response_format json_schema) or tools
(one tool, tool_choice naming it). Prints one JSON line: the validated object, or the error."""

import json
import sys

import instructor
from openai import OpenAI
from pydantic import BaseModel


class City(BaseModel):
    name: str
    country: str


# The example of the shape keeps the small model from copying the schema where nothing but the prompt holds it (json).
PROMPT = 'Paris is the capital of France. Extract the city and its country, as {"name": ..., "country": ...}.'
MODES = {"json": instructor.Mode.JSON, "json_schema": instructor.Mode.JSON_SCHEMA, "tools": instructor.Mode.TOOLS}

base_url, model, mode = sys.argv[1:4]
client = instructor.from_openai(OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120),
                                mode=MODES[mode])
try:
    city = client.chat.completions.create(
        model=model, response_model=City, max_retries=0, temperature=0, max_tokens=64,
        messages=[{"role": "user", "content": PROMPT}],
    )
except Exception as exc:  # the test shows what went wrong
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:2000]}))
    sys.exit(1)
print(json.dumps({"type": type(city).__name__, "city": city.model_dump()}))
