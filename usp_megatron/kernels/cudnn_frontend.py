"""cuDNN's fused attention through NVIDIA's cuDNN frontend (``nvidia-cudnn-frontend``,
``import cudnn``): one kernel for full, causal and banded blocks and for packed documents.

PyTorch's cuDNN op has neither a window nor varlen; the frontend's graph API has both: a
band of diagonals counted from the top-left corner (``diagonal_band_left_bound`` /
``diagonal_band_right_bound``), whose masked tiles the kernel skips, and ragged offsets
with per-sequence lengths (a padding mask) for documents. Measured on one H100 (32 x 128
heads, bf16, fwd+bwd): dense causal ties PyTorch's cuDNN op; a causal window of 4096 costs
0.066 of dense at 128K tokens (the tiled ``torch_window``: 0.101).

Masks (``mask.BlockMask``, rows counted from the block's top-left corner):

- a band ``lo <= j - i <= hi`` is cuDNN's TOP_LEFT band with right bound ``hi`` (key ``j``
  hidden when ``j > i + right``) and left bound ``1 - lo`` (key ``j`` hidden when
  ``j <= i - left``): :func:`cudnn_band`;
- packed documents (batch 1) are a ragged batch: segment ``n`` is batch entry ``n``, its
  rows found by ragged offsets into the block's own tensors (no gather), its lengths by
  the padding mask. The number of entries and the longest segment are rounded up to
  powers of two (entries past the documents have length 0, as TransformerEngine pads
  its THD batches), so a model's changing packings reuse a few graphs:
  :func:`ragged_batch`. Rows outside every segment are never touched: their output
  stays 0, their log-sum-exp -inf and their gradients 0.

Graphs are built once per device, dtype, shapes, strides, mask and scale, and kept in a
bounded LRU; inputs are read in place (head slices and row slices included), except in the
packed-documents backward, which reads q/dq, k/dk, v/dv and o/dO each pair in one packed
layout with shared ragged offsets, the way TransformerEngine runs its THD graphs (strided
inputs are copied there). One cuDNN handle per device runs on torch's current stream;
workspaces come from torch's allocator.

A block of one query row or one key goes to the plain-torch kernel (cuDNN's backward
refuses ``s_q = s_kv = 1``, and PyTorch keeps sequence length 1 off cuDNN:
pytorch/pytorch#138529); it costs a few kernel launches.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import threading
import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor

from usp_megatron.kernels.reference import ReferenceKernel
from usp_megatron.mask import BlockMask, Documents

_HALF = (torch.float16, torch.bfloat16)
Pair = tuple[Tensor, Tensor]
Triple = tuple[Tensor, Tensor, Tensor]
#: Graphs kept per process (a model asks for a handful per layer kind and ring step).
GRAPH_CACHE_SIZE = 256
#: Documents objects whose device tensors are kept (one per ring step of recent batches).
DOCUMENTS_CACHE_SIZE = 64


# -- masks: pure translations, checked on CPU ----------------------------------------------


class Band(NamedTuple):
    """cuDNN's TOP_LEFT diagonal band: key ``j`` is hidden from query ``i`` when
    ``j <= i - left`` or ``j > i + right`` (None: unbounded on that side)."""

    left: int | None
    right: int | None


@functools.lru_cache(maxsize=1024)
def cudnn_band(lo: int | None, hi: int | None, sq: int, sk: int) -> Band:
    """The band of ``BlockMask(lo, hi)`` on an ``sq x sk`` block; bounds that hide nothing
    are dropped (a causal square is ``Band(None, 0)``, full attention ``Band(None, None)``).

    Takes the trimmed blocks the layouts hand out (every row sees a key, key 0 is seen:
    ``lo <= 0 <= hi``) and refuses the rest, naming the block.
    """
    if lo is not None and lo > 0:
        raise ValueError(
            f"BlockMask(lo={lo}, hi={hi}) on a {sq}x{sk} block: keys 0..{lo - 1} are seen by "
            "no row; the cudnn kernel takes trimmed blocks (slice those keys off)"
        )
    if hi is not None and hi < 0:
        raise ValueError(
            f"BlockMask(lo={lo}, hi={hi}) on a {sq}x{sk} block: row 0 sees no key; the cudnn "
            "kernel takes trimmed blocks (slice the rows that see nothing off)"
        )
    if lo is not None and lo > -(sq - 1) and sq > sk:
        raise ValueError(
            f"BlockMask(lo={lo}, hi={hi}) on a {sq}x{sk} block: cuDNN's band with a left edge "
            "needs no more query rows than keys (the layouts' banded blocks are square)"
        )
    left = None if lo is None or lo <= -(sq - 1) else 1 - lo
    right = None if hi is None or hi >= sk - 1 else hi
    return Band(left, right)


#: The shortest segment length a ragged graph is built for: shorter documents share its
#: graphs, and no graph is 1 x 1 (cuDNN's backward refuses ``s_q = s_kv = 1``).
MIN_RAGGED_LENGTH = 64


def _power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class RaggedBatch(NamedTuple):
    """Packed documents as cuDNN's ragged batch: entry ``n`` is query rows
    ``q_rows[n] .. + q_lens[n]`` against key rows ``k_rows[n] .. + k_lens[n]`` of the
    block. ``size`` entries and the lengths ``max_q`` / ``max_k`` of the graph's
    ``[size, h, max, d]`` tensors are powers of two (lengths at least
    ``MIN_RAGGED_LENGTH``); entries past the documents have length 0 and start where the
    last document ends; ``q_rows`` / ``k_rows`` have ``size + 1`` entries (the
    ragged-offset convention)."""

    size: int
    max_q: int
    max_k: int
    q_lens: tuple[int, ...]
    k_lens: tuple[int, ...]
    q_rows: tuple[int, ...]
    k_rows: tuple[int, ...]


def _side(starts: tuple[int, ...], lens: tuple[int, ...], size: int, name: str):
    """(lengths, first rows) of one side padded to ``size`` entries; refuses segments out
    of row order (cuDNN reads ragged offsets as a monotone sequence)."""
    for n in range(1, len(starts)):
        if starts[n] < starts[n - 1] + lens[n - 1]:
            raise ValueError(
                f"document segments must be in row order without overlap for the cudnn "
                f"kernel; {name} segment {n} starts at row {starts[n]}, before segment "
                f"{n - 1} ends ({starts[n - 1]} + {lens[n - 1]})"
            )
    end = starts[-1] + lens[-1]
    pad = size - len(starts)
    return lens + (0,) * pad, starts + (end,) * (pad + 1)


@functools.lru_cache(maxsize=1024)
def ragged_batch(documents: Documents) -> RaggedBatch:
    """The ragged batch of ``documents`` (see :class:`RaggedBatch`)."""
    size = _power_of_two(len(documents.q_starts))
    q_lens, q_rows = _side(documents.q_starts, documents.q_lens, size, "query")
    k_lens, k_rows = _side(documents.k_starts, documents.k_lens, size, "key")
    max_q, max_k = (max(_power_of_two(n), MIN_RAGGED_LENGTH)
                    for n in (documents.max_q, documents.max_k))  # fmt: skip
    return RaggedBatch(size, max_q, max_k, q_lens, k_lens, q_rows, k_rows)


# -- the frontend: import, handles, graphs -------------------------------------------------


def frontend_importable() -> bool:
    """Whether the cuDNN frontend package is installed (without importing it)."""
    return importlib.util.find_spec("cudnn") is not None


@functools.cache
def _frontend() -> Any:
    import cudnn

    return cudnn


def frontend_versions() -> str:
    """'frontend X, cuDNN backend Y' as installed (for messages and benchmark logs)."""
    cudnn = _frontend()
    try:
        backend = cudnn.backend_version_string()
    except Exception as error:  # noqa: BLE001 - a message, whatever the reason
        backend = f"unknown ({error})"
    return f"frontend {cudnn.__version__}, cuDNN backend {backend}"


@functools.cache
def _handle(device_index: int) -> Any:
    """The cuDNN handle of one device (created once, on that device)."""
    with torch.cuda.device(device_index):
        return _frontend().create_handle()


class Geometry(NamedTuple):
    """A graph tensor: cuDNN's logical ``[b, h, s, d]`` dims and the strides of its storage."""

    dim: tuple[int, int, int, int]
    stride: tuple[int, int, int, int]


