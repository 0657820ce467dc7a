#!/usr/bin/env bash
# Renders one k8s/ overlay with kustomize, applies it, and waits until every loraplex worker is ready.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: deploy-all.sh [options]

Renders a k8s/ overlay (kubectl kustomize), applies it, and waits for the loraplex workers to become ready
(each loads the base model and every adapter once). The ollama-base, ollama-chatbot, ollama-code and
ollama-summarization Services keep their names and port, so applying over the old deployment switches its
clients to the workers.

Options:
  -o, --overlay NAME|DIR   gpu-2 (default: the old two-GPU layout), gpu-many, cpu, or a kustomization
                           directory of your own
  -i, --image REF          the worker image to run, e.g. registry.example.com/loraplex:0.1.0-cuda
  -n, --namespace NS       namespace the overlay deploys to (default: llama3-multi-adapter)
  --retire-old             first scale the old Ollama Deployments (label app.kubernetes.io/name=ollama)
                           to zero: their pods hold the GPUs the workers need
  --render                 print the rendered manifests and exit (needs no cluster)
  --dry-run                send everything to the API server with --dry-run=server; change nothing
  --timeout DURATION       how long to wait for the rollout (default: 30m: the model-load budget of
                           20 minutes, with workers replaced one at a time)
  -h, --help               show this help
USAGE
}

die() { echo "deploy-all.sh: $*" >&2; exit 2; }

k8s_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
overlay="gpu-2"
image=""
namespace="llama3-multi-adapter"
retire_old=false
render_only=false
dry_run=false
timeout="30m"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -o|--overlay) [[ $# -ge 2 ]] || die "$1 needs a value"; overlay="$2"; shift 2 ;;
    -i|--image) [[ $# -ge 2 ]] || die "$1 needs a value"; image="$2"; shift 2 ;;
    -n|--namespace) [[ $# -ge 2 ]] || die "$1 needs a value"; namespace="$2"; shift 2 ;;
    --retire-old) retire_old=true; shift ;;
    --render) render_only=true; shift ;;
    --dry-run) dry_run=true; shift ;;
    --timeout) [[ $# -ge 2 ]] || die "$1 needs a value"; timeout="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

command -v kubectl >/dev/null || die "kubectl is required"
if [[ -d "$overlay" ]]; then
  overlay_dir="$(cd "$overlay" && pwd)"
elif [[ -d "$k8s_dir/overlays/$overlay" ]]; then
  overlay_dir="$k8s_dir/overlays/$overlay"
else
  die "no overlay $overlay (see $k8s_dir/overlays)"
fi

workdir="$(mktemp -d)"
image_dir=""
cleanup() { rm -rf "$workdir" ${image_dir:+"$image_dir"}; }
trap cleanup EXIT

# --image: a throw-away kustomization on top of the overlay that only swaps the image, so the overlay's
# files stay as they are in git. It sits beside the overlay: kustomize takes relative paths only.
render() {
  local dir="$overlay_dir" name tag
  if [[ -n "$image" ]]; then
    dir="$(mktemp -d "$(dirname "$overlay_dir")/.image.XXXXXX")"
    image_dir="$dir"
    {
      echo "apiVersion: kustomize.config.k8s.io/v1beta1"
      echo "kind: Kustomization"
      echo "resources:"
      echo "  - ../$(basename "$overlay_dir")"
      echo "images:"
      echo "  - name: loraplex"
      if [[ "$image" == *@* ]]; then
        echo "    newName: ${image%@*}"
        echo "    digest: ${image#*@}"
      elif [[ "${image##*/}" == *:* ]]; then
        name="${image%:*}"
        tag="${image##*:}"
        echo "    newName: $name"
        echo "    newTag: \"$tag\""
      else
        echo "    newName: $image"
      fi
    } >"$dir/kustomization.yaml"
  fi
  kubectl kustomize "$dir"
}

render >"$workdir/manifests.yaml"
if $render_only; then
  cat "$workdir/manifests.yaml"
  exit 0
fi

echo "==> overlay $overlay_dir$([[ -n "$image" ]] && echo ", image $image")"
if $dry_run; then
  kubectl apply --dry-run=server -f "$workdir/manifests.yaml"
  exit 0
fi

if $retire_old && kubectl get namespace "$namespace" >/dev/null 2>&1; then
  echo "==> scaling the old Ollama Deployments in $namespace to 0"
  kubectl -n "$namespace" scale deployment -l app.kubernetes.io/name=ollama --replicas=0 || true
  # An old Service keeps selector keys that apply cannot see unless apply created it: recreate any that
  # still selects Ollama pods, so it selects the workers only.
  for name in base chatbot code summarization; do
    selects="$(kubectl -n "$namespace" get service "ollama-$name" --ignore-not-found \
      -o jsonpath='{.spec.selector.app\.kubernetes\.io/name}')"
    if [[ "$selects" == ollama ]]; then
      kubectl -n "$namespace" delete service "ollama-$name"
    fi
  done
fi

echo "==> applying"
kubectl apply -f "$workdir/manifests.yaml"

echo "==> waiting for the workers (model and adapters load once per worker)"
kubectl -n "$namespace" rollout status deployment/loraplex-worker --timeout="$timeout"

echo "==> ready"
kubectl -n "$namespace" get pods -l app.kubernetes.io/name=loraplex -o wide
kubectl -n "$namespace" get services
cat <<NEXT

Check every endpoint:   $k8s_dir/scripts/test-adapters.sh --port-forward -n $namespace
Watch the workers:      $k8s_dir/scripts/monitor.sh -n $namespace --watch 5
Undo this rollout:      $k8s_dir/scripts/rollback.sh -n $namespace
NEXT
