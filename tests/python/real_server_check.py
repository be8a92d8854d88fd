"""Compares the gateway with a real OpenAI-compatible server (llama-cpp-python), field by field.

Run by tests/tests/real_server.rs with one section name per run:
  python3 real_server_check.py chat|tools|json|logprobs|embeddings|models
Environment:
  NEARPATH_BASE_URL    the gateway, e.g. http://127.0.0.1:PORT/v1
  NEARPATH_DIRECT_URL  the same server without the gateway, e.g. http://127.0.0.1:PORT/v1
  NEARPATH_API_KEY     a gateway key with generous limits
  NEARPATH_MODEL       the model name (the same on both paths)
Every call goes through the official `openai` client. The model has random weights, so the
checks compare shapes (the same keys at every level, the same JSON types) and, where greedy
decoding makes them reproducible, values; never particular text. Prints one line per check
and exits non-zero on the first failure, with both sides' JSON.
"""
import json
import os
import sys

from openai import OpenAI

base = os.environ["NEARPATH_BASE_URL"]
direct_url = os.environ["NEARPATH_DIRECT_URL"]
key = os.environ["NEARPATH_API_KEY"]
model = os.environ["NEARPATH_MODEL"]

# No retries: a test must see the first answer, not a retried one.
gateway = OpenAI(base_url=base, api_key=key, max_retries=0, timeout=60)
direct = OpenAI(base_url=direct_url, api_key="unused", max_retries=0, timeout=60)
msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
# Greedy and seeded: both paths must produce the same tokens.
SAME = {"temperature": 0, "seed": 7}

# What the gateway rewrites on purpose, at the top level of a response or chunk.
REWRITTEN = {"id", "created", "model", "usage", "system_fingerprint"}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        # Bounded, so that grammar-constrained generation by a random model ends.
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}")
        sys.exit(1)
    print(f"ok   {name}")


def raw(obj):
    """The JSON the server sent, as the client parsed it (fields it did not send stay out)."""
    return obj.model_dump(exclude_unset=True)


def shape(v, top=True):
    """Keys and JSON types, recursively; REWRITTEN keys are dropped at the top level."""
    if isinstance(v, dict):
        return {k: shape(x, False) for k, x in v.items() if not (top and k in REWRITTEN)}
    if isinstance(v, list):
        return [shape(x, False) for x in v]
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    return type(v).__name__


