"""Drives a running Nearpath gateway with the official `openai` Python client.

Run by tests/tests/openai_python.rs, which starts the gateway and a node and passes:
  NEARPATH_BASE_URL   e.g. http://127.0.0.1:PORT/v1
  NEARPATH_API_KEY    a key with generous limits
  NEARPATH_SLOW_KEY   a key allowed 1 request per minute
  NEARPATH_MODEL      the model the node serves
  NEARPATH_DENIED_IP  an address the gateway's GeoIP places in a sanctioned country
Prints one line per check and exits non-zero on the first failure.
"""
import os
import sys

import openai
from openai import OpenAI

base = os.environ["NEARPATH_BASE_URL"]
key = os.environ["NEARPATH_API_KEY"]
slow_key = os.environ["NEARPATH_SLOW_KEY"]
model = os.environ["NEARPATH_MODEL"]
denied_ip = os.environ["NEARPATH_DENIED_IP"]

# No retries: a test must see the first answer, not a retried one.
client = OpenAI(base_url=base, api_key=key, max_retries=0, timeout=20)
msgs = [{"role": "user", "content": "Tell me about edge gateways"}]


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}")
        sys.exit(1)
    print(f"ok   {name}")


r = client.chat.completions.create(model=model, messages=msgs, max_tokens=6)
check("chat non-streaming", r.object == "chat.completion" and r.choices[0].message.role == "assistant"
      and len(r.choices[0].message.content.split()) == 6 and r.usage.completion_tokens == 6, r)
plain = r.choices[0].message.content

chunks = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=6, stream=True))
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check("chat streaming", text == plain and chunks[-1].choices[0].finish_reason == "length", text)
check("no usage chunk unless asked", all(c.usage is None for c in chunks))

chunks = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=3, stream=True,
                                             stream_options={"include_usage": True}))
check("include_usage", chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3, chunks[-1])

r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=4)
check("completions non-streaming", r.object == "text_completion" and len(r.choices[0].text.split()) == 4, r)
chunks = list(client.completions.create(model=model, prompt="Once upon a time", max_tokens=4, stream=True))
check("completions streaming", "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text)

r = client.chat.completions.create(model=model, messages=msgs, max_tokens=50, stop=[" the"], temperature=0.2)
check("stop and temperature accepted", r.choices[0].finish_reason in ("stop", "length"), r)

listed = list(client.models.list())
models = [m.id for m in listed]
check("models list", model in models, models)
# Nearpath's extra field (false while a model's nodes are all gone): the client keeps it.
check("models carry availability", all(getattr(m, "available", None) is True for m in listed), listed)

try:
    OpenAI(base_url=base, api_key="sk-wrong", max_retries=0).chat.completions.create(model=model, messages=msgs)
    check("401 bad key", False, "no error")
except openai.AuthenticationError as e:
    check("401 bad key", e.status_code == 401)

try:
    client.chat.completions.create(model="no-such-model", messages=msgs)
    check("404 unknown model", False, "no error")
except openai.NotFoundError as e:
    check("404 unknown model", e.status_code == 404 and e.code == "model_not_found", e)

try:
    client.chat.completions.create(model=model, messages=msgs, extra_headers={"X-Forwarded-For": denied_ip})
    check("403 geofence", False, "no error")
except openai.PermissionDeniedError as e:
    check("403 geofence", e.status_code == 403 and "sanctions" in str(e), e)

slow = OpenAI(base_url=base, api_key=slow_key, max_retries=0)
slow.chat.completions.create(model=model, messages=msgs, max_tokens=1)
try:
    slow.chat.completions.create(model=model, messages=msgs, max_tokens=1)
    check("429 rate limit", False, "no error")
except openai.RateLimitError as e:
    check("429 rate limit", e.status_code == 429 and e.response.headers.get("retry-after") is not None, e)

print("all checks passed")
