"""Which requests the gateway forwards: the inference API only, unless the operator says more.

The gateway listens on every interface, in front of an engine whose own port also serves admin
routes (Triton's model repository, logging, shared memory and trace settings; the twin's GPU
clock lock). Forwarding every path would hand those to any client, so only the routes a client
of the inference API needs go through (reference/interfaces.md §1.6, §2, §3.3):

- Triton / KServe v2: POST `/v2/models/{m}[/versions/{v}]/generate|generate_stream|infer`;
  GET `/v2/models/{m}[/versions/{v}]` (metadata) and `.../ready`, `/v2/health/live|ready`, `/v2`;
- OpenAI-compatible (vLLM, trtllm-serve): POST `/v1/completions`, `/v1/chat/completions`; GET
  `/v1/models`, `/v1/models/{m}`, and the health routes `/health`, `/health_generate`, `/ping`,
  `/version`.

GET routes also answer HEAD. `THROTTLLEM_GATEWAY_ALLOW_PATHS` adds comma-separated glob patterns
(`fnmatch`, case-sensitive; `*` also matches `/`), e.g. `/v2/models/*/stats,/v1/embeddings`; a
path they match is forwarded with any method. Everything else is 403, a known path with a method
it does not take is 405. Paths are matched as sent (percent-encoded), and a path with a `.` or
`..` segment or an encoded `/`, is never forwarded: the engine could resolve it elsewhere.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from urllib.parse import unquote

_SEGMENT = r"[^/]+"
_MODEL = rf"/v2/models/{_SEGMENT}(?:/versions/{_SEGMENT})?"
_READ = frozenset({"GET", "HEAD"})
_POST = frozenset({"POST"})


class Verdict(enum.Enum):
    """What the gateway does with one method and path."""

    FORWARD = "forward"
    FORBIDDEN = "forbidden"  # 403: not part of the inference API
    WRONG_METHOD = "wrong_method"  # 405: a known path, another method


@dataclass(frozen=True, slots=True)
class _Rule:
    pattern: re.Pattern[str]
    methods: frozenset[str]


INFERENCE_API = (
    _Rule(re.compile(rf"{_MODEL}/(?:generate|generate_stream|infer)"), _POST),
    _Rule(re.compile(rf"{_MODEL}(?:/ready)?"), _READ),
    _Rule(re.compile(r"/v2(?:/health/(?:live|ready))?"), _READ),
    _Rule(re.compile(r"/v1/(?:chat/)?completions"), _POST),
    _Rule(re.compile(rf"/v1/models(?:/{_SEGMENT})?"), _READ),
    _Rule(re.compile(r"/(?:health|health_generate|ping|version)"), _READ),
)


class PathPolicy:
    """The inference API, plus the operator's extra patterns."""

    def __init__(self, extra_patterns: Iterable[str] = ()) -> None:
        self.extra_patterns = tuple(extra_patterns)

    def verdict(self, method: str, raw_path: str) -> Verdict:
        """Whether `method raw_path` may go to the engine."""
        if _has_ambiguous_segment(raw_path):
            return Verdict.FORBIDDEN
        if any(fnmatchcase(raw_path, pattern) for pattern in self.extra_patterns):
            return Verdict.FORWARD
        known = False
        for rule in INFERENCE_API:
            if rule.pattern.fullmatch(raw_path):
                if method in rule.methods:
                    return Verdict.FORWARD
                known = True
        return Verdict.WRONG_METHOD if known else Verdict.FORBIDDEN

    def allowed_methods(self, raw_path: str) -> list[str]:
        """The methods a known path takes, for a 405's Allow header."""
        methods = {m for rule in INFERENCE_API if rule.pattern.fullmatch(raw_path) for m in rule.methods}
        return sorted(methods)


def _has_ambiguous_segment(raw_path: str) -> bool:
    return any(unquote(segment) in (".", "..") or "/" in unquote(segment) for segment in raw_path.split("/"))
