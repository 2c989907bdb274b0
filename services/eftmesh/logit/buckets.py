"""Which steps a logit service runs static-shaped and captured (--cuda-graphs, --cuda-graph-*,
--torch-compile), and the padded (batch, query, context) buckets those steps come in.

Pure configuration and arithmetic: no torch, no gRPC. The runner (runner.py) pads each step to
its buckets; the flags (server.py) build the config.
"""

from __future__ import annotations

from dataclasses import dataclass

GRAPH_MODES = ("auto", "off", "static")


@dataclass(frozen=True)
class GraphConfig:
    """Which steps run static-shaped, and captured (flags --cuda-graphs and --cuda-graph-*).

    mode: "auto" captures CUDA graphs when the model is on one CUDA device, and runs eagerly
    otherwise (on a CPU the padding of static shapes costs more than the dispatch it saves);
    "off" always runs eagerly; "static" runs the static path without capturing (what CI
    checks on the CPU, and a way to tell a capture problem from a shape problem).
    """

    mode: str = "auto"
    max_batch: int = 32  # largest captured batch bucket
    max_query: int = 8  # largest captured query length (decode 1; a verify of k drafts k + 1)
    max_context: int = 4096  # largest captured context bucket (tokens gathered per row)
    # --torch-compile: the static forward compiled by torch.compile (inductor) at warm-up, on a
    # CPU as on a GPU (where it is then captured). Off by default, as SGLang's
    # --enable-torch-compile: it costs minutes of start-up per model on a small CPU.
    compile: bool = False

    def __post_init__(self) -> None:
        if self.mode not in GRAPH_MODES:
            raise ValueError(f"--cuda-graphs must be one of {', '.join(GRAPH_MODES)}, got {self.mode!r}")
        if self.compile and self.mode == "off":
            raise ValueError("--torch-compile compiles the static-shaped steps, which --cuda-graphs off turns off: "
                             "use --cuda-graphs auto (or static)")
        for name in ("max_batch", "max_query", "max_context"):
            if getattr(self, name) < 1:
                raise ValueError(f"--cuda-graph-{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


def batch_buckets(max_batch: int) -> list[int]:
    """vLLM's capture sizes: 1, 2, 4, 8, then multiples of 8, up to max_batch (included)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return sorted(set(sizes + [max_batch]))


def pow2_buckets(limit: int, lowest: int = 1) -> list[int]:
    """lowest, 2 * lowest, ... below `limit`, then `limit`."""
    out, b = [], lowest
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


def bucket_for(n: int, buckets: list[int]) -> int | None:
    """The smallest bucket >= n; None when n exceeds them all."""
    return next((b for b in buckets if b >= n), None)
