"""Fused-linear token log-probs: ``token_logprobs(hidden @ weight.T + bias, labels)`` without the [N, V] logits.

Only the rows that count are computed, in chunks of up to C rows (chunked along tokens, not only along the batch),
and the logits of the first K of them are retained from the forward for the backward (K from a memory budget):

    forward:   rows R_f = {n : label_n != ignore_index}            (one host sync per call to count them)
               per chunk c of R_f:  Z_c = H_c W^T + b              [C, V] in the shared buffer
                                    logp_c, lse_c from Z_c          keep lse [N] (4 bytes per token)
               rows after the first K: one chunk at a time in the buffer's first C rows, Z_c dropped
               the first K rows: each chunk in its own rows of the buffer, kept for the backward
               ignored rows: logp = 0, lse = 0, no GEMM, no vocabulary work
    backward:  rows R_b = {n in R_f : dL/dlogp_n != 0}              (one host sync per call)
               per chunk c of R_b:  Z_c retained, or recomputed (one more GEMM), turned *in place* into
                                    dZ_c = g_c / T * (onehot - softmax(Z_c / T))
                                    dH_c  = dZ_c W                  [C, H], scattered to its rows; 0 elsewhere
                                    dW   += dZ_c^T H_c              fp32 accumulator [V, H], only if W needs a grad
                                    db   += sum_rows dZ_c           fp32 accumulator [V], only if b needs a grad

So prompt and padding rows (ignore_index), tokens an ALLO mask drops and tokens of zero weight (their upstream
gradient is exactly 0) cost nothing in the backward, and ignored rows nothing in the forward either (a retained row
with a zero gradient is dropped from its buffer rows before any GEMM). The rows of a chunk are gathered from
``hidden`` (``index_select``, [C, H]) only when they are not one contiguous range; otherwise chunks are plain slices.
A frozen lm_head (``weight.requires_grad`` False, ALLO's default) has no dW GEMM and no accumulator. The retained
rows are the first valid ones: in a ``[chosen; rejected]`` batch the chosen half, which ALLO's masks never drop.

Why recompute at all instead of "gradient in forward" (what Liger's fused losses do): this op returns log-probs, and the
gradient of a loss on top w.r.t. logp_t is known only once that loss is computed (DPO's sigmoid couples all tokens of a
pair, the percentile mask a whole sequence), so computing dZ in the forward would have to fix the loss inside the op.
Where the loss is known and splits into independent parts, ops that do fix it make the gradients in the forward:
``fused_linear_ce.fused_linear_cross_entropy`` (plain cross-entropy: every token's gradient is known up front) and
``fused_linear_pairs`` (the preference losses of ``objectives.preference_loss``: a mean over pairs, so chunks of whole
pairs). Each recomputed row costs one extra [1, H] x [H, V] GEMM row (a third more matmul FLOPs than unfused when W is
trained, half more when it is frozen) and keeps every loss in ``allo_kernels.losses`` usable unchanged on top, with
per-token weights, masks and precomputed reference log-probs; retained rows and skipped rows win it back.
``retain_logits_bytes`` sets the trade: memory (K rows of logits held from the forward to the backward) against time (K
fewer recomputed rows). Default (``retain_budget_bytes``): on CUDA the chunk budget (min(1 GiB, free / 8)), i.e. as many
rows as the automatic chunk buffer holds anyway, so retention saves time and adds no memory where memory is scarcest; on
CPU 768 MiB, three times the CPU chunk budget (on machines with less than 12 GiB, 1/16 of their memory, at least the
chunk budget). 0 recomputes every row; a larger budget recomputes fewer rows for more memory. (On our CPU, at CE N=8192,
H=1024, V=32000, fp32, medians of runs: retaining 256 MiB, the CPU chunk budget, took 1.14-1.32x eager's time at 433 MiB
peak, 768 MiB 1.06-1.09x at 945 MiB; eager 3015 MiB, Cut Cross-Entropy 1157 MiB; README, "Fused-linear losses on CPU".)

Two paths run the per-chunk vocabulary work:

* Triton (CUDA, or CPU under ``TRITON_INTERPRET=1``): the ``token_logprobs`` kernels on the chunk of logits, the
  backward writing dZ into the logits buffer itself. Buffer: max(K, C) rows of logits in the compute dtype.
* torch (CPU): in-place ops on one fp32 buffer of max(K, C) rows (for half inputs plus one [C, V] half buffer, where
  the logits and dZ are rounded to the half type as a half GEMM and the unfused path round them). A retained row
  keeps what the forward leaves of it, e = exp(Z / T - max), and the row sum s of e, so its backward is one pass
  (softmax = e / s). The weight gradient is accumulated with one in-place ``addmm_`` per chunk, in fp32. On CPUs
  without native half GEMMs (no AVX512-BF16/AMX: torch's fallback there is 10-1000x slower than fp32 MKL) the GEMMs
  of half inputs run in fp32 on fp32 copies of the (exactly representable) half values, with the same rounding of
  the results. No ``torch.compile``: the GEMMs are ~87% of this path's time (torch profiler, N=1024, H=1024,
  V=32000), so fusing the few in-place element-wise passes would not pay for minutes of Inductor builds.

Memory, when a backward follows (grad mode on and an input requiring grad; else nothing is retained, K = 0): the
peak is the buffer (max(K, C) rows x V x 4 bytes on the torch path, x the compute dtype's size on the Triton path;
K = min(valid rows, retain_logits_bytes // bytes per row), C from ``auto_chunk_size``: 256 MiB on CPU, min(1 GiB,
free / 8) on CUDA) + the [N, H] hidden gradient + the fp32 [V, H] weight-gradient accumulator when W is trained (it
is the returned gradient itself for fp32 weights; on CUDA half inputs add one fp32 [V, H] product per chunk, reused
by the caching allocator) + for half inputs the [C, V] half buffer, and on CPUs without native half GEMMs an fp32
copy of W. E.g. N=8192, H=1024, V=32000, fp32 on CPU with the defaults: 768 MiB of buffer (6291 rows retained;
the other 1901 computed and recomputed in one chunk of its first rows: chunks are 2048 rows) + 32 MiB + 125 MiB. The
buffer lives from the forward to the end of the backward.

Under ``torch.autocast`` the logits are computed in the autocast dtype (what ``nn.Linear`` would give), in the
forward and again in the backward, wherever the backward runs.

Partitioned weights (DeepSpeed ZeRO-3): the op knows no framework. It takes a gather context (``gather=``, a
``allo_kernels.integrations.ParamGather``) and asks it for the weight's full shape, for the full values around the
forward and again for the backward, and to release them afterwards. The default, ``integrations.DEFAULT_GATHER``,
gathers ZeRO-3 partitions (``integrations.deepspeed.ZeRO3Gather``) and uses any other tensor as it is. The full-size
gradient is returned to autograd, where the framework's own hooks reduce-scatter it as for any of its parameters.
"""

