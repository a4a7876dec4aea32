#!/usr/bin/env bash
# Talk to `meshlm serve` with curl: completions, chat, and both streamed.
#
# Start the server in another terminal (default model, any --tp the model allows):
#     meshlm serve --port 8000                      # one rank
#     meshlm serve --port 8000 --tp 3               # three ranks, started under mpiexec for you
# then run:
#     bash examples/serve_curl.sh                   # or BASE=http://host:port bash ... / API_KEY=...
set -euo pipefail
BASE=${BASE:-http://127.0.0.1:8000}
AUTH=()
if [[ -n "${API_KEY:-}" ]]; then AUTH=(-H "Authorization: Bearer $API_KEY"); fi
post() { curl -sS "${AUTH[@]}" -H "Content-Type: application/json" "$BASE$1" -d "$2"; echo; }

echo "--- models"
curl -sS "${AUTH[@]}" "$BASE/v1/models"; echo

echo "--- completion"
post /v1/completions '{"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}'

echo "--- chat"
post /v1/chat/completions '{
  "messages": [{"role": "system", "content": "You are a concise assistant."},
               {"role": "user", "content": "Name three primary colours."}],
  "max_tokens": 48, "temperature": 0.7, "seed": 1}'

echo "--- streamed completion (server-sent events, ending with data: [DONE])"
curl -sS -N "${AUTH[@]}" -H "Content-Type: application/json" "$BASE/v1/completions" \
  -d '{"prompt": "Once upon a time", "max_tokens": 24, "stream": true}'

echo "--- streamed chat, with a final usage chunk"
curl -sS -N "${AUTH[@]}" -H "Content-Type: application/json" "$BASE/v1/chat/completions" \
  -d '{"messages": [{"role": "user", "content": "Say hello in French."}], "max_tokens": 24,
       "stream": true, "stream_options": {"include_usage": true}}'

echo "--- an error: OpenAI's envelope, HTTP 400"
post /v1/completions '{"prompt": "Hi", "temperature": -1}'

echo "--- health and Prometheus metrics (never need the key)"
curl -sS -o /dev/null -w "health: %{http_code}\n" "$BASE/health"
curl -sS "$BASE/metrics" | grep -E "^meshlm:(num_requests_\w+|kv_cache_usage_perc|generation_tokens_total)\{"
