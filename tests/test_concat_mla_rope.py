"""concat_mla_rope's tests: what only it promises, and the checks the other ops get from the
op-parametrized tests, made here for its arguments (a bool, optional and index tensors, two written
tensors). Every output bit-exact against vllm_mla_ops.testing.reference_rope on fresh random bit
patterns, for both pairings, both fp8 outputs, both cache dtypes, the engines' layouts and layouts
that take the one-element path; the nope half written by a bmm left alone; indices outside their
tensors never leading a read or write outside them; the checked mode; CUDA-graph replay reading
positions, slots and scales of the moment; every bad argument refused before any write, eagerly and
by the fake; the inference-only contract (grad mode refuses arguments that require grad and
inference outputs, and bumps both outputs' versions); math-bit and nested arguments; opcheck."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import vllm_mla_ops
from mla_helpers import assert_storages, opcheck, snapshot
from vllm_mla_ops.testing import (
    assert_equal_or_both_nan,
    assert_fp8_equal,
    bits,
    engine_inputs,
    quantize_kv_fp8,
    random_bits,
    reference_rope,
    shifted,
    strided_last_dim,
)

FP8 = torch.float8_e4m3fn
MAX_POSITION = 50


def _inputs(device, *, dtype=torch.bfloat16, tokens=5, heads=16, nope_dim=512, rope_dim=64, kv_dim=512,
            layout="decode", q_fp8=False, k_side="bf16", cos_sin_dtype=torch.float32, pe_heads=None,
            block_size=8) -> dict:
    """The op's arguments as a dict in schema order (is_neox left to the caller), every tensor made
    of fresh random bits except positions (valid unless changed), cos_sin_cache (random normals:
    random bits would make most results NaN) and slot_mapping (a random permutation of slots)."""
    if layout == "decode":
        ql_nope, q_pe, _ = engine_inputs("decode", tokens, heads, dtype, device, nope_dim=nope_dim, rope_dim=rope_dim)
    else:  # every-other-element ql_nope, q_pe one element off its alignment: one-element packs
        ql_nope = strided_last_dim(2, 1)((tokens, heads, nope_dim), dtype, device)
        q_pe = shifted(1, 3, 1)((tokens, heads, rope_dim), dtype, device)
    if pe_heads == 1:
        q_pe = random_bits((tokens, 1, rope_dim), dtype, device)
    args = dict(ql_nope=ql_nope, q_pe=q_pe,
                positions=torch.randint(0, MAX_POSITION, (tokens,), device=device),
                cos_sin_cache=torch.randn(MAX_POSITION, rope_dim, device=device).to(cos_sin_dtype),
                is_neox=False,
                q_out=random_bits((tokens, heads, nope_dim + rope_dim), FP8 if q_fp8 else dtype, device),
                q_scale=torch.tensor([0.37], device=device) if q_fp8 else None,
                kv_c=None, k_pe=None, kv_cache=None, slot_mapping=None, k_scale=None)
    if k_side != "none":
        latent = random_bits((tokens, kv_dim + rope_dim + 2), dtype, device)[:, 1:-1]  # views of one row
        blocks = tokens // block_size + 3
        args.update(kv_c=latent[:, :kv_dim], k_pe=latent[:, kv_dim:],
                    kv_cache=random_bits((blocks, block_size, kv_dim + rope_dim), FP8 if k_side == "fp8" else dtype,
                                         device),
                    slot_mapping=torch.randperm(blocks * block_size, device=device)[:tokens],
                    k_scale=torch.tensor([0.29], device=device) if k_side == "fp8" else None)
    return args


def _call(args: dict) -> None:
    with torch.inference_mode():
        torch.ops._C.concat_mla_rope(*args.values())


def _expected(args: dict) -> dict:
    a = dict(args)
    return reference_rope(a.pop("ql_nope").clone(), a.pop("q_pe"), a.pop("positions"), a.pop("cos_sin_cache"),
                          a.pop("is_neox"), a["q_scale"], a["kv_c"], a["k_pe"], a["kv_cache"], a["slot_mapping"],
                          a["k_scale"])


def _assert_outputs(args: dict, expected: dict) -> None:
    for name in expected:
        actual = args[name]
        compare = assert_fp8_equal if actual.dtype == FP8 else assert_equal_or_both_nan
        compare(actual, expected[name], name)


def _assert_writes_reference(args: dict) -> None:
    """The call writes exactly the reference into q_out (and the cache), and no other byte of any
    storage involved changes."""
    expected = _expected(args)
    tensors = [t for t in args.values() if isinstance(t, torch.Tensor)]
    written = [args[name] for name in expected]
    before = snapshot(*tensors)
    _call(args)
    _assert_outputs(args, expected)
    for t in written:  # outside the outputs' elements nothing may change
        for key, saved in before.items():
            if key[1] == t.untyped_storage().data_ptr():
                region = torch.empty(0, dtype=bits(t).dtype, device=t.device)
                region.set_(saved.untyped_storage(), t.storage_offset(), t.shape, t.stride())
                region.copy_(bits(t))
    assert_storages(before, tensors, "bytes outside the outputs' elements changed")


VARIANTS = list(itertools.product([torch.float16, torch.bfloat16], [False, True], [False, True],
                                  ["none", "bf16", "fp8"], [torch.float32, None]))


@pytest.mark.parametrize("dtype, is_neox, q_fp8, k_side, cos_sin_dtype", [
    pytest.param(*v, id=f"{str(v[0])[6:]}-{'neox' if v[1] else 'gptj'}-q{'fp8' if v[2] else 'half'}-k{v[3]}-"
                        f"cs{'f32' if v[4] else 'half'}") for v in VARIANTS])
def test_matches_reference_bit_for_bit(device, dtype, is_neox, q_fp8, k_side, cos_sin_dtype):
    """Every combination of dtype, pairing, fp8 query, K side (none, the inputs' dtype, fp8) and
    cos_sin_cache dtype, decode layout, random bits in every input: q_out and the whole cache equal
    reference_rope, and nothing else is written."""
    args = _inputs(device, dtype=dtype, q_fp8=q_fp8, k_side=k_side, cos_sin_dtype=cos_sin_dtype or dtype)
    args["is_neox"] = is_neox
    _assert_writes_reference(args)


@pytest.mark.parametrize("is_neox", [False, True], ids=["gptj", "neox"])
@pytest.mark.parametrize("case", [
    pytest.param(dict(layout="odd"), id="one-element-packs"),
    pytest.param(dict(layout="odd", nope_dim=7, rope_dim=6, kv_dim=5, q_fp8=True, k_side="fp8"), id="odd-widths-fp8"),
    pytest.param(dict(pe_heads=1), id="q_pe-one-head"),
    pytest.param(dict(nope_dim=256, rope_dim=32, kv_dim=256, heads=40), id="minicpm3-256+32x40h"),
    pytest.param(dict(tokens=3, heads=128), id="deepseek-v3-128h"),
    pytest.param(dict(tokens=2, heads=3, nope_dim=1100, kv_dim=2000), id="rows-wider-than-a-block"),
    pytest.param(dict(tokens=0), id="no-tokens"),
])
def test_layouts_match_reference(device, is_neox, case):
    """Layouts off the 16-byte packs (strided last dim, odd offsets and widths), a one-head q_pe,
    MiniCPM3's and DeepSeek-V3's geometries, rows wider than a CUDA block and no tokens at all."""
    args = _inputs(device, **case)
    args["is_neox"] = is_neox
    _assert_writes_reference(args)


# Scales at which x * (1 / scale) rounds to another e4m3fn value than x / scale for some bf16 or
# fp16 x (found by search; about one scale in 8,000 for bf16, one in 4,000 for fp16): dividing by the
# reciprocal alone fails at them.
RECIPROCAL_FAILS_AT = [-35735468.0, 8.458599864979988e-08, -772083482624.0, -4.6527837138654604e-11,
                       5.646551609039307, -28.261903762817383, -0.00041279042488895357]


def _division_scales() -> list[float]:
    """RECIPROCAL_FAILS_AT; the ends of the range the CUDA kernel divides through the reciprocal in
    (2^-64 and 2^64, one float32 step to either side); zeros, infinities, NaN, a subnormal scale, one
    whose reciprocal is subnormal, and plain ones."""
    edges = torch.tensor([2.0 ** -64, 2.0 ** 64])
    steps = [torch.nextafter(edges, torch.zeros(2)), edges, torch.nextafter(edges, torch.full((2,), float("inf")))]
    return RECIPROCAL_FAILS_AT + torch.cat(steps).tolist() + [
        0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, 2.0 ** 127, 0.29, 1.0, -1.0, 448.0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_fp8_cache_division_is_exact_for_every_input_bit_pattern(device, dtype):
    """kv_c holds every 16-bit pattern of the dtype once; for each scale of _division_scales the
    cache rows equal quantize_kv_fp8 (IEEE division, then the saturating cast; a NaN of either sign
    for NaN). That x * (1 / scale) differs from it at some RECIPROCAL_FAILS_AT scale is checked too,
    so a kernel that left out the division's correction would fail here."""
    args = _inputs(device, dtype=dtype, tokens=128, heads=1, nope_dim=8, k_side="fp8", block_size=64)
    patterns = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(128, 512)
    bits(args["kv_c"]).copy_(patterns)
    x = patterns.view(dtype).float()
    reciprocal_fails = False
    for scale in _division_scales():
        args["k_scale"].fill_(scale)
        _assert_writes_reference(args)
        if scale in RECIPROCAL_FAILS_AT:
            s = torch.tensor([scale])
            by_reciprocal, divided = bits((x * s.reciprocal()).clamp(-448, 448).to(FP8)), bits(quantize_kv_fp8(x, s))
            reciprocal_fails |= bool(((by_reciprocal != divided) & (divided & 0x7F != 0x7F)).any())
    assert reciprocal_fails


@pytest.mark.large
@pytest.mark.cuda
def test_tokens_past_the_grid_limit_match_reference():
    """70,000 tokens (more than a CUDA grid's 65,535 rows): every token written."""
    args = _inputs("cuda", tokens=70_000, heads=1, nope_dim=8, rope_dim=8, kv_dim=8, k_side="fp8")
    _assert_writes_reference(args)


def test_k_pe_three_dimensional_is_the_same_rows(device):
    """k_pe given as [tokens, 1, rope_dim] (vLLM's layout) writes what [tokens, rope_dim] writes."""
    args = _inputs(device)
    args["k_pe"] = args["k_pe"].unsqueeze(1)
    _assert_writes_reference(args)


@pytest.mark.parametrize("op", ["concat_mla_q", "concat_mla_rope"])
def test_nope_half_written_by_the_bmm_is_left_alone(device, op):
    """ql_nope = q_out[..., :nope_dim] (the bmm wrote it there): the op writes the rope half only,
    and the result is the reference of that ql_nope."""
    args = _inputs(device, k_side="none")
    q_out = args["q_out"]
    args["ql_nope"] = q_out[..., :512]
    ql_nope = q_out[..., :512].clone()
    if op == "concat_mla_q":
        with torch.inference_mode():
            torch.ops._C.concat_mla_q(args["ql_nope"], args["q_pe"], q_out)
        assert torch.equal(bits(q_out[..., :512]), bits(ql_nope))
        assert torch.equal(bits(q_out[..., 512:]), bits(args["q_pe"]))
    else:
        expected = reference_rope(ql_nope, args["q_pe"], args["positions"], args["cos_sin_cache"], False)
        _call(args)
        assert_equal_or_both_nan(q_out, expected["q_out"])


def test_other_overlap_with_the_nope_half_is_refused(device):
    """A ql_nope one element off q_out's nope half is an overlap, refused before any write."""
    args = _inputs(device, k_side="none")
    args["ql_nope"] = args["q_out"][..., 1:513]
    before = snapshot(args["q_out"])
    with pytest.raises(RuntimeError, match="concat_mla_rope: q_out must not overlap ql_nope in memory"):
        _call(args)
    assert_storages(before, [args["q_out"]], "a refused call wrote")


def _inside_guard_bands(t: torch.Tensor, band: int = 64) -> torch.Tensor:
    """t's values in a view of a buffer with `band` random elements before and after it."""
    flat = random_bits((t.numel() + 2 * band,), t.dtype, t.device)
    view = flat[band:band + t.numel()].view(t.shape)
    bits(view).copy_(bits(t))
    return view


def test_out_of_range_indices_stay_inside_the_tensors(device):
    """Positions below 0, at max_position and far past it turn their tokens by NaN; slots at the
    cache's end, far past it and negative write nothing; with every tensor inside guard bands no
    byte outside the outputs' elements changes, and every other token is exact."""
    args = _inputs(device, tokens=8, k_side="bf16")
    args["cos_sin_cache"] = _inside_guard_bands(args["cos_sin_cache"])
    args["kv_cache"] = _inside_guard_bands(args["kv_cache"])
    args["q_out"] = _inside_guard_bands(args["q_out"])
    slots = args["kv_cache"].shape[0] * args["kv_cache"].shape[1]
    args["positions"][:3] = torch.tensor([-1, MAX_POSITION, 2**62])
    args["slot_mapping"][3:6] = torch.tensor([slots, 2**62, -5])
    _assert_writes_reference(args)
    rope = args["q_out"][:3, :, 512:].float()
    assert bool(rope.isnan().all()), "an out-of-range position must turn its token by NaN"


def test_k_side_only_writes_the_slots_rows(device):
    """Cache rows no valid slot names keep their bytes (the reference leaves them as they were)."""
    args = _inputs(device, tokens=4)
    args["slot_mapping"] = torch.tensor([3, -1, 0, 17], device=device)
    _assert_writes_reference(args)


CHECKED_CASES = {
    "position-past": ([0, 1, 10, 3], [0, 1, 2, -1], "concat_mla_rope: positions[2] = 10 is outside [0, 10)"),
    "position-negative": ([0, 1, 2, -4], [0, 1, 2, -1], "concat_mla_rope: positions[3] = -4 is outside [0, 10)"),
    "slot-past": ([0, 1, 2, 3], [0, 8, 2, -1], "concat_mla_rope: slot_mapping[1] = 8 is outside [0, 8)"),
    "slot-repeated": ([0, 1, 2, 3], [5, 1, 5, -1], "concat_mla_rope: slot_mapping[2] = 5 repeats slot_mapping[0]"),
    "valid": ([0, 1, 2, 3], [5, 1, -1, -1], None),
}

# Runs every case in one child process (the variable is read once per process), printing one JSON
# line a case: the error message or "accepted", and whether any output byte changed.
CHECKED_MODE_SCRIPT = textwrap.dedent("""
    import json, sys, torch, vllm_mla_ops
    device, cases = sys.argv[1], json.loads(sys.argv[2])
    for name, (positions, slots, _) in cases.items():
        T = 4
        args = [torch.randn(T, 2, 8, dtype=torch.bfloat16, device=device),
                torch.randn(T, 2, 4, dtype=torch.bfloat16, device=device),
                torch.tensor(positions, device=device), torch.randn(10, 4, device=device), False,
                torch.zeros(T, 2, 12, dtype=torch.bfloat16, device=device), None,
                torch.randn(T, 8, dtype=torch.bfloat16, device=device),
                torch.randn(T, 4, dtype=torch.bfloat16, device=device),
                torch.zeros(2, 4, 12, dtype=torch.bfloat16, device=device), torch.tensor(slots, device=device), None]
        try:
            with torch.inference_mode():
                torch.ops._C.concat_mla_rope(*args)
            outcome = "accepted"
        except RuntimeError as error:
            outcome = str(error)
        print(json.dumps([name, outcome, bool(args[5].any()) or bool(args[9].any())]))
""")


@pytest.fixture(scope="module")
def checked_mode_outcomes(request):
    """{device: {case: (outcome, written)}} from one child process per device."""
    outcomes = {}

    def run(device):
        if device not in outcomes:
            env = dict(os.environ, VLLM_MLA_OPS_CHECK_INDICES="1")
            result = subprocess.run([sys.executable, "-c", CHECKED_MODE_SCRIPT, device, json.dumps(CHECKED_CASES)],
                                    env=env, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stderr
            outcomes[device] = {name: (outcome, written) for name, outcome, written in
                                map(json.loads, result.stdout.strip().splitlines())}
        return outcomes[device]

    return run


@pytest.mark.parametrize("case", list(CHECKED_CASES))
def test_checked_mode_refuses_bad_indices_before_writing(device, case, checked_mode_outcomes):
    """VLLM_MLA_OPS_CHECK_INDICES=1: the first position outside the cache, slot past it or slot
    written twice raises a message naming it, with nothing written; valid indices (negative slots
    included) are accepted and written."""
    outcome, written = checked_mode_outcomes(device)[case]
    message = CHECKED_CASES[case][2]
    if message is None:
        assert (outcome, written) == ("accepted", True)
    else:
        assert outcome.startswith(message) and outcome.endswith("found by VLLM_MLA_OPS_CHECK_INDICES=1"), outcome
        assert not written


@pytest.mark.cuda
@pytest.mark.parametrize("k_side", ["bf16", "fp8"])
def test_cuda_graph_replays_with_new_positions_slots_and_scales(k_side):
    """Captured once, replayed after new positions, slots and scales are copied into the captured
    tensors: each replay writes the reference of the values of the moment."""
    args = _inputs("cuda", tokens=6, heads=16, q_fp8=k_side == "fp8", k_side=k_side)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _call(args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _call(args)
    slots = args["kv_cache"].shape[0] * args["kv_cache"].shape[1]
    for _ in range(2):
        args["positions"].copy_(torch.randint(0, MAX_POSITION, args["positions"].shape, device="cuda"))
        args["slot_mapping"].copy_(torch.randperm(slots, device="cuda")[:6])
        for name in ("q_scale", "k_scale"):
            if args[name] is not None:
                args[name].copy_(torch.rand(1, device="cuda") + 0.1)
        bits(args["q_out"]).copy_(random_bits(args["q_out"].shape, bits(args["q_out"]).dtype, "cuda"))
        expected = _expected(args)
        graph.replay()
        torch.cuda.synchronize()
        _assert_outputs(args, expected)


def test_traced_with_dynamic_shapes_matches_reference(device):
    """torch.compile(fullgraph=True, dynamic=True, backend="aot_eager") of the Python function with
    the K side (the fake and functionalization of both outputs): one graph for two token counts,
    results equal to the reference."""
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, dynamic=True, backend="aot_eager")
    def prepare(ql_nope, q_pe, positions, cos_sin_cache, kv_c, k_pe, kv_cache, slot_mapping):
        return vllm_mla_ops.concat_mla_rope(ql_nope, q_pe, positions, cos_sin_cache, kv_c=kv_c, k_pe=k_pe,
                                            kv_cache=kv_cache, slot_mapping=slot_mapping)

    for tokens in (3, 7):
        args = _inputs(device, tokens=tokens, heads=4, nope_dim=16, rope_dim=8, kv_dim=16)
        expected = _expected(args)
        with torch.inference_mode():
            q_out = prepare(args["ql_nope"], args["q_pe"], args["positions"], args["cos_sin_cache"], args["kv_c"],
                            args["k_pe"], args["kv_cache"], args["slot_mapping"])
        assert_equal_or_both_nan(q_out, expected["q_out"])
        assert_equal_or_both_nan(args["kv_cache"], expected["kv_cache"], "kv_cache")
    torch._dynamo.reset()


@pytest.mark.parametrize("op", ["concat_mla_q", "concat_mla_rope"])
def test_nothing_left_to_write_is_a_no_op(device, op):
    """The nope half written in place and a rope width of 0 leaves rows of nothing to write (a CUDA
    launch of such rows once divided by zero on the host): the call returns, q_out as it was."""
    q_out = random_bits((3, 2, 8), torch.bfloat16, device)
    q_pe = random_bits((3, 2, 0), torch.bfloat16, device)
    before = snapshot(q_out)
    with torch.inference_mode():
        if op == "concat_mla_q":
            torch.ops._C.concat_mla_q(q_out[..., :8], q_pe, q_out)
        else:
            positions = torch.zeros(3, dtype=torch.int64, device=device)
            torch.ops._C.concat_mla_rope(q_out[..., :8], q_pe, positions, torch.randn(4, 0, device=device), False,
                                         q_out, None, None, None, None, None, None)
    if device == "cuda":
        torch.cuda.synchronize()
    assert_storages(before, [q_out], "a call with nothing to write wrote")


def _small(device) -> dict:
    return _inputs(device, tokens=3, heads=2, nope_dim=8, rope_dim=4, kv_dim=6)


def _refused(args: dict, message: str) -> None:
    """The raw op raises `message` and no byte of any tensor argument's storage changes."""
    tensors = [t for t in args.values() if isinstance(t, torch.Tensor)]
    before = snapshot(*tensors)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        torch.ops._C.concat_mla_rope(*args.values())
    assert_storages(before, tensors, "a refused call wrote")


# (what is changed, the message): every check of the validator that only concat_mla_rope makes,
# applied to valid small arguments with the K side.
REFUSALS = {
    "positions-int32": (lambda a: a.update(positions=a["positions"].int()),
                        "concat_mla_rope: positions must be torch.int64, got torch.int32"),
    "positions-2d": (lambda a: a.update(positions=a["positions"][:, None]),
                     "concat_mla_rope: positions must be 1-D [tokens], got 2-D with shape [3, 1]"),
    "positions-short": (lambda a: a.update(positions=a["positions"][:2]),
                        "concat_mla_rope: positions must be [tokens] with tokens=3 from ql_nope, got shape [2]"),
    "cos-sin-float64": (lambda a: a.update(cos_sin_cache=a["cos_sin_cache"].double()),
                        "concat_mla_rope: cos_sin_cache must be torch.float32 or have ql_nope's dtype torch.bfloat16, "
                        "got torch.float64"),
    "cos-sin-width": (lambda a: a.update(cos_sin_cache=a["cos_sin_cache"][:, :2]),
                      "concat_mla_rope: cos_sin_cache must be [max_position, rope_dim] with rope_dim=4 from q_pe"),
    "rope-dim-odd": (lambda a: a.update(q_pe=a["q_pe"][..., :3], q_out=a["q_out"][..., :11],
                                        cos_sin_cache=a["cos_sin_cache"][:, :3], k_pe=a["k_pe"][:, :3],
                                        kv_cache=a["kv_cache"][..., :9]),
                     "concat_mla_rope: rope_dim must be even (pairs rotated by one cos and one sin), got 3"),
    "q-out-float32": (lambda a: a.update(q_out=a["q_out"].float()),
                      "concat_mla_rope: q_out must have ql_nope's dtype torch.bfloat16 or be torch.float8_e4m3fn"),
    "fp8-q-out-without-scale": (lambda a: a.update(q_out=a["q_out"].to(FP8)),
                                "concat_mla_rope: q_out is torch.float8_e4m3fn, which needs q_scale"),
    "q-scale-without-fp8": (lambda a: a.update(q_scale=torch.ones(1, device=a["q_out"].device)),
                            "concat_mla_rope: q_scale is given, so q_out must be torch.float8_e4m3fn, got torch.bfloat16"),
    "k-side-incomplete": (lambda a: a.update(kv_cache=None),
                          "concat_mla_rope: the K side takes kv_c, k_pe, kv_cache and slot_mapping together, got only "
                          "kv_c, k_pe, slot_mapping"),
    "k-scale-without-k-side": (lambda a: a.update(kv_c=None, k_pe=None, kv_cache=None, slot_mapping=None,
                                                  k_scale=torch.ones(1, device=a["q_out"].device)),
                               "concat_mla_rope: k_scale is given without the K side"),
    "kv-c-short": (lambda a: a.update(kv_c=a["kv_c"][:2]),
                   "concat_mla_rope: kv_c must be [tokens, kv_dim] with tokens=3 from ql_nope, got shape [2, 6]"),
    "k-pe-two-heads": (lambda a: a.update(k_pe=a["k_pe"][:, None].expand(3, 2, 4)),
                       "concat_mla_rope: k_pe must be [tokens, rope_dim] or [tokens, 1, rope_dim]"),
    "kv-cache-width": (lambda a: a.update(kv_cache=a["kv_cache"][..., :9]),
                       "concat_mla_rope: kv_cache must be [num_blocks, block_size, kv_dim + rope_dim] with "
                       "kv_dim + rope_dim = 6 + 4"),
    "fp8-cache-without-scale": (lambda a: a.update(kv_cache=a["kv_cache"].to(FP8)),
                                "concat_mla_rope: kv_cache is torch.float8_e4m3fn, which needs k_scale"),
    "slot-mapping-int32": (lambda a: a.update(slot_mapping=a["slot_mapping"].int()),
                           "concat_mla_rope: slot_mapping must be torch.int64, got torch.int32"),
    "q-out-overlaps-kv-cache": (lambda a: a.update(q_out=a["kv_cache"].view(-1)[:72].view(3, 2, 12)),
                                "concat_mla_rope: q_out must not overlap kv_cache in memory"),
    "kv-cache-overlaps-cos-sin": (lambda a: a.update(cos_sin_cache=a["kv_cache"].view(-1)[:4 * 50].view(50, 4)),
                                  "concat_mla_rope: kv_cache must not overlap cos_sin_cache in memory"),
    "positions-none": (lambda a: a.update(positions=None), "concat_mla_rope: positions must be a tensor, got None"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_arguments_are_refused_before_any_write(device, case):
    """Each check only concat_mla_rope makes: the eager op raises its message and writes nothing."""
    args = _small(device)
    change, message = REFUSALS[case]
    change(args)
    with torch.inference_mode():
        _refused(args, message)


@pytest.mark.parametrize("case", [c for c in REFUSALS if "overlap" not in c])
def test_fake_refuses_with_the_same_message(case):
    """The fake (what torch.compile and torch.export trace) raises the eager message for every check
    that does not need addresses."""
    args = _small("cpu")
    REFUSALS[case][0](args)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        with pytest.raises(RuntimeError, match=re.escape(REFUSALS[case][1])):
            torch.ops._C.concat_mla_rope(*fake.values())


# ------------------------------------------------------------------ contracts shared with the other ops
# The other ops' versions of these are op-parametrized (test_inference_only.py, test_hostile.py,
# test_compile.py); concat_mla_rope's arguments (a bool, optional tensors, a second written tensor,
# index tensors) are built here instead.

INFERENCE_ONLY = "concat_mla_rope is inference-only (no autograd formula): got {arg} with requires_grad=True"
FLOAT_ARGS = ["ql_nope", "q_pe", "cos_sin_cache", "q_out", "kv_c", "k_pe", "kv_cache"]




@pytest.mark.parametrize("which", FLOAT_ARGS + ["q_scale", "k_scale"])
def test_grad_mode_refuses_an_argument_requiring_grad(device, which):
    """In grad mode any float argument that requires grad (fp8 scales included) is refused before
    any write; under no_grad and inference_mode the same call writes the reference."""
    fp8 = which.endswith("scale")
    args = _inputs(device, tokens=3, heads=2, nope_dim=8, rope_dim=4, kv_dim=6, q_fp8=fp8,
                   k_side="fp8" if fp8 else "bf16")
    args[which] = args[which].detach().requires_grad_()
    _refused(args, INFERENCE_ONLY.format(arg=which))
    for mode in (torch.no_grad, torch.inference_mode):
        expected = _expected(args)
        with mode():
            torch.ops._C.concat_mla_rope(*args.values())
        _assert_outputs(args, expected)


def test_grad_mode_call_bumps_both_written_versions(device):
    """Nothing requires grad: in grad mode the call is exact and counts as an in-place write of q_out
    and kv_cache (each version up by one, no other argument's); outside grad mode no version moves."""
    args = _inputs(device, tokens=3, heads=2, nope_dim=8, rope_dim=4, kv_dim=6)
    tensors = {name: t for name, t in args.items() if isinstance(t, torch.Tensor)}
    versions = {name: t._version for name, t in tensors.items()}
    expected = _expected(args)
    assert torch.is_grad_enabled()
    torch.ops._C.concat_mla_rope(*args.values())
    _assert_outputs(args, expected)
    assert {n: t._version for n, t in tensors.items()} == {
        n: v + (n in ("q_out", "kv_cache")) for n, v in versions.items()}
    with torch.no_grad():
        torch.ops._C.concat_mla_rope(*args.values())
    assert {n: t._version for n, t in tensors.items()} == {
        n: v + (n in ("q_out", "kv_cache")) for n, v in versions.items()}


@pytest.mark.parametrize("written", ["q_out", "kv_cache"])
def test_inference_output_refused_in_grad_mode_written_under_no_grad(device, written):
    """An output made under inference_mode: refused in grad mode (torch forbids writing one outside
    inference mode) before any write, written exactly under no_grad."""
    args = _inputs(device, tokens=3, heads=2, nope_dim=8, rope_dim=4, kv_dim=6)
    with torch.inference_mode():
        args[written] = args[written].clone()
    _refused(args, f"concat_mla_rope: {written} is an inference tensor (created under torch.inference_mode()) "
                   "and cannot be written outside inference mode")
    expected = _expected(args)
    with torch.no_grad():
        torch.ops._C.concat_mla_rope(*args.values())
    _assert_outputs(args, expected)


@pytest.mark.parametrize("written", ["q_out", "kv_cache"])
def test_output_with_the_negative_bit_is_refused(device, written):
    """An output that is a negative-bit view (torch._neg_view) is refused with the math-bit message
    in every mode, before any write."""
    args = _inputs(device, tokens=3, heads=2, nope_dim=8, rope_dim=4, kv_dim=6)
    args[written] = torch._neg_view(args[written])
    for mode in (torch.enable_grad, torch.no_grad, torch.inference_mode):
        with mode():
            _refused(args, f"concat_mla_rope: {written} must not carry the negative or conjugate bit")


def test_inputs_with_the_negative_bit_are_read_resolved(device):
    """Every float input as a negative-bit view: the outputs hold the reference of the resolved
    inputs, and the views' storages are left alone."""
    args = _inputs(device, tokens=3, heads=2, nope_dim=8, rope_dim=4, kv_dim=6)
    views = {n: torch._neg_view(t) if n in ("ql_nope", "q_pe", "cos_sin_cache", "kv_c", "k_pe") else t
             for n, t in args.items()}
    resolved = {n: t.resolve_neg() if isinstance(t, torch.Tensor) else t for n, t in views.items()}
    expected = _expected(resolved)
    inputs = [t for n, t in views.items() if isinstance(t, torch.Tensor) and n not in ("q_out", "kv_cache")]
    before = snapshot(*inputs)
    _call(views)
    _assert_outputs(views, expected)
    assert_storages(before, inputs, "an input's storage changed")


def test_nested_tensor_is_refused(device):
    """A nested tensor as ql_nope: the nested-tensor message, nothing written."""
    args = _inputs(device, tokens=3, heads=2, nope_dim=8, rope_dim=4, kv_dim=6)
    dense = [t for t in args.values() if isinstance(t, torch.Tensor)]
    args["ql_nope"] = torch.nested.nested_tensor(list(args["ql_nope"]), layout=torch.jagged)
    before = snapshot(*dense)
    with pytest.raises(RuntimeError, match="concat_mla_rope: nested tensors are not supported"):
        torch.ops._C.concat_mla_rope(*args.values())
    assert_storages(before, dense, "a refused call wrote")


@pytest.mark.parametrize("variant", ["q", "qk", "qk_fp8"])
def test_opcheck_runs_the_op(device, variant):
    """torch.library.opcheck's checks that run the op (schema: it writes only q_out and kv_cache;
    fake tensors; AOT dispatch with dynamic shapes), Q only, with the K side, and with fp8 outputs."""
    fp8 = variant.endswith("fp8")
    args = _inputs(device, tokens=5, heads=4, nope_dim=16, rope_dim=8, kv_dim=16, q_fp8=fp8,
                   k_side="none" if variant == "q" else "fp8" if fp8 else "bf16")
    for name in ("ql_nope", "q_pe", "kv_c", "k_pe"):  # finite values: opcheck compares with allclose
        if args[name] is not None:
            args[name] = args[name].clone().copy_(torch.randn(args[name].shape))
    opcheck(torch.ops._C.concat_mla_rope.default, tuple(args.values()),
            ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
