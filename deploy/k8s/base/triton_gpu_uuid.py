"""Start `throttllem` on the GPUs Triton runs on: find their UUIDs in Triton's metrics, then exec.

The device plugin tells only the container that requests `nvidia.com/gpu` (Triton) which GPUs it
got, and the pod spec cannot name them in advance. Triton reports the GPUs it sees in the
`gpu_uuid` label of `nv_gpu_utilization` (reference/interfaces.md §8.2), so this waits for
Triton's metrics port (THROTTLLEM_ENGINE_METRICS_URL), sets THROTTLLEM_GPU_UUIDS to every GPU
listed (a TP-N engine lists N, and one sidecar steers them all) and replaces itself with
`throttllem <args>`. GPUs already selected (THROTTLLEM_GPU_UUIDS, _UUID or _INDEX) are used as
they are. Standard library only: it runs in the sidecar image before the sidecar does.
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
SELECTORS = ("GPU_UUIDS", "GPU_UUID", "GPU_INDEX")  # THROTTLLEM_* variables that select GPUs
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


def wait_for_gpus(url: str) -> list[str]:
    """Poll until Triton lists its GPUs; all of them (the sidecar checks there are THROTTLLEM_TP)."""
    attempt = 0
    while True:
        page = scrape(url)
        found = gpu_uuids(page) if page is not None else []
        if found:
            return found
        if attempt % LOG_EVERY == 0:
            state = "not serving yet" if page is None else "lists no GPU yet (nv_gpu_utilization)"
            print(f"triton_gpu_uuid: waiting for Triton's GPU: {url} {state}", file=sys.stderr, flush=True)
        attempt += 1
        time.sleep(RETRY_S)


def main(args: list[str]) -> None:
    """Set THROTTLLEM_GPU_UUIDS if no GPU is selected yet, then become `throttllem <args>`."""
    if not any(os.environ.get(f"THROTTLLEM_{name}") for name in SELECTORS):
        url = os.environ.get("THROTTLLEM_ENGINE_METRICS_URL") or DEFAULT_METRICS_URL
        uuids = wait_for_gpus(url)
        print(f"triton_gpu_uuid: Triton runs on {', '.join(uuids)}", file=sys.stderr, flush=True)
        os.environ["THROTTLLEM_GPU_UUIDS"] = ",".join(uuids)
    os.execvp("throttllem", ["throttllem", *args])


if __name__ == "__main__":
    main(sys.argv[1:])