def bshd(shape: tuple[int, ...], stride: tuple[int, ...]) -> Geometry:
    """A ``[b, s, h, d]`` tensor (``shape``, ``stride``) as cuDNN's ``[b, h, s, d]``: the
    same memory, nothing copied. Dimensions of size 1 get the stride that spans all the
    others (their own is arbitrary, e.g. tied with the row stride for a batch of one)."""
    b, s, h, d = shape
    sizes, strides = (b, h, s, d), (stride[0], stride[2], stride[1], stride[3])
    outer = max((n * step for n, step in zip(sizes, strides) if n > 1), default=1)
    return Geometry(sizes, tuple(outer if n == 1 else step for n, step in zip(sizes, strides)))


def ragged(entries: int, length: int, heads: int, d: int, row: int, head: int) -> Geometry:
    """``entries`` ragged entries of at most ``length`` rows of a block whose rows are
    ``row`` elements apart (heads ``head`` apart): where each entry starts is its ragged
    offset, so the entry stride is nominal (``length`` rows)."""
    return Geometry((entries, heads, length, d), (length * row, head, row, 1))


class ForwardSpec(NamedTuple):
    """Everything a forward graph depends on (also its cache key, with the device).
    ``ragged``: q, k, v, o and stats carry ragged offsets and the padding mask's lengths
    (packed documents)."""

    dtype: torch.dtype
    q: Geometry
    k: Geometry
    v: Geometry
    o: Geometry
    stats: Geometry
    band: Band
    scale: float
    ragged: bool


