"""Drives a running Nearpath gateway (simulator model) as app developers do: the official
`openai` client (sync, async, raw responses, tools, JSON mode, logprobs), LiteLLM and LangChain.

Run by tests/tests/openai_python.rs, one section per process (LiteLLM alone takes seconds to
import, so each library is imported once and only by its own section):
  python3 client_libraries_test.py openai|litellm|langchain|capabilities
Environment:
  NEARPATH_BASE_URL     the gateway, e.g. http://127.0.0.1:PORT/v1
  NEARPATH_API_KEY      a key with generous limits
  NEARPATH_MODEL        a simulator model declaring tools, JSON mode and logprobs
  NEARPATH_PLAIN_MODEL  (capabilities) a model declared without tools
The simulator is deterministic, not a model: the checks are on shapes and on what the libraries
hand the application, never on particular text. Prints one line per check and exits non-zero
on the first failure.
"""
import json
import os
import sys

base = os.environ["NEARPATH_BASE_URL"]
key = os.environ["NEARPATH_API_KEY"]
model = os.environ["NEARPATH_MODEL"]
msgs = [{"role": "user", "content": "What is the weather in Paris?"}]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
OTHER = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}")
        sys.exit(1)
    print(f"ok   {name}")


def streamed_tool_calls(chunks):
    """Tool-call deltas by index: the first piece (id/type/name) and the arguments joined."""
    calls = {}
    for c in chunks:
        for choice in c.choices:
            for tc in choice.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"first": tc, "arguments": ""})
                entry["arguments"] += (tc.function.arguments if tc.function else None) or ""
    return calls


