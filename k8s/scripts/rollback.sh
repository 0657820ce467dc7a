#!/usr/bin/env bash
# Rolls the loraplex workers back to an earlier revision (image, config, resources) and waits for them.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: rollback.sh [options]

Rolls the loraplex-worker Deployment back to its previous revision, or to --to-revision N, and waits
until every worker is ready again. A revision carries the image, the resources and the ConfigMap it ran
with (the ConfigMap's name has a content hash, and earlier ones are kept), so a bad config rolls back too.
Workers are replaced one at a time; the others keep serving every endpoint meanwhile.

Options:
  -n, --namespace NS       namespace of the workers (default: llama3-multi-adapter)
  -r, --to-revision N      roll back to revision N (see --list; default: the previous revision)
  -l, --list               show the rollout history and exit
  --timeout DURATION       how long to wait for the workers (default: 30m)
  -h, --help               show this help
USAGE
}

die() { echo "rollback.sh: $*" >&2; exit 2; }

namespace="llama3-multi-adapter"
revision=""
list_only=false
timeout="30m"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--namespace) [[ $# -ge 2 ]] || die "$1 needs a value"; namespace="$2"; shift 2 ;;
    -r|--to-revision) [[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || die "$1 needs a revision number"; revision="$2"; shift 2 ;;
    -l|--list) list_only=true; shift ;;
    --timeout) [[ $# -ge 2 ]] || die "$1 needs a value"; timeout="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

command -v kubectl >/dev/null || die "kubectl is required"
deployment="deployment/loraplex-worker"

kubectl -n "$namespace" rollout history "$deployment"
$list_only && exit 0

undo_args=()
[[ -n "$revision" ]] && undo_args+=("--to-revision=$revision")
echo "==> rolling $deployment back${revision:+ to revision $revision}"
kubectl -n "$namespace" rollout undo "$deployment" "${undo_args[@]}"
kubectl -n "$namespace" rollout status "$deployment" --timeout="$timeout"
echo "==> rolled back; now running:"
kubectl -n "$namespace" get "$deployment" \
  -o jsonpath='{range .spec.template.spec.containers[*]}{.name}: {.image}{"\n"}{end}'