class BackwardSpec(NamedTuple):
    """Everything a backward graph depends on. ``max_rows``: bounds of the ragged query and
    key token axes (cuDNN sizes its workspace by them): the block's rows, at least the
    graph's entry length, rounded up to 64 as cuDNN's own tests and wrapper do."""

    dtype: torch.dtype
    q: Geometry
    k: Geometry
    v: Geometry
    o: Geometry
    d_o: Geometry
    stats: Geometry
    dq: Geometry
    dk: Geometry
    dv: Geometry
    band: Band
    scale: float
    ragged: bool
    max_rows: tuple[int, int] | None


_INPUTS_FORWARD = ("q", "k", "v")
_INPUTS_BACKWARD = ("q", "k", "v", "o", "d_o")
#: Whose ragged offsets each backward tensor reads: a gradient shares its input's, dO
#: shares O's (TransformerEngine's THD graphs: one layout per pair).
_OFFSETS_OF = {"q": "q", "k": "k", "v": "v", "o": "o", "stats": "stats", "d_o": "o",
               "dq": "q", "dk": "k", "dv": "v"}  # fmt: skip


def _new_graph(cudnn: Any, dtype: torch.dtype, handle: Any) -> tuple[Any, Any]:
    io = cudnn.data_type.BFLOAT16 if dtype == torch.bfloat16 else cudnn.data_type.HALF
    return cudnn.pygraph(
        io_data_type=io,
        intermediate_data_type=cudnn.data_type.FLOAT,
        compute_data_type=cudnn.data_type.FLOAT,
        handle=handle,
    ), io


def _mask_args(cudnn: Any, band: Band) -> dict[str, Any]:
    args: dict[str, Any] = {"diagonal_alignment": cudnn.diagonal_alignment.TOP_LEFT}
    if band.left is not None:
        args["diagonal_band_left_bound"] = band.left
    if band.right is not None:
        args["diagonal_band_right_bound"] = band.right
    return args


