#!/bin/sh
# Makes a self-signed certificate for local/staging use of the nginx container:
#   nginx/certs/fullchain.pem and nginx/certs/privkey.pem (the key never leaves this machine: the
#   folder is git-ignored). Production uses the university's certificate in the same two files.
# Usage: nginx/make-dev-cert.sh [hostname]   (default: localhost)
set -eu
host="${1:-localhost}"
dir="$(cd "$(dirname "$0")" && pwd)/certs"
mkdir -p "$dir"
umask 077
openssl req -x509 -newkey rsa:2048 -sha256 -days 365 -nodes \
    -keyout "$dir/privkey.pem" -out "$dir/fullchain.pem" \
    -subj "/CN=$host" -addext "subjectAltName=DNS:$host,DNS:localhost,IP:127.0.0.1"
chmod 644 "$dir/fullchain.pem"
echo "wrote $dir/fullchain.pem and $dir/privkey.pem (self-signed for $host, valid 365 days)"
