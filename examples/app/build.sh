#!/bin/sh
# Builds app-<version>/: bin/app (the source with the installed packages, comments stripped
# for the "release" profile, traced with `set -x` for "debug") and BUILD (what went in).
set -eu
version=$(cat /data/params/version)
profile=$(cat /data/params/profile)
deps=/data/input/deps
out=/data/artifacts/app-$version
echo "building app $version ($profile) with $(wc -l < "$deps/installed.txt") packages"
mkdir -p "$out/bin"
{
    echo '#!/bin/sh'
    [ "$profile" = debug ] && echo 'set -x'
    echo 'APP_NAME=app'
    echo "APP_VERSION=$version"
    cat "$deps"/vendor/*.sh /src/main.sh
} | if [ "$profile" = release ]; then grep -v '^ *#[^!]'; else cat; fi > "$out/bin/app"
chmod 755 "$out/bin/app"
{
    echo "app $version"
    echo "profile: $profile"
    sed 's/^/package: /' "$deps/installed.txt"
} > "$out/BUILD"
echo "smoke test: $("$out/bin/app" mistry | tail -1)"
