# The agent as a container image, built without pulling anything from a registry: from
# scratch, holding the binary and the shared libraries it links, nothing else.
#
# Build context: a directory laid out as the image's root. From the repository root:
#   cargo build --release --locked -p sidecar-agent
#   ctx=$(mktemp -d)
#   install -D target/release/sidecar-agent "$ctx/usr/local/bin/sidecar-agent"
#   for lib in $(ldd target/release/sidecar-agent | grep -o '/[^ ]*'); do
#       install -D "$lib" "$ctx$lib"
#   done
#   docker build -f config/agent.Dockerfile -t sidecar-agent "$ctx"
#
# Run it with the host's network and PID namespaces (it reaches each labeled
# container's namespace through /proc), the Docker socket, the TUN device, and three
# capabilities instead of --privileged, and a writable /proc/sys (README, "The agent
# as a container"):
#   docker run -d --name sidecar-agent --restart unless-stopped \
#     --network host --pid host \
#     --cap-drop ALL --cap-add NET_ADMIN --cap-add SYS_ADMIN --cap-add SYS_PTRACE \
#     --security-opt systempaths=unconfined --device /dev/net/tun \
#     -v /var/run/docker.sock:/var/run/docker.sock \
#     -v sidecar-agent:/var/lib/sidecar-agent \
#     --env-file /etc/sidecar/agent.env \
#     sidecar-agent

FROM scratch
COPY . /
VOLUME /var/lib/sidecar-agent
# Ready when the agent's /readyz (served on loopback, so reachable with --network host)
# answers 200.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
    CMD ["/usr/local/bin/sidecar-agent", "health"]
ENTRYPOINT ["/usr/local/bin/sidecar-agent"]
CMD ["run"]
