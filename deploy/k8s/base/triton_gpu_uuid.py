"""Start `throttllem` on the GPU Triton runs on: find its UUID in Triton's metrics, then exec.

The device plugin tells only the container that requests `nvidia.com/gpu` (Triton) which GPU it
got, and the pod spec cannot name it in advance. Triton reports the GPUs it sees in the `gpu_uuid`
label of `nv_gpu_utilization` (reference/interfaces.md §8.2), so this waits for Triton's metrics
port (THROTTLLEM_ENGINE_METRICS_URL), sets THROTTLLEM_GPU_UUID to the one GPU listed, and replaces
itself with `throttllem <args>`. A UUID or index already set is used as is. Standard library only:
it runs in the sidecar image before the sidecar does.
"""

from __future__ import annotations

import os
import re
import sys
import time
import urllib.error
import urllib.request

DEFAULT_METRICS_URL = "http://127.0.0.1:8002/metrics"  # Triton's --metrics-port
RETRY_S = 2.0  # Triton loads its engine before the metrics list a GPU: minutes for large models
LOG_EVERY = 15  # attempts between "still waiting" lines
_GPU_SERIES = re.compile(r'^nv_gpu_utilization\{[^}]*\bgpu_uuid="(GPU-[^"]+)"', re.MULTILINE)


def gpu_uuids(exposition: str) -> list[str]:
    """The GPU UUIDs in one scrape of Triton's metrics, sorted, without repeats."""
    return sorted(set(_GPU_SERIES.findall(exposition)))


def scrape(url: str) -> str | None:
    """The metrics page, or None while Triton is not serving it."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode("utf-8", errors="replace"))
    except (urllib.error.URLError, OSError):
        return None


def wait_for_gpu(url: str) -> str:
    """Poll until Triton lists its GPUs; exit with a message unless it lists exactly one."""
    attempt = 0
    while True:
        page = scrape(url)
        found = gpu_uuids(page) if page is not None else []
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            sys.exit(
                f"triton_gpu_uuid: Triton at {url} sees {len(found)} GPUs ({', '.join(found)}); "
                "a sidecar steers one GPU: set THROTTLLEM_GPU_UUID"
            )
        if attempt % LOG_EVERY == 0:
            state = "not serving yet" if page is None else "lists no GPU yet (nv_gpu_utilization)"
            print(f"triton_gpu_uuid: waiting for Triton's GPU: {url} {state}", file=sys.stderr, flush=True)
        attempt += 1
        time.sleep(RETRY_S)


def main(args: list[str]) -> None:
    """Set THROTTLLEM_GPU_UUID if needed, then become `throttllem <args>`."""
    if not (os.environ.get("THROTTLLEM_GPU_UUID") or os.environ.get("THROTTLLEM_GPU_INDEX")):
        url = os.environ.get("THROTTLLEM_ENGINE_METRICS_URL") or DEFAULT_METRICS_URL
        uuid = wait_for_gpu(url)
        print(f"triton_gpu_uuid: Triton runs on {uuid}", file=sys.stderr, flush=True)
        os.environ["THROTTLLEM_GPU_UUID"] = uuid
    os.execvp("throttllem", ["throttllem", *args])


if __name__ == "__main__":
    main(sys.argv[1:])
