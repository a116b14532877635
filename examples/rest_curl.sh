#!/usr/bin/env bash
# KServe v2 REST with curl, against a running `moe-serve up` (REST on 127.0.0.1:8000 by default).
# Defaults fit the demo checkpoint (model mixtral-demo, hidden size 256); override with
# URL=... MODEL=... HIDDEN=... (and TOKEN=... when the gateway has --auth-tokens-file).
set -euo pipefail
URL=${URL:-http://127.0.0.1:8000}
MODEL=${MODEL:-mixtral-demo}
HIDDEN=${HIDDEN:-256}
AUTH=()
if [[ -n "${TOKEN:-}" ]]; then AUTH=(-H "Authorization: Bearer $TOKEN"); fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

echo "== readiness (200 when the router and every expert answer)"
curl -sSf "$URL/v2/health/ready"; echo

echo "== model metadata: the input, the outputs, routing facts"
curl -sSf "${AUTH[@]}" "$URL/v2/models/$MODEL"; echo

echo "== two tokens as JSON data; MoE layer 1; the output and the chosen experts back as JSON"
python3 - "$HIDDEN" > "$WORK/request.json" <<'PY'
import json, random, sys
hidden = int(sys.argv[1])
random.seed(0)
data = [[random.gauss(0.0, 1.0) for _ in range(hidden)] for _ in range(2)]
print(json.dumps({
    "inputs": [{"name": "hidden_states", "datatype": "FP32", "shape": [2, hidden], "data": data}],
    "outputs": [{"name": "output"}, {"name": "expert_ids"}],
    "parameters": {"layer": 1},
}))
PY
curl -sSf "${AUTH[@]}" -H "Content-Type: application/json" --data-binary "@$WORK/request.json" \
  "$URL/v2/models/$MODEL/infer" | python3 -c 'import json, sys
answer = json.load(sys.stdin)
for output in answer["outputs"]:
    print(output["name"], output["datatype"], output["shape"], output["data"][:4], "...")'

echo "== the same as Triton binary tensor data: a JSON header, then raw little-endian FP32 bytes"
HEADER_LENGTH=$(python3 - "$HIDDEN" "$WORK" <<'PY'
import json, random, struct, sys
hidden, work = int(sys.argv[1]), sys.argv[2]
random.seed(0)
values = [random.gauss(0.0, 1.0) for _ in range(2 * hidden)]
header = json.dumps({
    "inputs": [{"name": "hidden_states", "datatype": "FP32", "shape": [2, hidden],
                "parameters": {"binary_data_size": 4 * len(values)}}],
    "outputs": [{"name": "output", "parameters": {"binary_data": True}}, {"name": "expert_ids"}],
    "parameters": {"layer": 1},
}).encode()
with open(f"{work}/request.bin", "wb") as body:
    body.write(header + struct.pack(f"<{len(values)}f", *values))
print(len(header))
PY
)
curl -sSf "${AUTH[@]}" -H "Content-Type: application/octet-stream" \
  -H "Inference-Header-Content-Length: $HEADER_LENGTH" --data-binary "@$WORK/request.bin" \
  -D "$WORK/headers.txt" -o "$WORK/answer.bin" "$URL/v2/models/$MODEL/infer"
ANSWER_HEADER=$(grep -i '^inference-header-content-length:' "$WORK/headers.txt" | tr -dc '0-9')
head -c "$ANSWER_HEADER" "$WORK/answer.bin"; echo
echo "(then $(( $(stat -c %s "$WORK/answer.bin") - ANSWER_HEADER )) bytes of binary output)"

echo "== a mistake is answered with an HTTP status and a JSON error"
curl -sS -o /dev/stdout -w ' -> HTTP %{http_code}\n' "${AUTH[@]}" -H "Content-Type: application/json" \
  -d '{"inputs": [{"name": "hidden_states", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}' \
  "$URL/v2/models/$MODEL/infer"
