#!/bin/sh
# A tiny "build": writes an artifact derived from the job's params and keeps a cache across
# builds of a group, the way `yarn install` or `bundle install` jobs use mistry.
set -eu
mkdir -p /data/artifacts /data/cache
name=world
[ -f /data/params/name ] && name=$(cat /data/params/name)
count=$(( $(cat /data/cache/count 2>/dev/null || echo 0) + 1 ))
echo "$count" > /data/cache/count
echo "hello, $name (build $count on $(hostname), as $(id -un))" | tee /data/artifacts/greeting.txt