def _ragged_inputs(cudnn: Any, graph: Any, entries: int, roles: tuple[str, ...]) -> dict:
    """The padding mask's lengths (int32 ``[entries, 1, 1, 1]``) and one ragged-offset
    tensor per role (int64 ``[entries + 1, 1, 1, 1]``, in elements)."""
    tensors = {
        name: graph.tensor(name=name, dim=[entries, 1, 1, 1], stride=[1, 1, 1, 1],
                           data_type=cudnn.data_type.INT32)
        for name in ("q_lens", "k_lens")
    }  # fmt: skip
    for role in roles:
        tensors[f"{role}_offsets"] = graph.tensor(
            name=f"{role}_offsets", dim=[entries + 1, 1, 1, 1], stride=[1, 1, 1, 1],
            data_type=cudnn.data_type.INT64,
        )  # fmt: skip
    return tensors


def _padding_args(tensors: dict) -> dict[str, Any]:
    """The padding mask: entry ``n`` has ``q_lens[n]`` query and ``k_lens[n]`` key rows."""
    return {"use_padding_mask": True, "seq_len_q": tensors["q_lens"],
            "seq_len_kv": tensors["k_lens"]}  # fmt: skip


def _output(tensor: Any, geometry: Geometry, data_type: Any, offsets: Any | None) -> None:
    tensor.set_output(True).set_dim(list(geometry.dim)).set_stride(list(geometry.stride))
    tensor.set_data_type(data_type)
    if offsets is not None:
        tensor.set_ragged_offset(offsets)


def declare_forward(cudnn: Any, spec: ForwardSpec, handle: Any = None) -> tuple[Any, dict]:
    """The forward graph of ``spec``, declared (not built): (graph, its tensors by role)."""
    graph, io = _new_graph(cudnn, spec.dtype, handle)
    tensors = {
        role: graph.tensor(name=role, dim=list(g.dim), stride=list(g.stride), data_type=io)
        for role, g in zip(_INPUTS_FORWARD, (spec.q, spec.k, spec.v))
    }
    args = _mask_args(cudnn, spec.band)
    if spec.ragged:
        roles = (*_INPUTS_FORWARD, "o", "stats")
        tensors.update(_ragged_inputs(cudnn, graph, spec.q.dim[0], roles))
        for role in _INPUTS_FORWARD:
            tensors[role].set_ragged_offset(tensors[f"{role}_offsets"])
        args.update(_padding_args(tensors))
    out, stats = graph.sdpa(
        name="sdpa", q=tensors["q"], k=tensors["k"], v=tensors["v"], generate_stats=True,
        attn_scale=spec.scale, **args,
    )  # fmt: skip
    _output(out, spec.o, io, tensors.get("o_offsets"))
    _output(stats, spec.stats, cudnn.data_type.FLOAT, tensors.get("stats_offsets"))
    tensors.update(o=out, stats=stats)
    return graph, tensors


def declare_backward(cudnn: Any, spec: BackwardSpec, handle: Any = None) -> tuple[Any, dict]:
    """The backward graph of ``spec``, declared (not built): (graph, its tensors by role)."""
    graph, io = _new_graph(cudnn, spec.dtype, handle)
    geometries = dict(zip(_INPUTS_BACKWARD, (spec.q, spec.k, spec.v, spec.o, spec.d_o)))
    tensors = {
        role: graph.tensor(name=role, dim=list(g.dim), stride=list(g.stride), data_type=io)
        for role, g in geometries.items()
    }
    stats = spec.stats
    tensors["stats"] = graph.tensor(
        name="stats", dim=list(stats.dim), stride=list(stats.stride),
        data_type=cudnn.data_type.FLOAT,
    )  # fmt: skip
    args = _mask_args(cudnn, spec.band)
    if spec.ragged:
        tensors.update(_ragged_inputs(cudnn, graph, spec.q.dim[0], ("q", "k", "v", "o", "stats")))
        for role in (*_INPUTS_BACKWARD, "stats"):
            tensors[role].set_ragged_offset(tensors[f"{_OFFSETS_OF[role]}_offsets"])
        args.update(_padding_args(tensors))
        args.update(max_total_seq_len_q=spec.max_rows[0], max_total_seq_len_kv=spec.max_rows[1])
    grads = graph.sdpa_backward(
        name="sdpa_backward", q=tensors["q"], k=tensors["k"], v=tensors["v"], o=tensors["o"],
        dO=tensors["d_o"], stats=tensors["stats"], attn_scale=spec.scale, **args,
    )  # fmt: skip
    for role, tensor, geometry in zip(("dq", "dk", "dv"), grads, (spec.dq, spec.dk, spec.dv)):
        _output(tensor, geometry, io, tensors.get(f"{_OFFSETS_OF[role]}_offsets"))
        tensors[role] = tensor
    return graph, tensors


