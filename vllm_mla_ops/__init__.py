"""vllm_mla_ops: the MLA query concat as a PyTorch custom op, ``torch.ops._C.concat_mla_q``.

Importing this package loads the compiled extension, which registers the op under ``_C`` for CPU
(and CUDA, when built with it). ``concat_mla_q`` below is the convenient form; ``vllm_mla_ops.ops``
holds the schema-order wrappers that model code calls.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ._loader import load_extension

load_extension(__name__, str(Path(__file__).resolve().parent))

from . import ops  # noqa: E402  (registers the fake implementations; needs the op loaded)

__all__ = ["concat_mla_q", "ops"]


def concat_mla_q(ql_nope: torch.Tensor, q_pe: torch.Tensor, q_out: torch.Tensor | None = None) -> torch.Tensor:
    """Writes ``[ql_nope | q_pe]`` along the last dim into ``q_out`` for MLA attention, bit-exact.

    Args:
        ql_nope: ``[tokens, heads, nope_dim]``, float16 or bfloat16, any strides.
        q_pe: ``[tokens, heads, rope_dim]``, or ``[tokens, 1, rope_dim]`` for one rope row shared by
            every head; ``ql_nope``'s dtype and device, any strides (0 too, from ``expand``).
        q_out: ``[tokens, heads, nope_dim + rope_dim]`` with ``ql_nope``'s dtype and device, any
            strides that address each element once, sharing no byte with the inputs. ``None``
            allocates a contiguous one.

    Returns:
        ``q_out``.

    Raises:
        RuntimeError: on any other dtype, rank, shape, device or overlap, before anything is written.
    """
    if q_out is None:
        shape = (0,)  # for ranks the op rejects: it then raises the rank error
        if ql_nope.dim() == 3 and q_pe.dim() == 3:
            shape = (ql_nope.shape[0], ql_nope.shape[1], ql_nope.shape[2] + q_pe.shape[2])
        q_out = ql_nope.new_empty(shape)
    ops.concat_mla_q(ql_nope, q_pe, q_out)
    return q_out
