"""The official `openai` Python client through an inference redirect between two gateways.

Run by tests/tests/infer_redirect.rs, which starts gateway A (`inference_route = "redirect"`),
gateway B holding the only node, and passes:
  NEARPATH_BASE_URL   A's API, e.g. http://127.0.0.1:PORT/v1
  NEARPATH_PEER_URL   B's API
  NEARPATH_API_KEY    a key with generous limits
  NEARPATH_MODEL      the model B's node serves
  NEARPATH_CLIENT_IP  the address the client claims through a trusted proxy header
The client follows A's 307 (dropping its Authorization, as it does across origins); the ticket
in the URL admits the request at B. Prints one line per check; exits non-zero on a failure.
"""
import os
import sys

from openai import OpenAI

base = os.environ["NEARPATH_BASE_URL"]
peer = os.environ["NEARPATH_PEER_URL"]
model = os.environ["NEARPATH_MODEL"]
client = OpenAI(
    base_url=base,
    api_key=os.environ["NEARPATH_API_KEY"],
    max_retries=0,
    timeout=20,
    default_headers={"x-forwarded-for": os.environ["NEARPATH_CLIENT_IP"]},
)
msgs = [{"role": "user", "content": "Tell me about edge gateways"}]


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}")
        sys.exit(1)
    print(f"ok   {name}")


raw = client.chat.completions.with_raw_response.create(model=model, messages=msgs, max_tokens=5)
r = raw.parse()
final = str(raw.http_response.url)
check("non-streaming answered by the peer", final.startswith(peer) and "nearpath_ticket=" in final, final)
check("non-streaming completion", r.object == "chat.completion"
      and len(r.choices[0].message.content.split()) == 5, r)
hops = [str(h.url) for h in raw.http_response.history]
check("one redirect, from the first gateway", len(hops) == 1 and hops[0].startswith(base), hops)

with client.chat.completions.with_streaming_response.create(
        model=model, messages=msgs, max_tokens=5, stream=True) as resp:
    final = str(resp.http_response.url)
    chunks = list(resp.parse())
check("streaming answered by the peer", final.startswith(peer), final)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check("streaming tokens", len(text.split()) == 5, text)
print("all checks passed")
