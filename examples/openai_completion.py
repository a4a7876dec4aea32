"""Completions from `meshlm serve` with the official `openai` client.

Start the server (default model; add --tp 3 for three ranks under mpiexec):
    meshlm serve --port 8000
then run:
    python examples/openai_completion.py
"""
from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")  # the key matters with --api-key
model = client.models.list().data[0].id  # "SmolLM2-135M-Instruct" unless --served-model-name says otherwise

# One prompt, greedy.
out = client.completions.create(model=model, prompt="The capital of France is", max_tokens=16, temperature=0)
print(repr(out.choices[0].text), out.choices[0].finish_reason, out.usage)

# Several prompts in one request, two samples each, reproducible with a seed, cut at a stop string.
out = client.completions.create(model=model, prompt=["1, 2, 3,", "Roses are red,"], n=2, max_tokens=24,
                                temperature=0.8, seed=7, stop=["\n"])
for choice in out.choices:
    print(choice.index, repr(choice.text), choice.finish_reason)

# Token ids as the prompt ("The capital of France is"), and the logprobs of each generated token
# with its two best alternatives.
out = client.completions.create(model=model, prompt=[504, 3575, 282, 4649, 314], max_tokens=5,
                                temperature=0, logprobs=2)
lp = out.choices[0].logprobs
for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
    print(f"{token!r:>12} {logprob:7.3f}  {top}")

# vLLM's extra sampling fields travel in extra_body.
out = client.completions.create(model=model, prompt="A list of fruits:", max_tokens=32, temperature=0.7,
                                extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1})
print(repr(out.choices[0].text))
