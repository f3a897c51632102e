#!/usr/bin/env bash
# Test certificates for moe_serve's TLS and mutual TLS: a private CA, one certificate for the
# servers (master and workers; it doubles as the master's client certificate under mutual
# TLS) and one for clients. For tests and trials only: production certificates come from
# your own CA (cert-manager, Vault, ...).
#
#   scripts/gen_test_certs.sh OUT_DIR [NAME ...]
#
# NAMEs (DNS names or IP addresses) are added to the server certificate's subjectAltName,
# besides localhost, 127.0.0.1 and ::1: list every host name the workers and the master are
# dialled by (e.g. worker-0 worker-1 master, or 10.0.0.11).
# Writes OUT_DIR/{ca,server,client}.{pem,key}; keys are EC P-256, mode 0600; valid 30 days.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 OUT_DIR [NAME ...]" >&2
  exit 2
fi
out=$1
shift
mkdir -p "$out"
umask 077

san="DNS:localhost,IP:127.0.0.1,IP:::1"
for name in "$@"; do
  if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then
    san+=",IP:$name"
  else
    san+=",DNS:$name"
  fi
done

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key "$out/ca.key"
openssl req -x509 -new -key "$out/ca.key" -sha256 -days 30 -subj "/CN=moe-serve test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out "$out/ca.pem"

# sign NAME SUBJECT EXTENSIONS: a key and a certificate signed by the CA.
sign() {
  key "$out/$1.key"
  openssl req -new -key "$out/$1.key" -subj "$2" -out "$out/$1.csr"
  openssl x509 -req -in "$out/$1.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" \
    -CAcreateserial -days 30 -sha256 -extfile <(printf '%s\n' "$3") -out "$out/$1.pem" 2>/dev/null
  rm -f "$out/$1.csr"
}

sign server "/CN=moe-serve server" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$san"
sign client "/CN=moe-serve client" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
rm -f "$out/ca.srl"
chmod 0644 "$out"/*.pem
echo "wrote $out/ca.pem, server.pem/.key, client.pem/.key (server names: $san)"
