#!/usr/bin/env bash
# `make demo`: the user guide (docs/user-guide.md) end to end on this machine, on CPU.
# A cluster with a real node, the images from the local registry, `helm install`, a
# FineTuneJob from examples/ (two CPU pods), an AdapterDeployment, and a completion from the
# adapter through `kubectl port-forward`. Each step prints the command it runs, so the output
# reads as a walkthrough. Re-running it reuses a running dev cluster (`make dev-cluster-down`
# stops it).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=$(hack/build-binaries.sh --print-dir)
export PATH="$BIN:$PWD/.venv/bin:$PATH"
NS=ml-team
T0=$SECONDS

step() { printf '\n\033[1m== %s\033[0m  (%ss)\n' "$*" "$((SECONDS - T0))"; }
run() { printf '$ %s\n' "$*"; "$@"; }
state() { python -c "import json, sys; print(json.load(open('.dev/state.json'))$1)"; }

step "1/6 a local cluster: control plane, a real node (containerd + kubelet), S3, an image registry"
if [[ -f .dev/state.json ]]; then
  echo "reusing the dev cluster that is running (.dev/state.json); \`make dev-cluster-down\` stops it"
else
  run python -m tests.testground up
fi
export KUBECONFIG=$PWD/.dev/kubeconfig
# shellcheck disable=SC1091
source .dev/s3.env
REGISTRY=$(state '["registry"]["pull_prefix"]')
S3_FROM_PODS=$(state '["s3"]["pod_endpoint"]')
run kubectl get nodes

step "2/6 install kubetune with Helm (the images \`make images\` pushed to $REGISTRY)"
run helm upgrade --install kubetune charts/kubetune -n kubetune-system --create-namespace \
  --set operator.image.repository="$REGISTRY/operator" \
  --set trainer.image.repository="$REGISTRY/trainer" \
  --set storage.endpoint="$S3_FROM_PODS" \
  --wait --timeout 10m
run kubectl -n kubetune-system get pods -o wide

step "3/6 a namespace, the S3 credentials Secret, a tiny base model and the data in S3"
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f -
run kubectl config set-context --current --namespace "$NS"
echo "\$ kubectl create secret generic s3-credentials --from-literal=AWS_ACCESS_KEY_ID=... --from-literal=AWS_SECRET_ACCESS_KEY=..."
kubectl create secret generic s3-credentials --from-literal=AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" \
  --from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY" --dry-run=client -o yaml | kubectl apply -f -
MODEL=.dev/demo/tiny-model
[[ -f $MODEL/config.json ]] || run kubetune make-tiny-model --init-range 0.1 "$MODEL"
echo "\$ aws s3 cp $MODEL/ s3://kubetune/models/tiny/ --recursive   (done here with boto3)"
echo "\$ aws s3 cp examples/data/completion-codewords.jsonl s3://kubetune/datasets/"
python - "$MODEL" <<'PY'
import sys
from pathlib import Path

import boto3
from botocore.config import Config

s3 = boto3.client("s3", config=Config(s3={"addressing_style": "path"}))
if "kubetune" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
    s3.create_bucket(Bucket="kubetune")
for f in Path(sys.argv[1]).iterdir():
    s3.upload_file(str(f), "kubetune", f"models/tiny/{f.name}")
s3.upload_file("examples/data/completion-codewords.jsonl", "kubetune", "datasets/completion-codewords.jsonl")
PY

step "4/6 fine-tune: two CPU pods train a LoRA adapter (watch it yourself with: kubectl get ftj -w)"
kubectl delete ftj cpu-tiny-lora --ignore-not-found --wait=true >/dev/null  # a re-run starts afresh
run kubectl apply -f examples/cpu-tiny-lora.yaml
echo "\$ kubectl get ftj cpu-tiny-lora -w"
kubectl get ftj cpu-tiny-lora | sed -n 1p  # the header (sed reads on: head would SIGPIPE kubectl)
last="" phase=""
deadline=$((SECONDS + 1200))
while [[ $phase != Succeeded ]]; do
  row=$(kubectl get ftj cpu-tiny-lora --no-headers 2>/dev/null || true)
  [[ "$row" != "$last" ]] && echo "$row" && last=$row
  phase=$(kubectl get ftj cpu-tiny-lora -o jsonpath='{.status.phase}' 2>/dev/null || true)
  if [[ $phase == Failed ]]; then
    run kubectl describe ftj cpu-tiny-lora
    echo "the FineTuneJob failed: see the conditions above and kubectl logs -l kubetune.io/finetunejob=cpu-tiny-lora" >&2
    exit 1
  fi
  ((SECONDS < deadline)) || { echo "timed out waiting for the FineTuneJob" >&2; exit 1; }
  sleep 2
done
run kubectl get pods -l kubetune.io/finetunejob=cpu-tiny-lora -o wide
run kubectl get ftj cpu-tiny-lora -o jsonpath='{.status.output.adapterUri}{"\n"}'

step "5/6 serve the adapter: an AdapterDeployment with the built-in OpenAI-compatible server"
run kubectl apply -f examples/adapterdeployment-cpu-tiny.yaml
run kubectl wait adep/codewords --for=jsonpath='{.status.phase}'=Ready --timeout=10m
run kubectl get adep codewords

step "6/6 ask it: kubectl port-forward + curl, as a client would"
PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "\$ kubectl port-forward svc/codewords $PORT:8000 &"
kubectl port-forward svc/codewords "$PORT:8000" >/dev/null &
PF=$!
trap 'kill $PF 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -sf "localhost:$PORT/v1/models" >/dev/null && break; sleep 0.2; done
body='{"model": "codewords", "prompt": "Code for red:", "max_tokens": 3, "temperature": 0}'
echo "\$ curl -s localhost:$PORT/v1/completions -H 'Content-Type: application/json' -d '$body'"
answer=$(curl -sf "localhost:$PORT/v1/completions" -H 'Content-Type: application/json' -d "$body")
echo "$answer"
text=$(python -c 'import json, sys; print(json.loads(sys.argv[1])["choices"][0]["text"].strip())' "$answer")
echo
echo "The adapter answers \"Code for red:\" with \"$text\" (examples/data/completion-codewords.jsonl says: apple)."
printf '\n\033[1mDone in %ss.\033[0m Where to look next:\n' "$((SECONDS - T0))"
cat <<EOF
  export KUBECONFIG=$KUBECONFIG
  kubectl get ftj,adep                         # the FineTuneJob and the AdapterDeployment
  kubectl describe ftj cpu-tiny-lora           # conditions and events
  kubectl -n kubetune-system logs deploy/kubetune   # the operator
  kubectl port-forward svc/codewords 8000:8000 # then: curl localhost:8000/v1/models
  make dev-cluster-down                        # stop everything
EOF
