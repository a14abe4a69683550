"""``ActQuant``: how a W4A4 linear quantizes its input activation (the weight's format is in its QTensor)."""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ActQuant:
    """Activation quantization of a W4A4 linear: the format comes from the weight's QTensor.

    ``global_scale`` is NVFP4's static fp32 per-tensor activation scale (from calibration; ignored for INT, whose
    scales are dynamic per token per group). ``hadamard`` rotates the activation by the block-diagonal Hadamard of the
    group size inside the quantize step (PermuQuant-H / rotation baselines; the weight was rotated offline).
    ``smooth`` (SmoothQuant) is a per-input-channel factor applied to the activation before it is quantized (the
    weight rows carry the inverse); XLA fuses the multiply into the producer.
    """

    global_scale: jax.Array
    smooth: Optional[jax.Array] = None
    hadamard: bool = dataclasses.field(default=False, metadata=dict(static=True))