def section_openai():
    import asyncio

    import openai
    from openai import AsyncOpenAI, OpenAI

    client = OpenAI(base_url=base, api_key=key, max_retries=0, timeout=20)

    raw = client.chat.completions.with_raw_response.create(model=model, messages=msgs, max_tokens=4)
    rid = raw.headers.get("x-request-id")
    check("with_raw_response: x-request-id header", rid and len(rid) >= 8, dict(raw.headers))
    r = raw.parse()
    check("with_raw_response: parses to a ChatCompletion", r.object == "chat.completion"
          and r.choices[0].message.content, r)
    raw2 = client.chat.completions.with_raw_response.create(model=model, messages=msgs, max_tokens=4)
    check("x-request-id differs per request", raw2.headers.get("x-request-id") != rid,
          (rid, raw2.headers.get("x-request-id")))
    with client.chat.completions.with_streaming_response.create(
            model=model, messages=msgs, max_tokens=3, stream=True) as resp:
        check("with_streaming_response: x-request-id and SSE", resp.headers.get("x-request-id")
              and resp.headers.get("content-type", "").startswith("text/event-stream"), dict(resp.headers))
        lines = [line for line in resp.iter_lines() if line]
        check("with_streaming_response: ends with [DONE]", lines[-1] == "data: [DONE]", lines)

    async def concurrently():
        aclient = AsyncOpenAI(base_url=base, api_key=key, max_retries=0, timeout=20)
        plain = [aclient.chat.completions.create(model=model, messages=msgs, max_tokens=5) for _ in range(4)]
        done = await asyncio.gather(*plain)
        stream = await aclient.chat.completions.create(model=model, messages=msgs, max_tokens=5, stream=True)
        text = ""
        async for c in stream:
            if c.choices:
                text += c.choices[0].delta.content or ""
        await aclient.close()
        return done, text

    done, text = asyncio.run(concurrently())
    check("async: four concurrent requests complete", len(done) == 4
          and all(d.choices[0].message.content for d in done), done)
    check("async: deterministic simulator, same text every time",
          len({d.choices[0].message.content for d in done}) == 1, [d.choices[0].message.content for d in done])
    check("async: streaming gives the same text", text == done[0].choices[0].message.content,
          (text, done[0].choices[0].message.content))

    for choice, name in (("required", None), ({"type": "function", "function": {"name": "get_time"}}, "get_time")):
        label = f"tool_choice {json.dumps(choice)}"
        r = client.chat.completions.create(model=model, messages=msgs, tools=[WEATHER, OTHER],
                                           tool_choice=choice, max_tokens=64)
        calls = r.choices[0].message.tool_calls
        check(f"{label}: a tool call", calls and len(calls) >= 1, r)
        check(f"{label}: finish_reason tool_calls", r.choices[0].finish_reason == "tool_calls", r)
        call = calls[0]
        check(f"{label}: id and type", call.id and call.type == "function", call)
        check(f"{label}: a declared function", call.function.name in ("get_weather", "get_time")
              and (name is None or call.function.name == name), call)
        check(f"{label}: arguments are a JSON object", isinstance(json.loads(call.function.arguments), dict), call)

        chunks = list(client.chat.completions.create(model=model, messages=msgs, tools=[WEATHER, OTHER],
                                                     tool_choice=choice, max_tokens=64, stream=True))
        streamed = streamed_tool_calls(chunks)
        check(f"{label} streaming: tool-call deltas", 0 in streamed, chunks)
        first = streamed[0]["first"]
        check(f"{label} streaming: the first piece has id, type and name",
              first.id and first.type == "function" and first.function and first.function.name, first)
        check(f"{label} streaming: arguments concatenate to the non-streamed ones",
              streamed[0]["arguments"] == call.function.arguments, (streamed[0]["arguments"], call))
        check(f"{label} streaming: finish_reason tool_calls",
              [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls", chunks[-1])

    r = client.chat.completions.create(model=model, messages=msgs, response_format={"type": "json_object"},
                                       max_tokens=32)
    check("json mode: the content is a JSON object", isinstance(json.loads(r.choices[0].message.content), dict), r)
    chunks = list(client.chat.completions.create(model=model, messages=msgs, response_format={"type": "json_object"},
                                                 max_tokens=32, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check("json mode streaming: the same JSON", text == r.choices[0].message.content, (text, r))

    r = client.chat.completions.create(model=model, messages=msgs, logprobs=True, top_logprobs=2, max_tokens=4)
    lp = r.choices[0].logprobs
    check("logprobs: one entry per token", lp and lp.content and len(lp.content) >= 1, r)
    check("logprobs: entries have a token, a logprob and 2 top_logprobs",
          all(isinstance(t.token, str) and t.logprob <= 0 and len(t.top_logprobs) == 2 for t in lp.content), lp)
    check("logprobs: the tokens spell the content", "".join(t.token for t in lp.content)
          == r.choices[0].message.content, (lp, r.choices[0].message.content))
    chunks = list(client.chat.completions.create(model=model, messages=msgs, logprobs=True, top_logprobs=2,
                                                 max_tokens=4, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content or []]
    check("logprobs streaming: the same tokens", [t.token for t in streamed] == [t.token for t in lp.content],
          (streamed, lp))
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=4)
    check("no logprobs unless asked", r.choices[0].logprobs is None, r)

    try:
        client.chat.completions.create(model=model, messages=msgs, top_logprobs=50, logprobs=True)
        check("top_logprobs over 20 is refused", False, "no error")
    except openai.BadRequestError as e:
        check("top_logprobs over 20 is refused", e.status_code == 400 and "top_logprobs" in str(e), e)


def section_litellm():
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    import litellm

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    kw = dict(model=f"openai/{model}", api_base=base, api_key=key, messages=msgs, num_retries=0, timeout=20)

    r = litellm.completion(max_tokens=5, **kw)
    check("litellm completion", r.choices[0].message.content and r.usage.completion_tokens == 5, r)
    text = ""
    for c in litellm.completion(max_tokens=5, stream=True, **kw):
        text += c.choices[0].delta.content or ""
    check("litellm streaming gives the same text", text == r.choices[0].message.content,
          (text, r.choices[0].message.content))
    r = litellm.completion(max_tokens=64, tools=[WEATHER], tool_choice="required", **kw)
    calls = r.choices[0].message.tool_calls
    check("litellm tool call", calls and calls[0].function.name == "get_weather"
          and isinstance(json.loads(calls[0].function.arguments), dict), r)
    pieces = {}
    for c in litellm.completion(max_tokens=64, tools=[WEATHER], tool_choice="required", stream=True, **kw):
        for tc in c.choices[0].delta.tool_calls or []:
            pieces.setdefault(tc.index, [None, ""])
            pieces[tc.index][0] = pieces[tc.index][0] or tc.function.name
            pieces[tc.index][1] += tc.function.arguments or ""
    check("litellm streamed tool call", pieces.get(0, [None])[0] == "get_weather"
          and pieces[0][1] == calls[0].function.arguments, (pieces, calls))


def section_langchain():
    os.environ.setdefault("LANGCHAIN_TRACING_V2", "false")
    os.environ.setdefault("LANGSMITH_TRACING", "false")
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    llm = ChatOpenAI(base_url=base, api_key=key, model=model, max_tokens=5, max_retries=0, timeout=20)
    r = llm.invoke("What is the weather in Paris?")
    check("langchain invoke", isinstance(r.content, str) and r.content, r)
    streamed = "".join(c.content for c in llm.stream("What is the weather in Paris?"))
    check("langchain stream gives the same text", streamed == r.content, (streamed, r.content))

    tooled = ChatOpenAI(base_url=base, api_key=key, model=model, max_tokens=64, max_retries=0, timeout=20)
    r = tooled.bind_tools([WEATHER], tool_choice="get_weather").invoke("What is the weather in Paris?")
    check("langchain bind_tools(...).invoke returns the tool call",
          len(r.tool_calls) == 1 and r.tool_calls[0]["name"] == "get_weather"
          and isinstance(r.tool_calls[0]["args"], dict), r)
    r = tooled.bind_tools([WEATHER], tool_choice="required").invoke("What is the weather in Paris?")
    check("langchain bind_tools required", r.tool_calls and r.tool_calls[0]["name"] == "get_weather", r)

    class Weather(BaseModel):
        """The weather in a city."""
        city: str = Field(description="the city")
        temperature_c: int = Field(description="degrees Celsius")

    for method in ("json_schema", "function_calling"):
        out = tooled.with_structured_output(Weather, method=method).invoke("What is the weather in Paris?")
        check(f"langchain with_structured_output ({method}) returns an instance", isinstance(out, Weather), out)
    out = tooled.with_structured_output(method="json_mode").invoke("The weather in Paris, as JSON.")
    check("langchain with_structured_output (json_mode) returns a dict", isinstance(out, dict), out)


def section_capabilities():
    import openai
    from openai import OpenAI

    plain = os.environ["NEARPATH_PLAIN_MODEL"]
    client = OpenAI(base_url=base, api_key=key, max_retries=0, timeout=20)
    for kw, param in (
        (dict(tools=[WEATHER]), "tools"),
        (dict(tools=[WEATHER], tool_choice="required"), "tools"),
    ):
        try:
            client.chat.completions.create(model=plain, messages=msgs, max_tokens=4, **kw)
            check(f"{param} on a model without it: 400", False, "accepted")
        except openai.BadRequestError as e:
            check(f"{param} on a model without it: 400 naming the parameter",
                  e.status_code == 400 and (e.param == param or param in str(e)), e)
    r = client.chat.completions.create(model=plain, messages=msgs, max_tokens=4)
    check("the model without tools still chats", r.choices[0].message.content, r)
    r = client.chat.completions.create(model=model, messages=msgs, tools=[WEATHER], tool_choice="required",
                                       max_tokens=64)
    check("the model with tools takes the same request", r.choices[0].message.tool_calls, r)


SECTIONS = {
    "openai": section_openai,
    "litellm": section_litellm,
    "langchain": section_langchain,
    "capabilities": section_capabilities,
}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in SECTIONS:
        print(f"usage: client_libraries_test.py {'|'.join(SECTIONS)}", file=sys.stderr)
        sys.exit(2)
    SECTIONS[sys.argv[1]]()
    print("all checks passed")
