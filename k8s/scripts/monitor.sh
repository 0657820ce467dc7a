#!/usr/bin/env bash
# One line per loraplex worker, read from its /metrics: queue depth, running requests, KV-cache usage,
# requests finished, tokens generated and the adapters resident in its LoRA slots.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: monitor.sh [options]

Prints one line per loraplex worker from its Prometheus /metrics: requests waiting (queue depth) and
running, KV-cache usage, requests finished, tokens generated, and the adapters resident in its LoRA slots.
By default it finds the workers with kubectl and reads each pod's /metrics through the API server's pod
proxy (no port-forward needed).

Options:
  -n, --namespace NS    namespace of the workers (default: llama3-multi-adapter)
  --url URL             read URL/metrics instead of the cluster's workers; repeat for several
                        (a port-forward, or a worker on this machine)
  -w, --watch SECONDS   refresh every SECONDS until interrupted (default: print once)
  -h, --help            show this help
USAGE
}

die() { echo "monitor.sh: $*" >&2; exit 2; }

namespace="llama3-multi-adapter"
watch=0
urls=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--namespace) [[ $# -ge 2 ]] || die "$1 needs a value"; namespace="$2"; shift 2 ;;
    --url) [[ $# -ge 2 ]] || die "$1 needs a value"; urls+=("${2%/}"); shift 2 ;;
    -w|--watch) [[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || die "$1 needs a number of seconds"; watch="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

worker_selector="app.kubernetes.io/name=loraplex,app.kubernetes.io/component=worker"

# Prometheus text on stdin -> one table row for WORKER.
summarize() {
  awk -v worker="$1" '
    /^#/ { next }
    {
      name = $1; sub(/\{.*/, "", name)
      value = $NF
    }
    name == "loraplex_num_requests_waiting" { waiting += value }
    name == "loraplex_num_requests_running" { running += value }
    name == "loraplex_kv_cache_usage_perc" { kv = value * 100 }
    name == "loraplex_kv_blocks_used" { blocks = value }
    name == "loraplex_requests_finished_total" { finished += value }
    name == "loraplex_generation_tokens_total" { tokens = value }
    name == "loraplex_adapter_resident" && value + 0 > 0 && match($0, /adapter="[^"]*"/) {
      adapter = substr($0, RSTART + 9, RLENGTH - 10)
      resident = resident (resident == "" ? "" : ",") adapter
    }
    name == "loraplex_lora_requests_info" && match($0, /max_lora="[^"]*"/) {
      max_lora = substr($0, RSTART + 10, RLENGTH - 11)
    }
    END {
      if (resident == "") resident = "-"
      if (max_lora != "") resident = resident " (max " max_lora ")"
      printf "%-40s %7d %7d %6.1f%% %9d %9d %11d  %s\n", worker, waiting, running, kv, blocks, finished, tokens, resident
    }'
}

header() {
  printf "%-40s %7s %7s %7s %9s %9s %11s  %s\n" \
    WORKER WAITING RUNNING KV KV_BLOCKS FINISHED GEN_TOKENS RESIDENT_ADAPTERS
}

# One table of every worker; a worker that does not answer gets a line saying so.
report() {
  local url pod metrics pods
  header
  if [[ ${#urls[@]} -gt 0 ]]; then
    for url in "${urls[@]}"; do
      if metrics="$(curl -fsS --max-time 10 "$url/metrics" 2>&1)"; then
        summarize "$url" <<<"$metrics"
      else
        printf "%-40s unreachable: %s\n" "$url" "$metrics"
      fi
    done
    return
  fi
  pods="$(kubectl -n "$namespace" get pods -l "$worker_selector" \
    -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')"
  [[ -n "$pods" ]] || { echo "no loraplex workers in namespace $namespace"; return; }
  while read -r pod; do
    if metrics="$(kubectl -n "$namespace" get --raw \
      "/api/v1/namespaces/$namespace/pods/$pod:11434/proxy/metrics" 2>&1)"; then
      summarize "$pod" <<<"$metrics"
    else
      printf "%-40s unreachable: %s\n" "$pod" "$metrics"
    fi
  done <<<"$pods"
}

if [[ ${#urls[@]} -eq 0 ]]; then
  command -v kubectl >/dev/null || die "kubectl is required (or give --url)"
fi
if [[ "$watch" -gt 0 ]]; then
  while true; do
    clear 2>/dev/null || true
    date
    report
    sleep "$watch"
  done
else
  report
fi
