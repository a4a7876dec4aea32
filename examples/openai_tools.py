"""Structured outputs and tool calls from `meshlm serve` with the official `openai` client.

Start the server (default model; --tool-call-parser lets the model choose tools itself):
    meshlm serve --port 8000 --enable-auto-tool-choice --tool-call-parser hermes
then run:
    python examples/openai_tools.py
"""
import json

from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
model = client.models.list().data[0].id

# A JSON schema the answer always matches (response_format), and a regex (vLLM's extra).
schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
          "required": ["city", "country"], "additionalProperties": False}
out = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Name a famous city."}], temperature=0, max_tokens=64,
    response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}})
print("json:", json.loads(out.choices[0].message.content))
out = client.completions.create(model=model, prompt="The year was", max_tokens=8,
                                extra_body={"guided_regex": r" 1[0-9]{3}\."})
print("regex:", out.choices[0].text)

# A tool call the model must make (tool_choice "required"), its result fed back, and the answer.
tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
messages = [{"role": "user", "content": "What is the weather in Paris?"}]
out = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice="required",
                                     temperature=0, max_tokens=64)
call = out.choices[0].message.tool_calls[0]
print("call:", call.function.name, call.function.arguments, "| finish:", out.choices[0].finish_reason)
messages += [out.choices[0].message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": "21 degrees and sunny"}]
out = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice="none",
                                     temperature=0, max_tokens=64)
print("answer:", out.choices[0].message.content)
