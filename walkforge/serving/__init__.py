"""Serving: a compiled policy bundle behind openpi's websocket protocol (docs/design.md, "Layers").

- protocol: openpi's msgpack-numpy codec (byte-for-byte openpi-client's).
- observations: what the server checks before a request joins a batch; `--obs-map` files.
- batcher: cross-client micro-batching over the policy's one KV page pool.
- server: the websocket + `GET /healthz` front, SIGTERM drain.
- app: `walkforge serve` (local); ray_app: the Ray Serve deployment (`--ray`).
- client, loadtest: `walkforge client` and the throughput/latency tool.

Sits above runtimes: it uses only `walkforge.load` and the policy API.
"""
