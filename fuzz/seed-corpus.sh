#!/usr/bin/env bash
# Seeds the fuzz corpus from the golden vectors (protocol/tests/vectors/*.hex: `#` lines are
# comments, the rest is the hex of one frame), so every frame type is in the corpus from the start:
#   corpus/decoder/vector-NAME          each client frame, whole (header and body)
#   corpus/decoder/vector-all-client    every client frame back to back, as one stream
#   corpus/client_bodies/vector-NAME    a client frame's type code (2 bytes) and body
#   corpus/server_bodies/vector-NAME    a server frame's type code (2 bytes) and body
# Run it again after adding a vector; existing files are overwritten, nothing else is touched.
# Needs xxd.
set -euo pipefail
cd "$(dirname "$0")"

vectors=../protocol/tests/vectors
mkdir -p corpus/decoder corpus/client_bodies corpus/server_bodies
frame=$(mktemp)
stream=$(mktemp)
trap 'rm -f "$frame" "$stream"' EXIT

for hex in "$vectors"/*.hex; do
    name=$(basename "$hex" .hex)
    grep -v '^#' "$hex" | xxd -r -p >"$frame"
    # Header: length (4 bytes), type (2), request id (4); then the body.
    type_hi=$(od -An -tu1 -j4 -N1 "$frame" | tr -d ' ')
    if [ "$type_hi" -lt 128 ]; then
        dir=client_bodies
        cp "$frame" "corpus/decoder/vector-$name"
        cat "$frame" >>"$stream"
    else
        dir=server_bodies
    fi
    { tail -c +5 "$frame" | head -c 2; tail -c +11 "$frame"; } >"corpus/$dir/vector-$name"
done
cp "$stream" corpus/decoder/vector-all-client
echo "seeded: $(ls corpus/decoder | wc -l) decoder, $(ls corpus/client_bodies | wc -l) client_bodies, $(ls corpus/server_bodies | wc -l) server_bodies"
