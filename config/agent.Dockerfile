# The agent as a container. Build from the repository root:
#   docker build -f config/agent.Dockerfile -t sidecar-agent .
# Run it with the host's network and PID namespaces (it creates a TUN device inside
# each labeled container's namespace) and the Docker socket:
#   docker run -d --name sidecar-agent --restart unless-stopped \
#     --privileged --network host --pid host \
#     -v /var/run/docker.sock:/var/run/docker.sock \
#     -v sidecar-agent:/var/lib/sidecar-agent \
#     -e SIDECAR_RELAY=https://relay.example:8443 \
#     -e SIDECAR_TOKEN=sct_live_... \
#     -e SIDECAR_PIN='sha256//...' \
#     sidecar-agent

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p sidecar-agent

FROM debian:bookworm-slim
COPY --from=build /src/target/release/sidecar-agent /usr/local/bin/sidecar-agent
VOLUME /var/lib/sidecar-agent
ENTRYPOINT ["/usr/local/bin/sidecar-agent"]
CMD ["run"]
