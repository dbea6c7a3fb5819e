# pgwarden in a container: built in a Rust image, run in a small Debian one
# as a non-root user. The configuration and policies are mounted at
# /etc/pgwarden; the audit store lives in the volume /var/lib/pgwarden.
#
#   docker build -t pgwarden .
#   docker run -v $PWD/pgwarden.toml:/etc/pgwarden/pgwarden.toml:ro \
#              -v $PWD/policies:/etc/pgwarden/policies:ro \
#              -v pgwarden-audit:/var/lib/pgwarden \
#              -e PGWARDEN_SERVICE_PASSWORD=... -p 6432:6432 pgwarden

FROM rust:1.85-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY migrations migrations
COPY benches benches
COPY pgwarden.example.toml README.md ./
RUN cargo build --release --locked --bin pgwarden

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system pgwarden \
    && useradd --system --gid pgwarden --home-dir /var/lib/pgwarden --shell /usr/sbin/nologin pgwarden \
    && mkdir -p /etc/pgwarden/policies /var/lib/pgwarden \
    && chown pgwarden:pgwarden /var/lib/pgwarden
COPY --from=build /src/target/release/pgwarden /usr/bin/pgwarden
COPY packaging/pgwarden.toml /etc/pgwarden/pgwarden.toml
COPY packaging/policies/00-example.toml /etc/pgwarden/policies/00-example.toml
COPY migrations /usr/share/pgwarden/migrations
USER pgwarden
VOLUME /var/lib/pgwarden
EXPOSE 6432
ENTRYPOINT ["/usr/bin/pgwarden"]
CMD ["serve", "-c", "/etc/pgwarden/pgwarden.toml"]
