#!/usr/bin/env bash
# Checks a loraplex deployment the way its clients see it: every endpoint answers, the three adapters answer
# differently from the base model, and how long each took.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: test-adapters.sh (--base-url URL | --endpoint NAME=URL ... | --port-forward) [options]

Sends one greedy Ollama /api/generate request to every endpoint, checks that each answers (HTTP 200, a
non-empty response), that every adapter's answer differs from the base model's (an identical greedy answer
means the adapter was not applied), and prints each endpoint's latency and generation speed.

Where to send the requests (pick one):
  --base-url URL        one URL where /<endpoint>/... reaches each endpoint: the Ingress
                        (http://ollama.local) or a worker's main listener
                        (kubectl port-forward svc/loraplex 11434:11434, then http://127.0.0.1:11434)
  --endpoint NAME=URL   the URL of one endpoint's own listener, as its ollama-NAME Service exposes it;
                        repeat for every endpoint
  --port-forward        port-forward svc/ollama-<name> for every endpoint (needs kubectl) and test those

Options:
  -n, --namespace NS    namespace for --port-forward (default: llama3-multi-adapter)
  --endpoints LIST      endpoints to test, comma-separated (default: base,chatbot,code,summarization)
  --baseline NAME       the endpoint without an adapter (default: base)
  --model NAME          model name to send (default: the endpoint's name with --base-url; "llama3", the
                        name the old single-model pods were called with, on per-endpoint URLs)
  --prompt TEXT         the prompt (default: a short question)
  --max-tokens N        tokens to generate per endpoint (default: 24)
  --timeout SECONDS     per request (default: 300)
  -h, --help            show this help

Exit status: 0 when every check passed, 1 when one failed, 2 on a usage error.
USAGE
}

die() { echo "test-adapters.sh: $*" >&2; exit 2; }

base_url=""
port_forward=false
namespace="llama3-multi-adapter"
endpoints="base,chatbot,code,summarization"
baseline="base"
model=""
prompt="In one sentence, what should I pack for a day at the beach?"
max_tokens=24
timeout=300
declare -A url_of=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --base-url) [[ $# -ge 2 ]] || die "$1 needs a value"; base_url="${2%/}"; shift 2 ;;
    --endpoint)
      [[ $# -ge 2 && "$2" == *=* ]] || die "--endpoint needs NAME=URL"
      url_of["${2%%=*}"]="${2#*=}"; shift 2 ;;
    --port-forward) port_forward=true; shift ;;
    -n|--namespace) [[ $# -ge 2 ]] || die "$1 needs a value"; namespace="$2"; shift 2 ;;
    --endpoints) [[ $# -ge 2 ]] || die "$1 needs a value"; endpoints="$2"; shift 2 ;;
    --baseline) [[ $# -ge 2 ]] || die "$1 needs a value"; baseline="$2"; shift 2 ;;
    --model) [[ $# -ge 2 ]] || die "$1 needs a value"; model="$2"; shift 2 ;;
    --prompt) [[ $# -ge 2 ]] || die "$1 needs a value"; prompt="$2"; shift 2 ;;
    --max-tokens) [[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || die "$1 needs a number"; max_tokens="$2"; shift 2 ;;
    --timeout) [[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || die "$1 needs a number"; timeout="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

IFS=, read -r -a names <<<"$endpoints"
modes=0
[[ -n "$base_url" ]] && modes=$((modes + 1))
[[ ${#url_of[@]} -gt 0 ]] && modes=$((modes + 1))
$port_forward && modes=$((modes + 1))
[[ $modes -eq 1 ]] || { usage >&2; die "give exactly one of --base-url, --endpoint, --port-forward"; }
for tool in curl python3; do
  command -v "$tool" >/dev/null || die "$tool is required"
done

workdir="$(mktemp -d)"
forward_pids=()
cleanup() {
  local pid
  for pid in "${forward_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$workdir"
}
trap cleanup EXIT

wait_for_health() {  # URL: up to 20 s for a port-forward to start answering
  local i
  for ((i = 0; i < 40; i++)); do
    curl -fsS --max-time 2 "$1/health" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  return 1
}

if $port_forward; then
  command -v kubectl >/dev/null || die "kubectl is required for --port-forward"
  local_port=18434
  for name in "${names[@]}"; do
    kubectl -n "$namespace" port-forward "svc/ollama-$name" "$local_port:11434" >"$workdir/pf-$name.log" 2>&1 &
    forward_pids+=("$!")
    url_of["$name"]="http://127.0.0.1:$local_port"
    local_port=$((local_port + 1))
  done
  for name in "${names[@]}"; do
    wait_for_health "${url_of[$name]}" || die "port-forward to svc/ollama-$name failed: $(cat "$workdir/pf-$name.log")"
  done
fi

# The URL and model name one endpoint is reached with.
target_url() {
  if [[ -n "$base_url" ]]; then echo "$base_url/$1"; else echo "${url_of[$1]:?no --endpoint given for $1}"; fi
}
target_model() {
  if [[ -n "$model" ]]; then echo "$model"; elif [[ -n "$base_url" ]]; then echo "$1"; else echo "llama3"; fi
}

request_body() {  # MODEL: the JSON body of one greedy, non-streaming generate request
  python3 -c 'import json, sys
print(json.dumps({"model": sys.argv[1], "prompt": sys.argv[2], "stream": False,
                  "options": {"temperature": 0, "seed": 0, "num_predict": int(sys.argv[3])}}))' \
    "$1" "$prompt" "$max_tokens"
}

# FIELD FILE: one field of a JSON response ("" when missing or not JSON).
json_field() {
  python3 -c 'import json, sys
try:
    value = json.load(open(sys.argv[2])).get(sys.argv[1], "")
except (ValueError, AttributeError):
    value = ""
print(value)' "$1" "$2"
}

failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

printf '%-14s %6s %10s %7s %8s  %s\n' ENDPOINT STATUS LATENCY TOKENS TOK/S ANSWER
for name in "${names[@]}"; do
  url="$(target_url "$name")"
  status_time="$(request_body "$(target_model "$name")" \
    | curl -sS -o "$workdir/$name.json" -w '%{http_code} %{time_total}' --max-time "$timeout" \
      -H 'Content-Type: application/json' --data-binary @- "$url/api/generate" 2>"$workdir/$name.err")" \
    || status_time="000 0"
  read -r status seconds <<<"$status_time"
  answer=""
  tokens=""
  speed=""
  if [[ "$status" == 200 ]]; then
    answer="$(json_field response "$workdir/$name.json")"
    tokens="$(json_field eval_count "$workdir/$name.json")"
    eval_ns="$(json_field eval_duration "$workdir/$name.json")"
    if [[ "$tokens" =~ ^[0-9]+$ && "$eval_ns" =~ ^[0-9]+$ && "$eval_ns" -gt 0 ]]; then
      speed="$(awk -v n="$tokens" -v ns="$eval_ns" 'BEGIN { printf "%.1f", n / (ns / 1e9) }')"
    fi
  fi
  printf '%s' "$answer" >"$workdir/$name.answer"
  latency_ms="$(awk -v s="$seconds" 'BEGIN { printf "%d ms", s * 1000 }')"
  short="$(printf '%s' "$answer" | tr '\n' ' ' | cut -c1-60)"
  printf '%-14s %6s %10s %7s %8s  %s\n' "$name" "$status" "$latency_ms" "${tokens:--}" "${speed:--}" "$short"
  if [[ "$status" != 200 ]]; then
    fail "$name: HTTP $status from $url/api/generate $(cat "$workdir/$name.err" "$workdir/$name.json" 2>/dev/null | head -c 300)"
  elif [[ -z "${answer//[[:space:]]/}" ]]; then
    fail "$name: empty response"
  fi
done

if [[ -f "$workdir/$baseline.answer" && -s "$workdir/$baseline.answer" ]]; then
  for name in "${names[@]}"; do
    [[ "$name" == "$baseline" || ! -s "$workdir/$name.answer" ]] && continue
    if cmp -s "$workdir/$name.answer" "$workdir/$baseline.answer"; then
      fail "$name answers exactly as $baseline: its adapter was not applied"
    fi
  done
elif [[ " ${names[*]} " == *" $baseline "* ]]; then
  fail "no answer from the baseline endpoint $baseline to compare the adapters with"
fi

if [[ $failures -gt 0 ]]; then
  echo "$failures check(s) failed"
  exit 1
fi
echo "all ${#names[@]} endpoints answered; every adapter differs from $baseline"
