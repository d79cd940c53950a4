"""Load a running policy server: N clients × M requests, throughput and p50/p99 latency.

    python3 -m walkforge.serving.loadtest HOST:PORT --clients 4 --requests 20

Observations are random, built from the metadata the server sends on connect (its observation
spec), each with its own noise. Prints one JSON line: clients, requests, seconds, req/s,
p50/p99 ms, the batch sizes the server reported, and how many requests were refused.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np

from walkforge.serving import protocol


def random_observation(spec: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    obs: dict = {k: rng.integers(0, 256, (*spec["image_resolution"], 3), dtype=np.uint8)
                 for k in spec["cameras"]}
    obs[spec["state"]["key"]] = rng.standard_normal(spec["state"]["dim"]).astype(np.float32)
    obs["task"] = "pick"
    obs["noise"] = rng.standard_normal(spec["noise"]).astype(np.float32)
    return obs


def load(address: str, clients: int, requests: int) -> dict:
    from websockets.sync.client import connect

    latencies, sizes, refused = [], [], []
    barrier = threading.Barrier(clients + 1)

    def one(c: int) -> None:
        with connect(f"ws://{address}", compression=None, max_size=None) as ws:
            spec = protocol.unpackb(ws.recv())["observation_spec"]
            frames = [protocol.packb(random_observation(spec, 1000 * c + r)) for r in range(requests)]
            barrier.wait()
            for frame in frames:
                t0 = time.perf_counter()
                ws.send(frame)
                reply = ws.recv()
                latencies.append((time.perf_counter() - t0) * 1e3)
                if isinstance(reply, str):
                    refused.append(reply)
                else:
                    sizes.append(protocol.unpackb(reply)["server_timing"]["batch_size"])

    threads = [threading.Thread(target=one, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    p50, p99 = np.percentile(latencies, [50, 99])
    return {"clients": clients, "requests": clients * requests, "seconds": round(wall, 3),
            "req_per_s": round(clients * requests / wall, 2), "p50_ms": round(float(p50), 2),
            "p99_ms": round(float(p99), 2), "batch_sizes": sorted(set(sizes)), "refused": len(refused)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", help="HOST:PORT of `walkforge serve`")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--requests", type=int, default=20, help="per client")
    args = parser.parse_args()
    print(json.dumps(load(args.address, args.clients, args.requests)))


if __name__ == "__main__":
    main()