def build(cudnn: Any, graph: Any) -> None:
    """validate -> operation graph -> plans (heuristics A, then the fallback list) ->
    support check -> the first plan that builds."""
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()


class CompiledGraph:
    """A built graph, its tensors by role and its workspace size."""

    def __init__(self, graph: Any, tensors: dict[str, Any], device_index: int) -> None:
        self.graph, self.tensors, self.device_index = graph, tensors, device_index
        self.device = torch.device("cuda", device_index)
        self.workspace = max(int(graph.get_workspace_size()), 1)

    def run(self, buffers: dict[str, Tensor]) -> None:
        """Execute on torch's current stream of the graph's device; ``buffers``: a tensor
        per role."""
        index = self.device_index
        if torch.cuda.current_device() != index:
            with torch.cuda.device(index):
                self.run(buffers)
            return
        handle = _handle(index)
        _frontend().set_stream(handle, torch.cuda.current_stream(index).cuda_stream)
        workspace = torch.empty(self.workspace, dtype=torch.uint8, device=self.device)
        pack = {self.tensors[role]: buffer for role, buffer in buffers.items()}
        self.graph.execute(pack, workspace, handle=handle)


class _GraphCache:
    """Built graphs by (device, spec), least recently used dropped past ``size``."""

    def __init__(self, size: int) -> None:
        self.size, self._graphs = size, collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, device_index: int, spec: ForwardSpec | BackwardSpec) -> CompiledGraph:
        key = (device_index, spec)
        with self._lock:
            graph = self._graphs.get(key)
            if graph is not None:
                self._graphs.move_to_end(key)
                return graph
        graph = _compile(device_index, spec)
        with self._lock:
            self._graphs[key] = graph
            while len(self._graphs) > self.size:
                self._graphs.popitem(last=False)
        return graph


def _compile(device_index: int, spec: ForwardSpec | BackwardSpec) -> CompiledGraph:
    cudnn = _frontend()
    declare = declare_forward if isinstance(spec, ForwardSpec) else declare_backward
    with torch.cuda.device(device_index):
        graph, tensors = declare(cudnn, spec, _handle(device_index))
        try:
            build(cudnn, graph)
        except Exception as error:  # noqa: BLE001 - re-raised with what was being built
            raise RuntimeError(
                f"the cuDNN {frontend_versions()} could not build this attention graph on "
                f"cuda:{device_index}: {spec}: {type(error).__name__}: {error}"
            ) from error
    return CompiledGraph(graph, tensors, device_index)


# -- the per-Documents device tensors ------------------------------------------------------


