"""Drives `/v1/responses` (the OpenAI Responses API) with the official `openai` Python client.

Run by tests/tests/openai_python.rs against the gateway (and against a node's own OpenAI server),
which passes:
  NEARPATH_BASE_URL    e.g. http://127.0.0.1:PORT/v1
  NEARPATH_API_KEY     a key with generous limits
  NEARPATH_MODEL       a model that answers with text
  NEARPATH_TOOL_MODEL  a model that calls a tool when `tool_choice` requires one
Prints one line per check and exits non-zero on the first failure.
"""
import asyncio
import json
import os
import sys

import openai
from openai import AsyncOpenAI, OpenAI

base = os.environ["NEARPATH_BASE_URL"]
key = os.environ["NEARPATH_API_KEY"]
model = os.environ["NEARPATH_MODEL"]
tool_model = os.environ["NEARPATH_TOOL_MODEL"]

# No retries: a test must see the first answer, not a retried one.
client = OpenAI(base_url=base, api_key=key, max_retries=0, timeout=20)


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}")
        sys.exit(1)
    print(f"ok   {name}")


r = client.responses.create(model=model, input="Tell me about edge gateways", instructions="Be brief.",
                            max_output_tokens=40)
check("responses non-streaming", r.object == "response" and r.id.startswith("resp_") and r.model == model
      and r.status in ("completed", "incomplete") and r.output[0].type == "message", r)
check("output_text", isinstance(r.output_text, str) and len(r.output_text) > 0, r)
check("usage", r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
      and r.usage.output_tokens > 0, r.usage)
check("instructions echoed", r.instructions == "Be brief.", r.instructions)

events = list(client.responses.create(
    model=model, stream=True,
    input=[{"role": "user", "content": [{"type": "input_text", "text": "Tell me about edge gateways"}]}]))
kinds = [e.type for e in events]
check("stream starts with created, in_progress", kinds[:2] == ["response.created", "response.in_progress"], kinds)
check("stream ends with completed", kinds[-1] in ("response.completed", "response.incomplete"), kinds)
check("sequence numbers count from 0", [e.sequence_number for e in events] == list(range(len(events))))
deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
check("deltas assemble the final text", deltas == events[-1].response.output_text and deltas, deltas)

r = client.responses.create(model=model, input="Count to three", max_output_tokens=2)
check("max_output_tokens gives incomplete", r.status == "incomplete"
      and r.incomplete_details.reason == "max_output_tokens" and r.usage.output_tokens == 2, r)

with client.responses.stream(model=model, input="Tell me about edge gateways") as stream:
    helper_events = list(stream)
    # The simulator stops at its token limit, which is `response.incomplete`: the helper keeps
    # `get_final_response()` for `response.completed` and yields the incomplete event.
    last = helper_events[-1]
    final = stream.get_final_response() if last.type == "response.completed" else last.response
texts = [e.delta for e in helper_events if e.type == "response.output_text.delta"]
snapshots = [e.snapshot for e in helper_events if e.type == "response.output_text.delta"]
check("responses.stream helper", final.output_text == "".join(texts) and snapshots[-1] == final.output_text
      and final.status in ("completed", "incomplete"), final)

tools = [{"type": "function", "name": "get_weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
r = client.responses.create(model=tool_model, input="What is the weather in Paris?", tools=tools,
                            tool_choice="required")
calls = [o for o in r.output if o.type == "function_call"]
check("function call", len(calls) >= 1 and calls[0].name == "get_weather" and calls[0].call_id
      and isinstance(json.loads(calls[0].arguments), dict) and calls[0].id.startswith("fc_"), r.output)
call = calls[0]

with client.responses.stream(model=tool_model, input="What is the weather in Paris?", tools=tools,
                             tool_choice={"type": "function", "name": "get_weather"}) as stream:
    done = [e for e in stream if e.type == "response.function_call_arguments.done"]
    final = stream.get_final_response()
streamed = [o for o in final.output if o.type == "function_call"]
check("streamed function call", len(done) >= 1 and streamed and streamed[0].arguments == done[0].arguments,
      final.output)

r = client.responses.create(model=model, tools=tools, input=[
    {"role": "user", "content": "What is the weather in Paris?"},
    {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
    {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"},
])
check("function call output accepted", r.status in ("completed", "incomplete") and r.output_text, r)


async def async_check():
    aclient = AsyncOpenAI(base_url=base, api_key=key, max_retries=0, timeout=20)
    r = await aclient.responses.create(model=model, input="Hello")
    kinds = [e.type async for e in await aclient.responses.create(model=model, input="Hello", stream=True)]
    await aclient.close()
    return r, kinds


r, kinds = asyncio.run(async_check())
check("async client", r.output_text and kinds[-1] in ("response.completed", "response.incomplete"), kinds)

try:
    client.responses.create(model=model, input="x", previous_response_id="resp_123")
    check("previous_response_id refused", False, "no error")
except openai.BadRequestError as e:
    check("previous_response_id refused", e.status_code == 400 and e.param == "previous_response_id", e)

try:
    client.responses.create(model=model, input=[{"role": "user", "content": "a"},
                                                {"role": "user", "content": [{"type": "input_video"}]}])
    check("bad content part refused", False, "no error")
except openai.BadRequestError as e:
    check("bad content part refused", e.param == "input[1].content[0].type", e)

print("all checks passed")
