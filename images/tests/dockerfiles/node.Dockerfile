from node:20-alpine
arg uid=1000
env HOME /home/node
run mkdir -p $HOME/app && chown -R node:node $HOME
workdir $HOME/app
copy --chown=node:node --chmod=644 package.json yarn.lock ./
user node
run yarn install --frozen-lockfile
add https://example.com/config.tar.gz /tmp/
add vendor.tar.gz /opt/
onbuild COPY . /home/node/app
shell ["/bin/ash", "-eo", "pipefail", "-c"]
cmd ["node", "server.js"]
