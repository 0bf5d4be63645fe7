"""What the Kubernetes objects of a sized engine are called: shared by the backend and the settings."""

from __future__ import annotations

SIZE_LABEL = "throttllem.dev/tp"  # on every engine pod; the Service's selector names one value
DEFAULT_SERVICE = "triton-throttllem"
DEFAULT_DEPLOYMENT = "triton-throttllem-tp{size}"  # deploy/k8s/engines names them so


def deployment_name(size: int, pattern: str = DEFAULT_DEPLOYMENT) -> str:
    """The Deployment of engine size `size`: `pattern` with `{size}` filled in."""
    return pattern.format(size=size)