def first_difference(a, b, path="$"):
    """Where two shapes first differ, as a JSON path and what each side has there."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a:
                return f"{path}.{k}: missing through the gateway"
            if k not in b:
                return f"{path}.{k}: only through the gateway"
            d = first_difference(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} items through the gateway, {len(b)} direct"
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if a == b else f"{path}: {json.dumps(a)} through the gateway, {json.dumps(b)} direct"


def same_shape(name, through, straight):
    a, b = shape(through), shape(straight)
    check(name, a == b, f"{first_difference(a, b)}\n  gateway: {json.dumps(through)}\n"
          f"  direct:  {json.dumps(straight)}")


def both(call):
    """Runs `call(client)` on the gateway and directly: (gateway result, direct result)."""
    return call(gateway), call(direct)


def chunks_of(client, **kw):
    return [raw(c) for c in client.chat.completions.create(model=model, stream=True, **kw)]


def same_chunks(name, through, straight):
    check(f"{name}: chunk count", len(through) == len(straight),
          f"gateway {len(through)}, direct {len(straight)}\n  gateway: {json.dumps(through)}\n"
          f"  direct:  {json.dumps(straight)}")
    for i, (a, b) in enumerate(zip(through, straight)):
        if shape(a) != shape(b):
            same_shape(f"{name}: chunk {i}", a, b)
    print(f"ok   {name}: every chunk has the direct chunk's shape")


def content_of(chunks):
    return "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c.get("choices"))


def section_chat():
    g, d = both(lambda c: raw(c.chat.completions.create(model=model, messages=msgs, max_tokens=8, **SAME)))
    same_shape("chat non-streaming", g, d)
    check("chat non-streaming: same text (greedy)", g["choices"][0]["message"]["content"]
          == d["choices"][0]["message"]["content"], (g, d))
    check("chat non-streaming: model is the one asked for", g["model"] == model, g)
    g, d = both(lambda c: chunks_of(c, messages=msgs, max_tokens=8, **SAME))
    same_chunks("chat streaming", g, d)
    check("chat streaming: same text (greedy)", content_of(g) == content_of(d), (content_of(g), content_of(d)))
    check("chat streaming: same finish_reason",
          g[-1]["choices"][0]["finish_reason"] == d[-1]["choices"][0]["finish_reason"], (g[-1], d[-1]))


def tool_call_pieces(chunks):
    """Tool-call deltas by index: the first piece (with id/type/name) and the arguments joined."""
    calls = {}
    for c in chunks:
        for choice in c.get("choices") or []:
            for tc in (choice.get("delta") or {}).get("tool_calls") or []:
                entry = calls.setdefault(tc["index"], {"first": tc, "arguments": ""})
                entry["arguments"] += (tc.get("function") or {}).get("arguments") or ""
    return calls


def section_tools():
    kw = dict(messages=msgs, tools=[WEATHER], tool_choice=NAMED, max_tokens=64, **SAME)
    g, d = both(lambda c: raw(c.chat.completions.create(model=model, **kw)))
    same_shape("named tool_choice non-streaming", g, d)
    gc, dc = g["choices"][0]["message"].get("tool_calls"), d["choices"][0]["message"].get("tool_calls")
    check("named tool_choice: the direct server made a call", dc, d)
    check("named tool_choice: the gateway delivers the call", gc and gc[0]["function"]["name"] == "get_weather", g)
    check("named tool_choice: same arguments", gc[0]["function"]["arguments"] == dc[0]["function"]["arguments"],
          (gc, dc))
    args = json.loads(gc[0]["function"]["arguments"])
    check("named tool_choice: arguments follow the schema", set(args) == {"city", "unit"}, args)
    check("named tool_choice: same finish_reason",
          g["choices"][0]["finish_reason"] == d["choices"][0]["finish_reason"], (g, d))

    g, d = both(lambda c: chunks_of(c, **kw))
    same_chunks("named tool_choice streaming", g, d)
    gp, dp = tool_call_pieces(g), tool_call_pieces(d)
    check("streamed tool calls: the direct server streamed one", list(dp) == [0], d)
    check("streamed tool calls: the gateway streamed the same indexes", list(gp) == list(dp), g)
    first = gp[0]["first"]
    check("streamed tool calls: the first piece carries index, id, type and name",
          first.get("id") and first.get("type") == "function"
          and (first.get("function") or {}).get("name") == "get_weather", first)
    check("streamed tool calls: arguments concatenate to the direct JSON",
          gp[0]["arguments"] == dp[0]["arguments"], (gp[0]["arguments"], dp[0]["arguments"]))
    check("streamed tool calls: the arguments are JSON", isinstance(json.loads(gp[0]["arguments"]), dict),
          gp[0]["arguments"])
    check("streamed tool calls: same finish_reason",
          g[-1]["choices"][0]["finish_reason"] == d[-1]["choices"][0]["finish_reason"], (g[-1], d[-1]))


def section_json():
    kw = dict(messages=[{"role": "user", "content": "Reply with a JSON object."}],
              response_format={"type": "json_object"}, max_tokens=32, **SAME)
    g, d = both(lambda c: raw(c.chat.completions.create(model=model, **kw)))
    same_shape("json_object non-streaming", g, d)
    text = g["choices"][0]["message"]["content"]
    check("json_object: same content as direct", text == d["choices"][0]["message"]["content"], (g, d))
    check("json_object: the content is a JSON object", isinstance(json.loads(text), dict), text)
    g, d = both(lambda c: chunks_of(c, **kw))
    same_chunks("json_object streaming", g, d)
    check("json_object streaming: same content", content_of(g) == content_of(d), (content_of(g), content_of(d)))


def section_logprobs():
    kw = dict(messages=msgs, logprobs=True, top_logprobs=3, max_tokens=5, **SAME)
    g, d = both(lambda c: raw(c.chat.completions.create(model=model, **kw)))
    same_shape("logprobs non-streaming", g, d)
    content = (g["choices"][0].get("logprobs") or {}).get("content")
    check("logprobs: one entry per token", content and len(content) == len(d["choices"][0]["logprobs"]["content"]), g)
    # llama-cpp-python lists the sampled token too when it is not among the top 3, hence
    # "at least"; the shape check above already holds the gateway to the direct lengths.
    check("logprobs: top_logprobs has at least the asked length",
          all(len(t["top_logprobs"]) >= 3 for t in content), content)
    check("logprobs: same tokens as direct",
          [t["token"] for t in content] == [t["token"] for t in d["choices"][0]["logprobs"]["content"]], (g, d))
    g, d = both(lambda c: chunks_of(c, **kw))
    same_chunks("logprobs streaming", g, d)


def section_embeddings():
    inputs = ["edge gateways", "relay the bytes"]
    for fmt in ("float", None):
        extra = {"encoding_format": fmt} if fmt else {}
        label = f"embeddings ({fmt or 'client default: base64'})"
        g, d = both(lambda c: c.embeddings.create(model=model, input=inputs, **extra))
        check(f"{label}: one vector per input", len(g.data) == len(inputs) == len(d.data), g)
        for i, (a, b) in enumerate(zip(g.data, d.data)):
            check(f"{label}: vector {i} length", len(a.embedding) == len(b.embedding) > 0,
                  (len(a.embedding), len(b.embedding)))
            worst = max(abs(x - y) for x, y in zip(a.embedding, b.embedding))
            check(f"{label}: vector {i} values within 1e-6", worst <= 1e-6, worst)
            check(f"{label}: index {i}", a.index == b.index == i, (a, b))
        check(f"{label}: object", g.object == "list" and g.data[0].object == "embedding", g)
        check(f"{label}: usage counts prompt tokens", g.usage is not None and g.usage.prompt_tokens > 0, g.usage)
    g = raw(gateway.embeddings.create(model=model, input="one", encoding_format="float"))
    d = raw(direct.embeddings.create(model=model, input="one", encoding_format="float"))
    same_shape("embeddings: same shape as direct", g, d)


def section_models():
    m = gateway.models.retrieve(model)
    check("models.retrieve", m.id == model and m.object == "model" and isinstance(m.created, int)
          and isinstance(m.owned_by, str), m)
    listed = [x.id for x in gateway.models.list()]
    check("models.retrieve agrees with the list", model in listed, listed)
    import openai
    try:
        gateway.models.retrieve("no-such-model")
        check("models.retrieve unknown id is 404", False, "no error")
    except openai.NotFoundError as e:
        check("models.retrieve unknown id is 404", e.status_code == 404, e)


SECTIONS = {
    "chat": section_chat,
    "tools": section_tools,
    "json": section_json,
    "logprobs": section_logprobs,
    "embeddings": section_embeddings,
    "models": section_models,
}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in SECTIONS:
        print(f"usage: real_server_check.py {'|'.join(SECTIONS)}", file=sys.stderr)
        sys.exit(2)
    SECTIONS[sys.argv[1]]()
    print("all checks passed")