def _on_device(values: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``values`` as a ``[n, 1, 1, 1]`` tensor on ``device`` (a host-to-device copy that
    does not wait; nothing is ever read back)."""
    return torch.tensor(values, dtype=dtype).view(-1, 1, 1, 1).to(device, non_blocking=True)


class DocumentTensors:
    """One ``Documents``' ragged batch on one device: the padding mask's lengths, and the
    ragged offsets of each row stride asked for (``rows * stride``), each copied once."""

    def __init__(self, documents: Documents, device: torch.device) -> None:
        self.batch, self.device = ragged_batch(documents), device
        self.q_lens = _on_device(self.batch.q_lens, torch.int32, device)
        self.k_lens = _on_device(self.batch.k_lens, torch.int32, device)
        self._offsets: dict[tuple[str, int], Tensor] = {}

    def offsets(self, side: str, row_stride: int) -> Tensor:
        """Ragged offsets (elements) of a tensor on the query (``'q'``) or key side whose
        rows are ``row_stride`` elements apart."""
        key = (side, row_stride)
        if key not in self._offsets:
            rows = self.batch.q_rows if side == "q" else self.batch.k_rows
            self._offsets[key] = _on_device(tuple(r * row_stride for r in rows), torch.int64,
                                            self.device)  # fmt: skip
        return self._offsets[key]


@functools.lru_cache(maxsize=DOCUMENTS_CACHE_SIZE)
def document_tensors(documents: Documents, device: torch.device) -> DocumentTensors:
    """The :class:`DocumentTensors` of ``documents`` on ``device``, made once (the layout
    hands every layer the same ``Documents``)."""
    return DocumentTensors(documents, device)


# -- the kernel ----------------------------------------------------------------------------


def _operand(x: Tensor) -> Tensor:
    """``x`` as it is where cuDNN can read it in place (last dimension contiguous, 16-byte
    aligned start and strides, none 0: not expanded), else a contiguous copy."""
    aligned = x.data_ptr() % 16 == 0 and all(
        stride != 0 and (stride * x.element_size()) % 16 == 0
        for stride, size in zip(x.stride()[:-1], x.shape)
        if size > 1
    )
    return x if aligned and x.stride(-1) == 1 else x.contiguous()


def _empty_like_rows(x: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
    """A new ``[b, s, h, d]`` tensor laid out batch-inner like ``x`` when ``x`` is
    (what the all-to-all sends without a copy), else contiguous."""
    if shape[0] > 1 and x.stride(0) < x.stride(1):
        b, s, h, d = shape
        return torch.empty(s, b, h, d, dtype=x.dtype, device=x.device).transpose(0, 1)
    return torch.empty(shape, dtype=x.dtype, device=x.device)


def _bhsd(*tensors: Tensor) -> tuple[Tensor, ...]:
    """``[b, s, h, d]`` tensors as the ``[b, h, s, d]`` views the graphs declare (the same
    memory; the buffers then describe themselves as the graph does)."""
    return tuple(x.transpose(1, 2) for x in tensors)


def _device_index(x: Tensor) -> int:
    return x.device.index if x.device.index is not None else torch.cuda.current_device()


_support_warned = False


@functools.cache
def _supported(device_index: int, dtype: torch.dtype) -> bool:
    """Build and run a small banded and a small ragged forward and backward once: whether
    this frontend and cuDNN backend serve this device; warns once when they do not."""
    global _support_warned
    try:
        _check_kernel_runs(device_index, dtype)
    except Exception as error:  # noqa: BLE001 - any failure means: not usable here
        if not _support_warned:
            _support_warned = True
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            warnings.warn(
                f"usp_megatron: attention backend 'cudnn' is unavailable on cuda:{device_index} "
                f"({torch.cuda.get_device_name(device_index)}): the cuDNN "
                f"{_versions_or_import_error()} failed to build or run a small attention graph "
                f"({type(error).__name__}: {first_line[:400]}); 'auto' and 'torch' use "
                "PyTorch's own attention ops instead",
                stacklevel=4,
            )
        return False
    return True


def _versions_or_import_error() -> str:
    try:
        return frontend_versions()
    except Exception as error:  # noqa: BLE001
        return f"frontend (import failed: {error})"


def _check_kernel_runs(device_index: int, dtype: torch.dtype) -> None:
    kernel, device = CudnnFrontendKernel(), torch.device("cuda", device_index)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, 128, 2, 64, generator=gen, device=device, dtype=dtype)
               for _ in range(3))  # fmt: skip
    documents = Documents((0, 64), (64, 64), (0, 64), (64, 64), causal=True)
    for mask in (BlockMask(-32, 0), BlockMask(documents=documents)):
        out, lse = kernel.forward(q, k, v, mask, 0.125)
        kernel.backward(out, q, k, v, out, lse, mask, 0.125)


class CudnnFrontendKernel:
    """The frontend's SDPA graphs (module doc): fp16/bf16 on CUDA; any band, packed
    documents, GQA/MQA without repeating heads."""

    name = "cudnn"
    takes_windows = True
    takes_documents = True

    def __init__(self) -> None:
        self._graphs = _GraphCache(GRAPH_CACHE_SIZE)
        self._plain = ReferenceKernel()

    def available(self, device: torch.device, dtype: torch.dtype) -> bool:
        """CUDA, fp16/bf16, ``cudnn`` importable, and a small graph built on this device
        (once; CUDA-only, so False on CPU)."""
        device = torch.device(device)
        if device.type != "cuda" or dtype not in _HALF or not frontend_importable():
            return False
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _supported(index, dtype)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: BlockMask, scale: float) -> Pair:
        """q: [b, sq, hq, d], k/v: [b, sk, hkv, d] -> (out [b, sq, hq, d], lse [b, hq, sq])."""
        if mask.documents is not None:
            return self._documents_forward(q, k, v, mask.documents, scale)
        b, sq, hq, d = q.shape
        if sq == 1 or k.shape[1] == 1:
            return self._plain.forward(q, k, v, mask, scale)
        band = cudnn_band(mask.lo, mask.hi, sq, k.shape[1])
        q, k, v = _operand(q), _operand(k), _operand(v)
        out = _empty_like_rows(q, (b, sq, hq, d))
        lse = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
        spec = ForwardSpec(
            q.dtype, bshd(q.shape, q.stride()), bshd(k.shape, k.stride()),
            bshd(v.shape, v.stride()), bshd(out.shape, out.stride()),
            Geometry((b, hq, sq, 1), (hq * sq, sq, 1, 1)), band, scale, False,
        )  # fmt: skip
        buffers = dict(zip(("q", "k", "v", "o"), _bhsd(q, k, v, out)), stats=lse.unsqueeze(-1))
        self._graphs.get(_device_index(q), spec).run(buffers)
        return out, lse

    def backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        mask: BlockMask,
        scale: float,
    ) -> Triple:
        """Gradients given the final ``out`` and ``lse`` [b, hq, sq] of the whole ring."""
        if mask.documents is not None:
            return self._documents_backward(dout, q, k, v, out, lse, mask.documents, scale)
        b, sq, hq, d = q.shape
        if sq == 1 or k.shape[1] == 1:
            return self._plain.backward(dout, q, k, v, out, lse, mask, scale)
        band = cudnn_band(mask.lo, mask.hi, sq, k.shape[1])
        q, k, v, out, dout = (_operand(x) for x in (q, k, v, out, dout))
        stats = lse.float().contiguous()  # cuDNN reads Stats as a packed [b, hq, sq, 1]
        dq, dk, dv = (_empty_like_rows(x, x.shape) for x in (q, k, v))
        spec = BackwardSpec(
            q.dtype, *(bshd(x.shape, x.stride()) for x in (q, k, v, out, dout)),
            Geometry((b, hq, sq, 1), (hq * sq, sq, 1, 1)),
            *(bshd(x.shape, x.stride()) for x in (dq, dk, dv)), band, scale, False, None,
        )  # fmt: skip
        roles = ("q", "k", "v", "o", "d_o", "dq", "dk", "dv")
        buffers = dict(zip(roles, _bhsd(q, k, v, out, dout, dq, dk, dv)), stats=stats.unsqueeze(-1))
        self._graphs.get(_device_index(q), spec).run(buffers)
        return dq, dk, dv

    # -- packed documents ------------------------------------------------------------------

    def _documents_forward(
        self, q: Tensor, k: Tensor, v: Tensor, documents: Documents, scale: float
    ) -> Pair:
        if q.shape[0] != 1:
            raise ValueError(f"packed documents need batch 1, got q of shape {tuple(q.shape)}")
        _, sq, hq, d = q.shape
        hkv = k.shape[2]
        q, k, v = _operand(q), _operand(k), _operand(v)
        tensors = document_tensors(documents, q.device)
        batch = tensors.batch
        out = torch.zeros(1, sq, hq, d, dtype=q.dtype, device=q.device)
        stats = torch.full((sq, hq), float("-inf"), dtype=torch.float32, device=q.device)
        n, mq, mk = batch.size, batch.max_q, batch.max_k
        spec = ForwardSpec(
            q.dtype, ragged(n, mq, hq, d, q.stride(1), q.stride(2)),
            ragged(n, mk, hkv, d, k.stride(1), k.stride(2)),
            ragged(n, mk, hkv, d, v.stride(1), v.stride(2)), ragged(n, mq, hq, d, hq * d, d),
            ragged(n, mq, hq, 1, hq, 1), Band(None, 0 if documents.causal else None), scale,
            True,
        )  # fmt: skip
        self._graphs.get(_device_index(q), spec).run(
            {"q": q, "k": k, "v": v, "o": out, "stats": stats.unsqueeze(-1),
             "q_lens": tensors.q_lens, "k_lens": tensors.k_lens,
             "q_offsets": tensors.offsets("q", q.stride(1)),
             "k_offsets": tensors.offsets("k", k.stride(1)),
             "v_offsets": tensors.offsets("k", v.stride(1)),
             "o_offsets": tensors.offsets("q", hq * d),
             "stats_offsets": tensors.offsets("q", hq)}
        )  # fmt: skip
        return out, stats.t().unsqueeze(0)  # [sq, hq] -> [1, hq, sq]

    def _documents_backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
        documents: Documents, scale: float,
    ) -> Triple:  # fmt: skip
        _, sq, hq, d = q.shape
        sk, hkv = k.shape[1], k.shape[2]
        # Each pair (q, dq), (k, dk), (v, dv), (o, dO) in one packed layout sharing ragged
        # offsets, as TransformerEngine runs THD backward graphs (strided inputs are copied;
        # the forward reads them in place).
        q, k, v, out, dout = (_operand(x.contiguous()) for x in (q, k, v, out, dout))
        stats = lse[0].float().t().contiguous()  # token-major [sq, hq], as the forward wrote
        tensors = document_tensors(documents, q.device)
        batch = tensors.batch
        dq = torch.zeros(1, sq, hq, d, dtype=q.dtype, device=q.device)
        dk, dv = (torch.zeros(1, sk, hkv, d, dtype=q.dtype, device=q.device) for _ in range(2))
        n, mq, mk = batch.size, batch.max_q, batch.max_k
        q_rows, kv_rows = ragged(n, mq, hq, d, hq * d, d), ragged(n, mk, hkv, d, hkv * d, d)
        spec = BackwardSpec(
            q.dtype, q_rows, kv_rows, kv_rows, q_rows, q_rows, ragged(n, mq, hq, 1, hq, 1),
            q_rows, kv_rows, kv_rows, Band(None, 0 if documents.causal else None), scale, True,
            (_round_up(max(sq, mq), 64), _round_up(max(sk, mk), 64)),
        )  # fmt: skip
        q_offsets, kv_offsets = tensors.offsets("q", hq * d), tensors.offsets("k", hkv * d)
        self._graphs.get(_device_index(q), spec).run(
            {"q": q, "k": k, "v": v, "o": out, "d_o": dout, "stats": stats.unsqueeze(-1),
             "dq": dq, "dk": dk, "dv": dv, "q_lens": tensors.q_lens, "k_lens": tensors.k_lens,
             "q_offsets": q_offsets, "o_offsets": q_offsets, "k_offsets": kv_offsets,
             "v_offsets": kv_offsets, "stats_offsets": tensors.offsets("q", hq)}
        )  # fmt: skip
        return dq, dk, dv
