#!/bin/sh
# Writes what the job ran as and the tool versions of the image; keeps a counter in the cache.
set -eu
mkdir -p /data/artifacts /data/cache
count=$(( $(cat /data/cache/count 2>/dev/null || echo 0) + 1 ))
echo "$count" > /data/cache/count
{
    echo "user: $(id -un) ($(id -u))"
    echo "python: $(python3 -c 'import sys; print(sys.version.split()[0])')"
    echo "node: $(node --version)"
    echo "build: $count"
} | tee /data/artifacts/about.txt
