"""Cost model: small pure functions of a DeviceSpec. Units: seconds and bytes.

Collectives follow the ring model as nccl-tests defines bus bandwidth (n ranks, B bytes of the
full tensor, latency alpha, per-direction link bandwidth beta):

    all_reduce                        alpha + 2 (n-1)/n * B / beta
    all_gather, reduce_scatter        alpha +   (n-1)/n * B / beta
    slice (Replicate -> Shard)        0 (local)

A calibrated spec may give a collective two bandwidth regimes (``DeviceSpec.link_model``):
a tensor of B >= K bytes (the knee) moves at beta_above instead of beta. Gloo on CPU needs
it: glibc serves every buffer of 32 MiB or more (DistComm's clone, the gathered output) with
a fresh mmap whose pages fault in on first touch, 2-5x slower (see runtime/calibrate.py).

Compute is a roofline per rank on the op's local shapes, for the ops registered with a
``flops`` fact: matmuls, attention and embeddings (elementwise ops are assumed fused into
their producer and cost nothing):
    t = max(flops_local / peak_flops(dtype), bytes_local / memory_bandwidth)
Training counts the backward as 2x the forward compute and adds the conjugate collective of
every transition (see ``transition``).

Memory per rank (``memory_bytes``) is the persistent state plus activations:
    training   per trained parameter: its bytes + its gradient's (same dtype) + optimizer
               state (``optimizer_bytes`` per element, default 8: Adam's two fp32 moments);
               a frozen parameter only its bytes (``state_bytes``)
               + the values autograd keeps for the backward: every op on the gradient path
                 (views excepted, ``saves_inputs``) keeps its inputs as it consumes them,
                 one copy per (value, placement) however many ops read it
    inference  parameter bytes + the largest working set of one op (its inputs and output,
               ``working_bytes``)
    FSDP       across ``dp`` replicas (``fsdp_state_bytes``): 1/dp of each piece, its
               gradient and optimizer state, plus the gathered piece and gradient while its
               unit runs: every layer of a stack is a unit (two alive at a time), the rest
               one root unit
all at local sizes: a value split n ways counts 1/n (the largest rank's share when uneven), a
Partial value counts whole. Activations are what make Megatron's sequence parallelism pay:
norms and residual adds on a sequence-split value keep 1/n of their inputs (the all-gathered
copy a column-parallel matmul reads is kept whole).

Uneven splits (torch.chunk sizes, see core/placements.py) are costed at the largest rank, which sets
the step time and the memory that must fit: compute and parameter bytes scale by the largest
local fraction (``shard_fraction``) instead of 1/n, and an all-gather or reduce-scatter moves
n pieces padded to the largest (``pad_factor``).
See docs/cost_model.md for the derivations.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from autotp.core.options import ADAM_FP32_BYTES, MODES  # noqa: F401  (cost.MODES: the same two)
from autotp.cost.devices import DeviceSpec
from autotp.core.placements import Partial, Placement, Replicate, Shard, local_size, local_slices
from autotp.rules import Strategy, elementwise_flops, op_info

# optimizer state per trained parameter element: Adam's exp_avg and exp_avg_sq in fp32
BACKWARD_COMPUTE_FACTOR = 2.0


def _ring(kind: str, coef: float, nbytes: float, n: int, spec: DeviceSpec) -> float:
    if n == 1:
        return 0.0
    alpha, beta, knee, beta_above = spec.link_model(kind)
    return alpha + coef * (n - 1) / n * nbytes / (beta if nbytes < knee else beta_above)


def all_reduce_time(nbytes: float, n: int, spec: DeviceSpec) -> float:
    return _ring("all_reduce", 2.0, nbytes, n, spec)


def all_gather_time(nbytes: float, n: int, spec: DeviceSpec) -> float:
    return _ring("all_gather", 1.0, nbytes, n, spec)


def reduce_scatter_time(nbytes: float, n: int, spec: DeviceSpec) -> float:
    return _ring("reduce_scatter", 1.0, nbytes, n, spec)


_TIME = {"all_reduce": all_reduce_time, "all_gather": all_gather_time,
         "reduce_scatter": reduce_scatter_time,
         "slice": lambda b, n, s: 0.0}


def convert_ops(src: Placement, dst: Placement, size: int | None = None,
                n: int | None = None) -> tuple[str, ...] | None:
    """The steps that turn a value placed ``src`` into ``dst``; None when impossible
    (nothing turns a whole value into a Partial one without changing it). ``size`` (the
    value's size along the shard dim) and ``n`` (ranks) let a Shard -> Shard whose target
    piece lies inside the source piece on every rank be a local slice (a query split
    ``S(1)`` out of key/value heads held ``S(1,rep=k)``, core/placements.py)."""
    if src == dst:
        return ()
    if isinstance(dst, Partial):
        return None
    if isinstance(src, Replicate):
        return ("slice",)
    if isinstance(src, Partial):
        if isinstance(dst, Replicate):
            return ("all_reduce",)
        # pieces shared by several ranks have no reduce-scatter: reduce all, keep the piece
        return ("all_reduce", "slice") if dst.rep is not None else ("reduce_scatter",)
    if isinstance(dst, Replicate):
        return ("all_gather",)
    if size is not None and n is not None and \
            all(local_slices(src, dst, size, r, n) is not None for r in range(n)):
        return ("slice",)
    return ("all_gather", "slice")


def _dim_size(a: Placement, b: Placement, shape: tuple | None) -> int | None:
    """The static size of the dim both ``a`` and ``b`` split, when they split the same one."""
    if shape is None or not (isinstance(a, Shard) and isinstance(b, Shard)) or a.dim != b.dim:
        return None
    s = shape[a.dim % len(shape)]
    return s if isinstance(s, int) else None


def dual(p: Placement) -> Placement:
    """The placement a value's gradient must have: Shard -> same Shard, else Replicate."""
    return p if isinstance(p, Shard) else Replicate()


@dataclass(frozen=True)
class Transition:
    """A producer placed P feeding a consumer that needs Q and sends back a grad placed G."""

    forward: tuple[str, ...]
    backward: tuple[str, ...]


def transition(p: Placement, q: Placement, g: Placement | None, is_param: bool = False,
               is_state: bool = False, shape: tuple | None = None,
               n: int | None = None) -> Transition | None:
    """Forward p -> q and backward g -> dual(p); ``g`` None: the value has no gradient.
    ``is_state``: the value is a buffer the program writes in place (a KV cache); it is read
    only where it lives (p == q), since an op writing a redistributed copy would write nothing.
    ``shape`` and ``n``: the value's global shape and the ranks (a nested Shard -> Shard is a
    local slice, ``convert_ops``)."""
    if is_state and p != q:
        return None
    fwd = convert_ops(p, q, _dim_size(p, q, shape), n)
    bwd = () if g is None else convert_ops(g, dual(p), _dim_size(g, dual(p), shape), n)
    if fwd is None or bwd is None:
        return None
    if is_param and isinstance(p, Shard) and p != q:
        return None  # gathering a split weight every step is FSDP's job, not a TP plan's
    return Transition(fwd, bwd)


def shard_fraction(p: Placement, shape: tuple[int, ...], n: int) -> float:
    """The largest rank's share of a tensor placed ``p`` (1/n when even, 1 when not split)."""
    if not isinstance(p, Shard) or not shape:
        return 1.0
    size = shape[p.dim % len(shape)]
    return local_size(p, size, n, 0) / size if size else 1.0


def pad_factor(placements: tuple[Placement, ...], shape: tuple[int, ...], n: int) -> float:
    """How much larger than the tensor an all-gather / reduce-scatter among ``placements``
    moves: pieces are padded to the largest rank's (1.0 when every split is even)."""
    return max([1.0] + [n * shard_fraction(p, shape, n) for p in placements if isinstance(p, Shard)])


def ops_time(ops: tuple[str, ...], nbytes: float, n: int, spec: DeviceSpec, pad: float = 1.0) -> float:
    return sum(_TIME[k](nbytes * (1.0 if k == "all_reduce" else pad), n, spec) for k in ops)


def transition_time(t: Transition, nbytes: float, n: int, spec: DeviceSpec, mode: str,
                    pad: float = 1.0) -> float:
    fwd = ops_time(t.forward, nbytes, n, spec, pad)
    return fwd + (ops_time(t.backward, nbytes, n, spec, pad) if mode == "training" else 0.0)


def op_flops(target: object, ins: tuple, outs: tuple) -> float:
    """Global forward FLOPs of one op: its registry ``flops`` fact (matmuls and attention
    exactly), else 1 per output element."""
    flops = op_info(target).flops or elementwise_flops
    return flops(ins, outs)


def compute_time(target: object, ins: tuple, outs: tuple, strategy: Strategy, n: int,
                 spec: DeviceSpec, mode: str, flops: float | None = None) -> float:
    """Roofline time of one op on one rank. Compute ops are those registered with a ``flops``
    fact (rules/: matmuls, attention, embedding), or whose FLOPs the node knows (``flops``:
    an einsum's, from its equation). Elementwise and normalization ops (no FLOPs fact, not a
    view) are taken as fused into their producer on a device with ``fused_elementwise`` (as
    torch.compile does), so they cost nothing there and a plan never pays a collective to save
    an elementwise pass; without it (eager CPU: cpu-gloo, a calibrated spec) each is one pass
    over its inputs and output at ``memory_bandwidth`` (one more in the backward), so a
    value every rank holds whole costs every rank its whole pass. Views cost nothing."""
    info = op_info(target)
    elementwise = info.flops is None and flops is None
    if not outs or (elementwise and (spec.fused_elementwise or info.view)):
        return 0.0
    # the slowest rank sets the time: the largest local share of any split tensor
    fracs = [shard_fraction(p, m.shape, n)
             for p, m in zip((*strategy.inputs, *strategy.outputs()), (*ins, *outs))
             if m is not None and isinstance(p, Shard)]
    frac = max(fracs) if fracs else 1.0
    nbytes = (sum(m.nbytes for m in ins) + sum(m.nbytes for m in outs if m is not None)) * frac
    if elementwise:  # an unfused pass over memory
        return nbytes / spec.memory_bandwidth * (2.0 if mode == "training" else 1.0)
    flops = (flops if flops is not None else info.flops(ins, outs)) * frac
    dtype = outs[0].dtype if outs[0] is not None else torch.float32
    t = max(flops / spec.peak_flops(dtype), nbytes / spec.memory_bandwidth)
    return t * (1 + BACKWARD_COMPUTE_FACTOR if mode == "training" else 1.0)


# DDP's default gradient bucket (``bucket_cap_mb=25``): its all-reduces start per bucket
DDP_BUCKET_BYTES = 25 * 2 ** 20


def inter_link(spec: DeviceSpec) -> tuple[float, float]:
    """(latency, bandwidth) across nodes; the intra-node link's when the spec gives none."""
    return spec.inter_latency or spec.latency, spec.inter_link_bandwidth or spec.link_bandwidth


def dp_grad_sync_time(local_bytes: float, dp: int, spec: DeviceSpec) -> float:
    """DDP across ``dp`` replicas (usually across nodes): a parameter's local gradient in one
    ring all-reduce per step over the inter-node link, ``2 (dp-1)/dp * bytes / beta``, and its
    share of a latency per 25 MiB bucket (DDP all-reduces buckets, not parameters; the step's
    first latency is ``dp_step_latency``). A split weight syncs 1/n of the bytes a
    replicated one does."""
    if dp <= 1:
        return 0.0
    alpha, beta = inter_link(spec)
    return alpha * local_bytes / DDP_BUCKET_BYTES + 2.0 * (dp - 1) / dp * local_bytes / beta


def fsdp_sync_time(local_bytes: float, dp: int, spec: DeviceSpec, trained: bool, regather: bool) -> float:
    """FSDP2 (``fully_shard``) across ``dp`` replicas: per step the parameter's local piece in
    an all-gather before its unit runs, again before its backward when the unit was freed after
    forward (``regather``: every layer of a stack is a unit of its own, rewrite/units.py; the
    root unit, holding the rest, stays gathered from forward to backward, as torch keeps a root
    unit), and, when it is trained, its gradient in a reduce-scatter after its backward; each
    ``(dp-1)/dp * bytes / beta`` over the inter-node link, plus FSDP's copy-out of a gathered
    buffer and copy-in of the gradient (a read and a write of the piece each, at memory
    bandwidth). The units' latencies are ``dp_step_latency``'s. Not overlapped with compute."""
    if dp <= 1:
        return 0.0
    _, beta = inter_link(spec)
    one = (dp - 1) / dp * local_bytes / beta + 2.0 * local_bytes / spec.memory_bandwidth
    return one * (1.0 + (1.0 if regather else 0.0) + (1.0 if trained else 0.0))


def dp_step_latency(dp_mode: str, dp: int, spec: DeviceSpec, layer_units: int = 0) -> float:
    """The latency a training step pays for data parallelism whatever the plan: DDP's first
    bucket all-reduce; FSDP's root all-gather and reduce-scatter, and each layer unit's two
    all-gathers and reduce-scatter."""
    if dp <= 1:
        return 0.0
    alpha = inter_link(spec)[0]
    return alpha * (2.0 + 3.0 * layer_units) if dp_mode == "fsdp" else alpha


def fsdp_state_bytes(param_bytes: float, element_size: int, mode: str, trained: bool, dp: int,
                     optimizer_bytes: float = ADAM_FP32_BYTES, gathered: float = 1.0) -> float:
    """Peak persistent memory of one parameter's local piece under FSDP2 across ``dp`` replicas:
    its 1/dp shard (and in training its gradient's 1/dp shard and 1/dp of the optimizer state),
    plus the gathered piece (and in training its gathered gradient, until the reduce-scatter)
    for the fraction ``gathered`` of the step's peak it is alive: 1 in the root unit; 2/L for a
    layer of a stack of L (a layer and the next one FSDP prefetches)."""
    if dp <= 1:
        return state_bytes(param_bytes, element_size, mode, trained, optimizer_bytes)
    shard = param_bytes / dp
    if mode != "training" or not trained:
        return shard + param_bytes * gathered
    return shard * (2.0 + optimizer_bytes / element_size) + 2.0 * param_bytes * gathered


def local_bytes(meta, p: Placement, n: int) -> float:
    """Bytes of a value placed ``p`` on the rank holding the most of it."""
    return meta.nbytes * shard_fraction(p, meta.shape, n)


def saves_inputs(target: object, tensor_inputs: int) -> bool:
    """Whether an op on the gradient path keeps its inputs for the backward: not views, sums,
    casts or concatenations, nor a product with a Python number (``x * 0.5``); the registry's
    ``view`` and ``keeps`` facts (rules/) say which."""
    return op_info(target).saves_inputs(tensor_inputs)


def working_bytes(ins: tuple, outs: tuple, strategy: Strategy, n: int) -> float:
    """Inference activation memory while one op runs: its inputs as it needs them, and its
    outputs."""
    return sum(local_bytes(m, p, n) for m, p in zip((*ins, *outs), (*strategy.inputs, *strategy.outputs()))
               if m is not None)


def state_bytes(param_bytes: float, element_size: int, mode: str, trained: bool,
                optimizer_bytes: float = ADAM_FP32_BYTES) -> float:
    """Persistent memory of one parameter's local piece: the parameter, and in training (when
    it is trained) its gradient and optimizer state."""
    if mode != "training" or not trained:
        return param_bytes
    return param_bytes * (2.0 + optimizer_bytes / element_size)


def param_bytes(nbytes: int, p: Placement, n: int, shape: tuple[int, ...] | None = None) -> float:
    """Bytes of a parameter on the rank holding the most of it."""
    if not isinstance(p, Shard):
        return float(nbytes)
    return nbytes * shard_fraction(p, shape, n) if shape else nbytes / n
