"""Chat completions from `meshlm serve` with the official `openai` client (the model's chat template).

Start the server (default model; add --tp 3 for three ranks under mpiexec):
    meshlm serve --port 8000
then run:
    python examples/openai_chat.py
"""
from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")  # the key matters with --api-key
model = client.models.list().data[0].id

messages = [
    {"role": "system", "content": "You are a helpful assistant. Answer in one sentence."},
    {"role": "user", "content": "What is the capital of France?"},
]
out = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=64, temperature=0)
answer = out.choices[0].message.content
print("assistant:", answer)
print("finish:", out.choices[0].finish_reason, "| usage:", out.usage)

# Continue the conversation; sample with a seed so the run is reproducible.
messages += [{"role": "assistant", "content": answer},
             {"role": "user", "content": "And of Italy?"}]
out = client.chat.completions.create(model=model, messages=messages, max_tokens=64, temperature=0.7, seed=3)
print("assistant:", out.choices[0].message.content)

# Log probabilities of the answer's tokens, with the three most likely tokens at each step.
out = client.chat.completions.create(model=model, messages=messages[:2], max_tokens=6, temperature=0,
                                     logprobs=True, top_logprobs=3)
for item in out.choices[0].logprobs.content:
    alternatives = [(t.token, round(t.logprob, 2)) for t in item.top_logprobs]
    print(f"{item.token!r:>12} {item.logprob:7.3f}  ", alternatives)

# Errors come back as OpenAI's exceptions.
try:
    client.chat.completions.create(model="no-such-model", messages=messages)
except Exception as exc:  # openai.BadRequestError
    print(type(exc).__name__, exc)
