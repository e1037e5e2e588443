FROM debian:bookworm

SHELL ["/bin/bash", "-c"]

RUN apt-get update && apt-get install -y git

WORKDIR /data

COPY docker-entrypoint.sh /
RUN chmod +x /docker-entrypoint.sh

ENTRYPOINT ["/docker-entrypoint.sh"]