from __future__ import annotations

import functools
import itertools
import os
from dataclasses import dataclass

import torch

from .._backend import select_backend
from .._validate import FLOAT_DTYPES, check_same_device, check_tensor, describe
from ..integrations import DEFAULT_GATHER, ParamGather
from .token_logprobs import IGNORE_INDEX, logprobs_backward, logprobs_forward, row_layout, validate_logits_labels
from .token_scores import TokenScores, scores_from_logprobs, validate_score_options

# Budget for the chunk buffers when chunk_size is None.
MAX_CHUNK_BYTES_CUDA = 1 << 30
MAX_CHUNK_BYTES_CPU = 256 << 20
# Default budget of the logits retained for the backward on CPU (retain_logits_bytes=None). Above the CPU chunk
# budget: a CPU's memory is rarely the limit a GPU's is, and each retained row saves a GEMM row of recompute (CE at
# N=8192, H=1024, V=32000 fp32: 1.06-1.09x eager's time at 945 MiB peak, against 1.14-1.32x at 433 MiB with 256 MiB;
# README, "Fused-linear losses on CPU"). On a machine with less than 16x that memory: 1/16 of it, at least the chunk
# budget (which retention fills without adding memory).
MAX_RETAIN_BYTES_CPU = 768 << 20


def chunk_budget_bytes(device: torch.device) -> int:
    """The memory budget of the chunk buffers: on CUDA min(1 GiB, free memory / 8); on CPU 256 MiB."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return min(MAX_CHUNK_BYTES_CUDA, free // 8)
    return MAX_CHUNK_BYTES_CPU


def retain_budget_bytes(device: torch.device) -> int:
    """The default ``retain_logits_bytes``: on CUDA the chunk budget (what the automatic chunk buffer holds anyway:
    retention adds no memory there); on CPU 768 MiB (``MAX_RETAIN_BYTES_CPU``), or 1/16 of the machine's memory
    where that is less, but never less than the CPU chunk budget (also what it is when the memory is unknown)."""
    if device.type == "cuda":
        return chunk_budget_bytes(device)
    memory = cpu_memory_bytes()
    if memory is None:
        return MAX_CHUNK_BYTES_CPU
    return min(MAX_RETAIN_BYTES_CPU, max(MAX_CHUNK_BYTES_CPU, memory // 16))


@functools.cache
def cpu_memory_bytes() -> int | None:
    """The memory this process may use: physical memory, or the cgroup's limit (v2 or v1) where that is lower; None
    where neither can be read. Total, not free, memory: the default retention (so the rounding of the gradients)
    must not change from one run to the next on one machine."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                limit = f.read().strip()
        except OSError:
            continue
        if limit.isdigit():
            memory = min(memory, int(limit))
    return memory


