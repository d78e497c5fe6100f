"""The one check every checkpoint tensor passes as it is read: a floating-point dtype r1c exports, every value
finite. A weight that is not (int32/uint8 tensors, NaN or inf from a broken conversion) would otherwise export
and build cleanly and then generate token 0 forever; it is refused with its name instead.

Per tensor, so that a streaming reader calls it on each tensor as it arrives (exporter/checkpoint.py calls it
where safetensors hands a tensor over). Cost: one pass over the tensor's bytes (FP8 checked as bytes: e4m3fn has
no inf, and its NaN is S.1111.111, i.e. byte & 0x7F == 0x7F; e8m0 scales' NaN is 0xFF).
"""

from __future__ import annotations

import torch

from r1c.errors import CheckpointError

WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e8m0fnu)
_E4M3FN_NAN = 0x7F  # e4m3fn: S.1111.111 is NaN, there is no inf
_E8M0_NAN = 0xFF  # e8m0fnu (ue8m0 block scales, `scale_fmt: ue8m0`): 0xFF is NaN, no sign, no inf


def check_weight(name: str, tensor: torch.Tensor, where: str) -> torch.Tensor:
    """`tensor` if it is a finite floating-point weight r1c exports; else CheckpointError naming `name`."""
    if tensor.dtype not in WEIGHT_DTYPES:
        kinds = ", ".join(str(d).removeprefix("torch.") for d in WEIGHT_DTYPES)
        raise CheckpointError(f"{where}: tensor {name} has dtype {str(tensor.dtype).removeprefix('torch.')}; r1c "
                              f"exports floating-point weights ({kinds})")
    if tensor.dtype == torch.float8_e4m3fn:
        bad = int(((tensor.view(torch.uint8) & _E4M3FN_NAN) == _E4M3FN_NAN).sum())
    elif tensor.dtype == torch.float8_e8m0fnu:
        bad = int((tensor.view(torch.uint8) == _E8M0_NAN).sum())
    else:
        bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise CheckpointError(f"{where}: tensor {name} holds {bad} non-finite value(s) (NaN or inf); the checkpoint "
                              "is broken (re-convert it)")
    return tensor
