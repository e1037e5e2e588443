#!/bin/sh
# Installs the packages of /app/deps.lock into /data/artifacts/vendor/. Each package is fetched
# from the mirror once into the group's cache (/data/cache/packages); the group's next build
# starts from this one's data (an incremental build) and fetches only what is new.
set -eu
mkdir -p /data/cache/packages /data/artifacts
rm -rf /data/artifacts/vendor /data/artifacts/installed.txt /data/artifacts/report.txt
mkdir /data/artifacts/vendor
fetched=0 reused=0
while read -r name version; do
    case "$name" in '' | '#'*) continue ;; esac
    pkg="$name-$version.sh"
    if [ -f "/data/cache/packages/$pkg" ]; then
        echo "using $name $version (from the cache)"
        reused=$((reused + 1))
    else
        echo "fetching $name $version"
        cp "/mirror/$pkg" "/data/cache/packages/$pkg"
        fetched=$((fetched + 1))
    fi
    cp "/data/cache/packages/$pkg" "/data/artifacts/vendor/$name.sh"
    echo "$name $version" >> /data/artifacts/installed.txt
done < /app/deps.lock
echo "$fetched fetched, $reused from the cache" | tee /data/artifacts/report.txt