def chunk_bytes_per_row(vocab_size: int, dtype: torch.dtype, *, torch_path: bool) -> int:
    """Bytes of chunk buffer per row: the logits in ``dtype``; the torch path works in one fp32 buffer (plus, for
    half inputs, one buffer in the half type)."""
    elem = torch.empty((), dtype=dtype).element_size()
    if torch_path:
        elem = 4 if dtype == torch.float32 else 4 + elem
    return vocab_size * elem


def retained_bytes_per_row(vocab_size: int, dtype: torch.dtype, *, torch_path: bool) -> int:
    """Bytes per retained row: the torch path keeps fp32 rows, the Triton path the logits in ``dtype``."""
    return vocab_size * (4 if torch_path else torch.empty((), dtype=dtype).element_size())


def auto_chunk_size(
    n_rows: int,
    vocab_size: int,
    hidden_size: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    torch_path: bool | None = None,
) -> int:
    """Rows per chunk: the chunk buffers (``chunk_bytes_per_row``) fit ``chunk_budget_bytes``.

    Larger chunks make larger GEMMs (better tensor-core use) and fewer launches; beyond ~1 GiB of logits there is
    nothing left to gain. ``torch_path`` (default: not CUDA) says whether the torch path's fp32 work buffer counts.
    """
    if torch_path is None:
        torch_path = device.type != "cuda"
    per_row = max(1, chunk_bytes_per_row(vocab_size, dtype, torch_path=torch_path))
    rows = max(1, chunk_budget_bytes(device) // per_row)
    if rows >= 256:
        rows = rows // 128 * 128  # GEMM-friendly
    return int(max(1, min(n_rows, rows)))


# --------------------------------------------------------------------------------------------------------- the chunks
def native_half_gemm(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether GEMMs in ``dtype`` run natively (fast) on ``device``: always on CUDA and for fp32; on CPU only where
    oneDNN takes half GEMMs (AVX512/AMX). Elsewhere torch falls back to a scalar GEMM."""
    if dtype == torch.float32 or device.type != "cpu":
        return True
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())


@dataclass(frozen=True)
class _Options:
    ignore_index: int
    temperature: float
    chunk_size: int | None  # None: auto_chunk_size of the rows each pass actually computes
    use_triton: bool
    compute_dtype: torch.dtype  # the logits' dtype: autocast's when it is on, else the inputs'
    retain_bytes: int  # budget of the logits retained for the backward (0: recompute all, or no backward follows)
    gather: ParamGather  # how the backward reaches the full weight and bias again


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the logits are computed in: autocast's when autocast is on for this device, else the inputs'."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return weight.dtype


# Rows of a pass: a slice when they are one contiguous range (chunks are then views of ``hidden``), else an index.
Rows = slice | torch.Tensor


def _active_rows(active: torch.Tensor) -> Rows:
    """The True entries of ``active`` (the pass's host sync): a slice when they are contiguous, else their indices."""
    rows = active.nonzero()[:, 0]
    if rows.numel() == 0:
        return slice(0, 0)
    first, last = rows[[0, -1]].tolist()
    return slice(first, last + 1) if last - first + 1 == rows.numel() else rows


def _count(rows: Rows) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else rows.numel()


def _sub(rows: Rows, start: int, stop: int) -> Rows:
    """Entries start..stop of ``rows``."""
    return slice(rows.start + start, rows.start + stop) if isinstance(rows, slice) else rows[start:stop]


def _take(t: torch.Tensor, index: Rows) -> torch.Tensor:
    return t[index] if isinstance(index, slice) else t.index_select(0, index)


def _chunk_indices(rows: Rows, start: int, stop: int, size: int):
    """(offset, row index) of each chunk of ``size`` among entries start..stop of ``rows``."""
    for a in range(start, stop, size):
        yield a, _sub(rows, a, min(stop, a + size))


class _Chunks:
    """The chunk buffers of a call (shared by its forward and backward), and the GEMM operands while bound to a weight.

    One buffer of logits rows: the first ``retained`` rows hold the retained rows' logits from the forward to the
    backward; the rows that are not retained are computed (forward) and recomputed (backward) one chunk at a time
    in its first rows, so it has max(retained, chunk) rows.

    Under autocast the unfused ``linear(hidden, weight, bias)`` casts all three to the autocast dtype, so that is
    the compute dtype here too; autocast itself is switched off around each pass (``torch.mm(out=)`` refuses it).
    """

    def __init__(self, opts: _Options, vocab: int, hidden_size: int, n_rows: int, device: torch.device, retained=0):
        self.opts, self.dtype = opts, opts.compute_dtype
        # The torch path's GEMMs run in fp32 where half GEMMs are not native; the Triton path (on CPU only under the
        # interpreter, in tests) keeps the compute dtype so the kernels see what they see on a GPU.
        self.fp32_gemm = (not opts.use_triton) and not native_half_gemm(self.dtype, device)
        self.gemm_dtype = torch.float32 if self.fp32_gemm else self.dtype
        if opts.chunk_size is None:
            size = auto_chunk_size(n_rows, vocab, hidden_size, self.dtype, device, torch_path=not opts.use_triton)
        else:
            size = opts.chunk_size
        self.size = max(1, min(size, n_rows))
        rows = max(retained, min(self.size, n_rows - retained))
        self.weight = self.bias = None
        if opts.use_triton:
            self.logits_buf = torch.empty(rows, vocab, dtype=self.dtype, device=device)
        else:
            self.logits_buf = torch.empty(rows, vocab, dtype=torch.float32, device=device)  # the fp32 work rows
            self.half = None
            if self.dtype != torch.float32:
                self.half = torch.empty(min(self.size, rows), vocab, dtype=self.dtype, device=device)

    def bind(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight = weight.to(self.dtype).to(self.gemm_dtype)  # no copy when already in that dtype
        self.bias = None if bias is None else bias.to(self.dtype).to(self.gemm_dtype)

    def unbind(self) -> None:
        self.weight = self.bias = None  # cast copies of W are not kept between the forward and the backward

    def _linear(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        h = h.to(self.dtype).to(self.gemm_dtype)
        if self.bias is None:
            return torch.mm(h, self.weight.t(), out=out)
        return torch.addmm(self.bias, h, self.weight.t(), out=out)

    def rows(self, at: int, c: int) -> torch.Tensor:
        """Buffer rows at..at+c (logits, or what the forward left of them for the backward)."""
        return self.logits_buf[at : at + c]

    def logits(self, h: torch.Tensor, at: int = 0) -> torch.Tensor:
        """Z = h W^T + b into buffer rows at..at+c. Triton path: in the compute dtype. torch path: fp32 (rounded to
        the half type for half inputs), which the caller may destroy."""
        c = h.shape[0]
        out = self.rows(at, c)
        if self.opts.use_triton or self.half is None:
            return self._linear(h, out)
        if self.fp32_gemm:
            self.half[:c].copy_(self._linear(h, out))
        else:
            self._linear(h, self.half[:c])
        return out.copy_(self.half[:c])

    def round_to_dtype(self, x: torch.Tensor) -> torch.Tensor:
        """torch path: round the fp32 chunk ``x`` (in place) to the compute dtype, as a half GEMM's operand is; returns
        the operand the GEMMs take (the half buffer, or ``x`` itself for fp32 GEMMs)."""
        if self.half is None:
            return x
        half = self.half[: x.shape[0]]
        half.copy_(x)
        x.copy_(half)
        return x if self.fp32_gemm else half

    def writes_hidden_grad_directly(self, grad_h: torch.Tensor) -> bool:
        """Whether dH can be written by the GEMM straight into ``grad_h`` (one dtype throughout, no rounding)."""
        return grad_h.dtype == self.dtype == self.gemm_dtype

    def hidden_grad(self, dz: torch.Tensor) -> torch.Tensor:
        """dH = dZ W for the chunk, rounded to the compute dtype (as a GEMM in it would be)."""
        return (dz @ self.weight).to(self.dtype)


def _retained_rows(opts: _Options, n_rows: int, vocab: int) -> int:
    """How many of a forward's n_rows rows keep their logits for the backward (``opts.retain_bytes``)."""
    if opts.retain_bytes <= 0:
        return 0
    per_row = retained_bytes_per_row(vocab, opts.compute_dtype, torch_path=not opts.use_triton)
    return min(n_rows, opts.retain_bytes // per_row)


_COMPACT_BLOCK_ROWS = 64


def _compact_rows(x: torch.Tensor, keep: torch.Tensor) -> None:
    """Move rows ``keep`` (ascending) of ``x`` to its front, in place, through a scratch of 64 rows at a time.

    Safe in place: row j receives row keep[j] >= j, and a block only writes rows below every source a later block
    reads (keep[j'] >= j' for the later j').
    """
    for start in range(0, keep.numel(), _COMPACT_BLOCK_ROWS):
        stop = min(keep.numel(), start + _COMPACT_BLOCK_ROWS)
        x[start:stop] = x.index_select(0, keep[start:stop])


def _forward_chunk_torch(x: torch.Tensor, labels: torch.Tensor, temperature: float):
    """fp32 logits ``x`` [c, V] of valid rows -> (logp, lse, s), each [c]; ``x`` becomes e = exp(x / T - m).

    The same operations as ``torch.logsumexp`` (max, ``exp(x - max)``, sum, log, + max; an infinite max counts
    as 0), done in place on ``x`` so that no second [c, V] buffer exists; the label's logit is gathered first.
    What is left in ``x`` is what the backward of a retained row needs: softmax = e / s, with s = sum(e) returned.
    """
    if temperature != 1.0:
        x.div_(temperature)
    target = x.gather(1, labels.long()[:, None])[:, 0]
    m = x.amax(1)
    m.masked_fill_(m.abs() == float("inf"), 0.0)
    s = x.sub_(m[:, None]).exp_().sum(1)
    lse = s.log().add_(m)
    return target - lse, lse, s


def _score_chunk(opts: _Options, z: torch.Tensor, labels: torch.Tensor):
    """(logp, lse, s) of a chunk of valid rows' logits ``z``: the Triton path leaves z intact (s is None); the torch
    path leaves e = exp(z / T - m) in z and returns the row sums s of e (``_forward_chunk_torch``)."""
    if opts.use_triton:
        logp, lse = logprobs_forward(
            z, row_layout(z), labels, ignore_index=opts.ignore_index, temperature=opts.temperature
        )
        return logp, lse, None
    return _forward_chunk_torch(z, labels, opts.temperature)


def _gradient_buffers(hidden, weight, bias, need_h: bool, need_w: bool, need_b: bool):
    """Zeroed (dH, dW, db) for the inputs that need one (None for the others): dH in hidden's dtype, the parameter
    gradients as fp32 accumulators (rounded to the parameter's dtype once, at the end)."""
    grad_h = torch.zeros_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
    return grad_h, grad_w, grad_b


def _backward_chunk_torch(x, labels, g, temperature, *, lse=None, row_sum=None):
    """dZ = g / T * (onehot - softmax) [c, V], in place in ``x``: either recomputed fp32 logits (``lse`` given:
    softmax = exp(x / T - lse)) or what the forward left of a retained row (``row_sum`` s given: softmax = x / s)."""
    scale = g / temperature
    index = labels.long()[:, None]
    if row_sum is None:
        if temperature != 1.0:
            x.div_(temperature)
        p = x.sub_(lse[:, None]).exp_()
        at_label = (1.0 - p.gather(1, index)) * scale[:, None]  # (1 - p) * s, rounded as (-p + 1) * s is
    else:
        p = x
        at_label = (1.0 - p.gather(1, index) / row_sum[:, None]) * scale[:, None]
        scale = scale / row_sum
    p.mul_(-scale[:, None])  # (-p) * s
    return p.scatter_(1, index, at_label)


def _accumulate_weight_grad(acc: torch.Tensor, dz: torch.Tensor, h: torch.Tensor) -> None:
    """acc[V, H] (fp32) += dz^T h, in place, accumulating the products in fp32 even for bf16/fp16 inputs."""
    if dz.dtype == torch.float32:
        acc.addmm_(dz.t(), h.float())
        return
    if dz.is_cuda:
        try:
            acc.add_(torch.mm(dz.t(), h, out_dtype=torch.float32))
            return
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    acc.addmm_(dz.t().float(), h.float())  # half dZ off CUDA: the Triton interpreter's path (tests only)


def _scatter_rows(dst: torch.Tensor, index: Rows, src: torch.Tensor) -> None:
    if isinstance(index, slice):
        dst[index] = src
    else:
        dst.index_copy_(0, index, src.to(dst.dtype))


def _chunk_gradients(chunks: _Chunks, z, h, index: Rows, labels, g, lse, row_sum, grads) -> None:
    """One chunk's backward: ``z`` (its logits, recomputed or retained; on the torch path what the forward left of a
    retained row when ``row_sum`` is given) becomes dZ = g / T * (onehot - softmax(Z / T)) in place, then
    dH = dZ W is written to its rows of ``grads[0]``, dZ^T h added to ``grads[1]`` and the row sums of dZ to
    ``grads[2]`` (each only when not None)."""
    opts = chunks.opts
    grad_h, grad_w, grad_b = grads
    if opts.use_triton:
        dz = logprobs_backward(
            z,
            row_layout(z),
            labels,
            lse,
            g,
            ignore_index=opts.ignore_index,
            temperature=opts.temperature,
            inplace=True,
        )
        dz_gemm = dz
    else:
        if row_sum is None:
            dz = _backward_chunk_torch(z, labels, g, opts.temperature, lse=lse)
        else:
            dz = _backward_chunk_torch(z, labels, g, opts.temperature, row_sum=row_sum)
        dz_gemm = chunks.round_to_dtype(dz)  # dz keeps the rounded values in fp32
    if grad_h is not None:
        if isinstance(index, slice) and chunks.writes_hidden_grad_directly(grad_h):
            torch.mm(dz_gemm, chunks.weight, out=grad_h[index])
        else:
            _scatter_rows(grad_h, index, chunks.hidden_grad(dz_gemm))
    if grad_w is not None:
        _accumulate_weight_grad(grad_w, dz, h.to(opts.compute_dtype))
    if grad_b is not None:
        grad_b += dz.sum(0, dtype=torch.float32)


class FusedLinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts: _Options):  # type: ignore[override]
        n = hidden.shape[0]
        logp = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        lse = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        rows = _active_rows(labels != opts.ignore_index)
        n_rows = _count(rows)
        ctx.retained = None
        if n_rows:
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                n_kept = _retained_rows(opts, n_rows, weight.shape[0])
                chunks = _Chunks(opts, weight.shape[0], hidden.shape[1], n_rows, hidden.device, n_kept)
                chunks.bind(weight, bias)
                row_sums = None if opts.use_triton else torch.empty(n_kept, device=hidden.device)

                def score(index: Rows, at: int | None) -> None:
                    """Log-probs of one chunk; ``at``: the buffer rows it is retained in (None: not retained)."""
                    z, lab = chunks.logits(_take(hidden, index), at or 0), labels[index]
                    logp_c, lse_c, s = _score_chunk(opts, z, lab)
                    if at is not None and s is not None:
                        row_sums[at : at + z.shape[0]] = s
                    _scatter_rows(logp, index, logp_c)
                    _scatter_rows(lse, index, lse_c)

                # The rows not retained first, one chunk at a time in the buffer's first rows; then the retained
                # rows (the first n_kept: in a [chosen; rejected] batch the chosen half, never dropped by ALLO's
                # masks), each chunk into its own rows of the buffer, where they stay for the backward.
                for _, index in _chunk_indices(rows, n_kept, n_rows, chunks.size):
                    score(index, None)
                for at, index in _chunk_indices(rows, 0, n_kept, chunks.size):
                    score(index, at)
                chunks.unbind()
                if n_kept:
                    ctx.retained = (chunks, _sub(rows, 0, n_kept), row_sums)
                del chunks
        ctx.save_for_backward(hidden, labels, lse)
        # weight/bias are kept as objects, not saved tensors: a partitioned weight's storage is released after the
        # forward and gathered again in the backward, so only the parameter objects themselves stay valid.
        ctx.weight, ctx.bias = weight, bias
        ctx.opts = opts
        return logp

    @staticmethod
    def backward(ctx, grad_logp):  # type: ignore[override]
        hidden, labels, lse = ctx.saved_tensors
        weight, bias = ctx.weight, ctx.bias
        opts: _Options = ctx.opts
        retained, ctx.retained = ctx.retained, None  # a second backward (retain_graph) recomputes everything
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_logp = grad_logp.reshape(-1).to(torch.float32)
        active = (labels != opts.ignore_index) & (grad_logp != 0)
        chunks, kept, row_sums, n_kept = None, slice(0, 0), None, 0
        if retained is not None:
            # The retained rows with a nonzero gradient are moved to the front of their buffer rows and used as they
            # are (not recomputed); those with a zero gradient are dropped there, so that none ever enters a GEMM.
            # The buffer then serves the recomputed chunks.
            chunks, kept, row_sums = retained
            keep = _take(active, kept).nonzero()[:, 0]  # a host sync
            active = active.clone()
            active[kept] = False
            n_kept = keep.numel()
            if 0 < n_kept < _count(kept):
                _compact_rows(chunks.rows(0, _count(kept)), keep)
                row_sums = None if row_sums is None else row_sums[keep]
                kept = keep + kept.start if isinstance(kept, slice) else kept[keep]
        rows = _active_rows(active)
        n_rows = _count(rows)
        release = opts.gather.gather_for_backward(weight, bias)
        # No accumulator (and below no dW GEMM) for a frozen weight.
        grads = _gradient_buffers(hidden, weight, bias, need_h, need_w, need_b)
        grad_h, grad_w, grad_b = grads
        if (n_rows or n_kept) and (need_h or need_w or need_b):
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                if chunks is None:
                    chunks = _Chunks(opts, weight.shape[0], hidden.shape[1], n_rows, hidden.device)
                chunks.bind(weight, bias)
                # Retained chunks first (their buffer rows are free afterwards), then the recomputed ones.
                work = itertools.chain(
                    _chunk_indices(kept, 0, n_kept, chunks.size),
                    ((None, index) for _, index in _chunk_indices(rows, 0, n_rows, chunks.size)),
                )
                for at, index in work:
                    h = _take(hidden, index)
                    z = chunks.logits(h) if at is None else chunks.rows(at, h.shape[0])
                    row_sum = None if at is None or row_sums is None else row_sums[at : at + h.shape[0]]
                    _chunk_gradients(chunks, z, h, index, labels[index], grad_logp[index], lse[index], row_sum, grads)
                    del z, h  # the buffer is freed below, before the half-weight gradient casts
        del chunks, retained, row_sums
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        release()
        return grad_h, grad_w, grad_b, None, None


# ------------------------------------------------------------------------------------------------------- public API
def _validate_linear(hidden, weight, labels, bias, chunk_size, retain, ignore_index, temperature, gather):
    hidden = check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, min_ndim=1)
    weight = check_tensor("weight", weight, dtypes=FLOAT_DTYPES)
    labels = check_tensor("labels", labels)
    if bias is not None:
        bias = check_tensor("bias", bias, dtypes=FLOAT_DTYPES)
    check_same_device(hidden=hidden, weight=weight, bias=bias)
    if gather is None:
        gather = DEFAULT_GATHER
    elif not isinstance(gather, ParamGather):
        raise TypeError(f"gather must be an allo_kernels.integrations.ParamGather or None, got {describe(gather)}")
    # A partitioned parameter's local tensor may be empty: the gather context knows its full shape.
    full_shape = gather.full_shape(weight)
    if len(full_shape) != 2:
        raise ValueError(f"weight must have 2 dimensions [V, H], got {describe(weight)}")
    vocab, width = full_shape
    if hidden.shape[-1] != width:
        raise ValueError(
            f"hidden's last dimension must equal weight's second dimension {width} (weight is [V, H]), "
            f"got {describe(hidden)}"
        )
    if bias is not None and gather.full_shape(bias) != (vocab,):
        raise ValueError(f"bias must have shape ({vocab},) (one entry per vocabulary row), got {describe(bias)}")
    if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
        raise TypeError(f"hidden and weight must share a dtype, got hidden {hidden.dtype} and weight {weight.dtype}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if retain is not None and (isinstance(retain, bool) or not isinstance(retain, int) or retain < 0):
        raise ValueError(f"retain_logits_bytes must be an int >= 0 or None, got {retain!r}")
    # Reuse the log-prob checks (labels shape/range, temperature) on a zero-stride stand-in for the logits.
    standin = hidden.new_empty(()).expand(*hidden.shape[:-1], vocab)
    _, labels, temperature = validate_logits_labels(standin, labels, ignore_index=ignore_index, temperature=temperature)
    return hidden, weight, labels, bias, temperature, gather, vocab


def _fused_logprobs(hidden, weight, labels, bias, ignore_index, temperature, chunk_size, gather, retain):
    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    use_triton = select_backend(hidden.device) == "triton"
    needs_grad = h2.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if not (torch.is_grad_enabled() and needs_grad):
        retain = 0  # no backward follows
    elif retain is None:
        retain = retain_budget_bytes(h2.device)
    opts = _Options(ignore_index, temperature, chunk_size, use_triton, compute_dtype(h2, weight), retain, gather)
    # Gather partitioned parameters *before* apply, so autograd records the full parameter shapes.
    with gather.gathered(weight, bias):
        logp = FusedLinearLogprobsFunction.apply(h2, weight, bias, labels.reshape(-1).contiguous(), opts)
    return logp.view(lead), use_triton


def fused_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    retain_logits_bytes: int | None = None,
    gather: ParamGather | None = None,
) -> torch.Tensor:
    """``token_logprobs(hidden @ weight.T (+ bias), labels)`` without ever holding the full [N, V] logits.

    Args:
        hidden: [..., H] (e.g. [B, T, H] final hidden states; pass ``hidden[:, :-1]`` with ``labels[:, 1:]``).
        weight: [V, H] lm_head weight (a partitioned one is gathered for the forward and for the backward).
        labels: [...] ids in [0, V) or ``ignore_index``.
        bias: optional [V].
        chunk_size: rows per chunk (None: chosen from V, H and free memory; see ``auto_chunk_size``).
        retain_logits_bytes: the most bytes of logits kept from the forward for the backward, which then does not
            recompute those rows (None: ``retain_budget_bytes``: on CUDA the chunk budget, the size of the automatic
            chunk buffer, so that retention adds no memory there; on CPU 768 MiB, less on machines under 12 GiB;
            0: recompute every row). It counts
            fp32 rows on the torch path, rows in the compute dtype on the Triton path.
        gather: the gather context of partitioned parameters (None: ``integrations.DEFAULT_GATHER``, which gathers
            DeepSpeed ZeRO-3 partitions and uses any other tensor as it is).

    Returns:
        fp32 [...] log-probs, differentiable w.r.t. hidden, weight and bias (weight/bias gradients accumulated in fp32).

    Under ``torch.autocast`` the logits are computed in the autocast dtype, as an ``nn.Linear`` lm_head would compute
    them (hidden and weight may then differ in dtype), and recomputed in it in the backward wherever that runs.
    """
    hidden, weight, labels, bias, temperature, gather, _ = _validate_linear(
        hidden, weight, labels, bias, chunk_size, retain_logits_bytes, ignore_index, temperature, gather
    )
    return _fused_logprobs(
        hidden, weight, labels, bias, ignore_index, temperature, chunk_size, gather, retain_logits_bytes
    )[0]


def fused_linear_token_scores(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    beta: float = 0.1,
    mask_fraction: float = 0.0,
    mask_by: str = "highest",
    mask_scope: str = "sequence",
    ignore_index: int = IGNORE_INDEX,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    retain_logits_bytes: int | None = None,
    gather: ParamGather | None = None,
) -> TokenScores:
    """The fused-linear twin of ``token_scores``: same options, same ``TokenScores``, from hidden [B, T, H]
    (``chunk_size``, ``retain_logits_bytes`` and ``gather`` as in ``fused_linear_token_logprobs``)."""
    hidden, weight, labels, bias, temperature, gather, _ = _validate_linear(
        hidden, weight, labels, bias, chunk_size, retain_logits_bytes, ignore_index, temperature, gather
    )
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H] (3 dimensions), got {describe(hidden)}")
    ref, w, beta, mask_fraction = validate_score_options(
        labels, ref_logprobs, weights, beta=beta, mask_fraction=mask_fraction, mask_by=mask_by, mask_scope=mask_scope
    )
    logprobs, use_triton = _fused_logprobs(
        hidden, weight, labels, bias, ignore_index, temperature, chunk_size, gather, retain_logits_bytes
    )
    return scores_from_logprobs(
        logprobs,
        labels,
        ref,
        w,
        beta=beta,
        mask_fraction=mask_fraction,
        mask_by=mask_by,
        mask_scope=mask_scope,
        ignore_index=ignore_index,
        use_triton=use_triton,
    )
