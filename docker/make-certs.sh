#!/usr/bin/env bash
# Make a private CA, a worker (server) certificate and a client certificate with openssl, for
# weightrelay's TLS and mutual TLS. Usage: docker/make-certs.sh DIR [SERVER_NAME ...]
# The server certificate is valid for localhost, 127.0.0.1 and each SERVER_NAME (e.g. torch-worker
# keras-worker for compose, or the Kubernetes service names). Keys are unencrypted, mode 0600.
# The server certificate is also good for client authentication: a worker pulling weights from its
# peer presents it as its client certificate, which a peer with --tls-client-ca requires.
set -euo pipefail
dir="${1:?usage: $0 DIR [SERVER_NAME ...]}"
shift
mkdir -p "$dir"
cd "$dir"
umask 077
days="${WEIGHTRELAY_CERT_DAYS:-365}"
san="DNS:localhost,IP:127.0.0.1"
for name in "$@"; do san="$san,DNS:$name"; done

openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days "$days" -keyout ca.key -out ca.crt \
  -subj "/CN=weightrelay CA" -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

issue() {  # issue NAME CN EXTENSIONS
  openssl req -newkey rsa:2048 -nodes -sha256 -keyout "$1.key" -out "$1.csr" -subj "/CN=$2" 2>/dev/null
  printf '%s\n' "$3" > "$1.ext"
  openssl x509 -req -sha256 -days "$days" -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" -extfile "$1.ext" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
issue server weightrelay-worker "subjectAltName=$san
extendedKeyUsage=serverAuth,clientAuth"
issue client weightrelay-coordinator "extendedKeyUsage=clientAuth"
chmod 644 ca.crt server.crt client.crt
echo "made $dir: ca.crt ca.key server.crt server.key client.crt client.key (server names: $san)"
