"""PTQD's program state saved with the model (registered in ``stepq.artifact.store.STATE_CODECS``).

``prog.state.ptqd`` (``PTQDStats``: k, b, σ_q, SNR^Q tables and the normality test) and
``prog.state.ptqd_bits`` (``MixedPrecision``: the bits table and the SNR curves it came from)
are stored as tensors in ``model.safetensors`` (``__state__.<key>.<name>``) with a small JSON entry
in the manifest, so a loaded model can rebuild ``PTQDScheduler`` and re-run the PTQD passes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from stepq.artifact.store import STATE_CODECS
from stepq.compiler.errors import ArtifactError
from stepq.methods.ptqd.mixed import MixedPrecision
from stepq.methods.ptqd.statistics import PTQDStats

__all__ = ["register_codecs"]

_FORMAT = 1


def _encode_stats(stats: PTQDStats) -> tuple[dict[str, Any], dict[str, Tensor]]:
    return {"format": _FORMAT}, stats.tensors()


def _decode_stats(j: Mapping[str, Any], ts: Mapping[str, Tensor]) -> PTQDStats:
    if j.get("format") != _FORMAT:
        raise ArtifactError(f"PTQD statistics of format {j.get('format')!r} are not supported (expected {_FORMAT})")
    try:
        return PTQDStats.from_tensors(ts)
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"malformed PTQD statistics: {type(e).__name__}: {e}") from None


def _encode_bits(mp: MixedPrecision) -> tuple[dict[str, Any], dict[str, Tensor]]:
    return ({"format": _FORMAT, "bits": list(mp.bits), "margin": mp.margin},
            {"table": mp.table, "snr_q": mp.snr_q, "snr_f": mp.snr_f, "visited": mp.visited})


def _decode_bits(j: Mapping[str, Any], ts: Mapping[str, Tensor]) -> MixedPrecision:
    if j.get("format") != _FORMAT:
        raise ArtifactError(f"PTQD bit schedule of format {j.get('format')!r} is not supported (expected {_FORMAT})")
    try:
        return MixedPrecision(bits=tuple(int(b) for b in j["bits"]), table=ts["table"], snr_q=ts["snr_q"],
                              snr_f=ts["snr_f"], visited=ts["visited"], margin=float(j.get("margin", 1.0)))
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"malformed PTQD bit schedule: {type(e).__name__}: {e}") from None


def register_codecs() -> None:
    """Register both codecs (idempotent)."""
    STATE_CODECS["ptqd"] = (_encode_stats, _decode_stats)
    STATE_CODECS["ptqd_bits"] = (_encode_bits, _decode_bits)
