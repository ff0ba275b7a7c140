"""A symbolic trace of one training step, op by op, with PyTorch's autograd semantics.

The template builders (``build.py``) call the methods of :class:`Tracer` in the same order
as the Hugging Face ``forward`` they mirror.  Each call creates the tensors that real code
creates (a ``.to()`` to another dtype is a new storage, a view is not), propagates
``requires_grad`` exactly as autograd does, and records what the op saves for backward
(``tools/autograd/derivatives.yaml``: an operand is saved only when the gradient that
needs it is required).  FLOPs are recorded with the conventions of
``torch.utils.flop_counter`` (matmul-like ops only, 2 FLOPs per multiply-add).

Sizes are symbolic: a :class:`Poly` over the basis ``(T, K, A, B, S, Q, 1)`` where
``T = b*s`` query tokens, ``K = b*s_kv`` key tokens (prefix tokens included),
``A = b*s*s_kv`` score elements per head, ``B = b`` sequences, ``S = s`` positions
(batch-independent tensors such as RoPE's cos/sin of shape (1, s, d)), ``Q = s*s_kv``
(batch-independent position pairs, e.g. T5's relative-position buckets).  A compiled trace is
evaluated for any (b, s) with one dot product.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..units import dtype_bytes

BASIS = ("T", "K", "A", "B", "S", "Q", "1")
_N = len(BASIS)


def _unit(i: int, n: float) -> tuple[float, ...]:
    c = [0.0] * _N
    c[i] = float(n)
    return tuple(c)


@dataclass(frozen=True)
class Poly:
    """Linear combination of the basis monomials (T, K, A, B, S, Q, 1)."""

    c: tuple[float, ...] = (0.0,) * _N

    @staticmethod
    def tok(n: float) -> "Poly":
        """n per query token (b*s)."""
        return Poly(_unit(0, n))

    @staticmethod
    def kv(n: float) -> "Poly":
        """n per key token (b*s_kv)."""
        return Poly(_unit(1, n))

    @staticmethod
    def att(n: float) -> "Poly":
        """n per score element of one head (b*s*s_kv)."""
        return Poly(_unit(2, n))

    @staticmethod
    def seq(n: float) -> "Poly":
        """n per sequence (b)."""
        return Poly(_unit(3, n))

    @staticmethod
    def pos(n: float) -> "Poly":
        """n per position, batch-independent (s)."""
        return Poly(_unit(4, n))

    @staticmethod
    def pos2(n: float) -> "Poly":
        """n per (query, key) position pair, batch-independent (s*s_kv)."""
        return Poly(_unit(5, n))

    @staticmethod
    def const(n: float) -> "Poly":
        return Poly(_unit(6, n))

    def __add__(self, o: "Poly") -> "Poly":
        return Poly(tuple(a + b for a, b in zip(self.c, o.c)))

    def __mul__(self, k: float) -> "Poly":
        return Poly(tuple(a * k for a in self.c))

    __rmul__ = __mul__

    def at(self, basis: tuple[float, ...]) -> float:
        """Value for the basis values from :func:`basis` (7 multiply-adds: no numpy on the hot path)."""
        c, v = self.c, basis
        return c[0] * v[0] + c[1] * v[1] + c[2] * v[2] + c[3] * v[3] + c[4] * v[4] + c[5] * v[5] + c[6] * v[6]


ZERO = Poly()


def basis(b: float, s: float, s_kv: float | None = None) -> tuple[float, ...]:
    """Values of (T, K, A, B, S, Q, 1) for micro-batch b, query length s and key length s_kv.

    Works element-wise on numpy arrays too (``plan`` evaluates many setups at once)."""
    s_kv = s if s_kv is None else s_kv
    return (b * s, b * s_kv, b * s * s_kv, b, s, s * s_kv, 1.0)


@dataclass
class Tensor:
    id: int
    numel: Poly
    dtype: str
    requires_grad: bool
    module: str  # module path that created it
    is_param: bool = False
    weight_copy: bool = False  # a dequantized copy of a frozen weight: its traffic is the quantization's
    autocast_cached: bool = False  # autocast's cached lower-precision copy of a trainable fp32 leaf weight

    @property
    def nbytes(self) -> Poly:
        return self.numel * dtype_bytes(self.dtype)

    def part(self, numel: Poly) -> "Tensor":
        """A view of ``numel`` elements of this tensor's storage (a slice or chunk): the same storage id, so
        saving the view keeps the whole storage."""
        return Tensor(self.id, numel, self.dtype, self.requires_grad, self.module)


@dataclass(frozen=True)
class Param:
    path: str  # e.g. "model.layers.0.self_attn.q_proj.weight"
    numel: int
    dtype: str
    trainable: bool
    storage: str = "dense"  # dense | nf4 | fp4 | int8 | gptq | awq | fp8
    storage_bytes: float = 0.0  # bytes incl. quantization scales
    scale_bytes: float = 0.0  # of which quantization metadata
    tied_to: str | None = None  # shares storage with another parameter
    shape: tuple[int, ...] = ()  # 2-D shape of matrices (factored optimizers need it)
    linear: bool = False  # the weight of an nn.Linear (what GaLore projects)
    buffer: bool = False  # device-resident but not an nn.Parameter (no parameter count): e.g. SHiRA's indices


@dataclass
class OpRecord:
    module: str
    op: str
    fwd_flops: Poly = ZERO
    bwd_flops: Poly = ZERO
    fwd_bytes: Poly = ZERO  # bytes read + written (for the roofline)
    watermark: int = 0  # tensor ids below this existed when the op ran (its outputs come at or after it)
    aten: str = ""  # the ATen kernel selective checkpointing sees: mm | addmm | bmm | attention ('' for others)
    outputs: tuple[int, ...] = ()  # ids of the tensors it returns (what a selective checkpoint keeps)
    # float8 training: (input, weight, output) elements of a linear whose operands are cast to fp8 per pass
    fp8_cast: tuple[Poly, Poly, Poly] | None = None


@dataclass
class Trace:
    tensors: list[Tensor] = field(default_factory=list)
    params: list[Param] = field(default_factory=list)
    saves: list[tuple[str, int]] = field(default_factory=list)  # (module, tensor id)
    ops: list[OpRecord] = field(default_factory=list)
    transients: list[tuple[str, Poly]] = field(default_factory=list)  # (module, bytes) short-lived buffers
    extern_inputs: list[int] = field(default_factory=list)  # ids of activations a matmul / attention kernel reads


PROMOTE_ORDER = {"bool": 0, "uint8": 1, "int8": 1, "int32": 2, "int64": 3, "fp8": 4, "fp16": 5, "bf16": 5, "fp32": 7}


def promote(a: str, b: str) -> str:
    """torch type promotion for the float dtypes used here (bf16 + fp16 -> fp32)."""
    if a == b:
        return a
    if {a, b} == {"bf16", "fp16"}:
        return "fp32"
    return a if PROMOTE_ORDER[a] >= PROMOTE_ORDER[b] else b


class Tracer:
    """Records tensors, saved-for-backward sets and FLOPs while a template 'runs'.

    ``autocast``: the lower-precision dtype under ``torch.autocast`` (None when off).
    Linear/matmul/SDPA inputs are then cast to it (a new storage unless already that dtype);
    fp32 leaf weights are cast once per step and cached (``autocast_mode.cpp``), so the
    cached copy is one storage however often it is used.
    """

    def __init__(self, trace: Trace | None = None, autocast: str | None = None):
        self.trace = trace or Trace()
        self.autocast = autocast
        self._weight_cast_cache: dict[str, Tensor] = {}
        self.param_tensors: dict[str, Tensor] = {}
        self.all: dict[int, Tensor] = {}  # every tensor by id (ids are unique across traces)

    # -- primitives ------------------------------------------------------------------------
    def new(self, module: str, numel: Poly, dtype: str, requires_grad: bool) -> Tensor:
        t = Tensor(len(self.all), numel, dtype, requires_grad, module)
        self.trace.tensors.append(t)
        self.all[t.id] = t
        return t

    def param(self, p: Param) -> Tensor:
        """Register a parameter and return its tensor (parameters are never counted as saved)."""
        if p.tied_to is not None and p.tied_to in self.param_tensors:
            self.trace.params.append(p)
            t = self.param_tensors[p.tied_to]
            self.param_tensors[p.path] = t
            return t
        self.trace.params.append(p)
        t = Tensor(len(self.all), Poly.const(p.numel), p.dtype, p.trainable, p.path, is_param=True)
        self.trace.tensors.append(t)
        self.all[t.id] = t
        self.param_tensors[p.path] = t
        return t

    def save(self, module: str, *ts: Tensor | None) -> None:
        for t in ts:
            if t is not None and not t.is_param:
                self.trace.saves.append((module, t.id))

    def flops(self, module: str, op: str, fwd: Poly, bwd: Poly = ZERO, fwd_bytes: Poly = ZERO, *, aten: str = "",
              outputs: tuple[int, ...] = ()) -> None:
        self.trace.ops.append(OpRecord(module, op, fwd, bwd, fwd_bytes, len(self.all), aten, outputs))

    def reads(self, *ts: Tensor | None) -> None:
        """``ts`` are operands of a matmul / attention kernel: activations among them are written to memory
        whatever fuses around them (parameters are there anyway)."""
        for t in ts:
            if t is not None and not t.is_param:
                self.trace.extern_inputs.append(t.id)

    def returns(self, out: Tensor) -> Tensor:
        """Name ``out`` as what the last recorded op returns (its output is created after the record)."""
        op = self.trace.ops[-1]
        op.outputs = (out.id,)
        return out

    def transient(self, module: str, nbytes: Poly) -> None:
        self.trace.transients.append((module, nbytes))

    # -- dtype handling --------------------------------------------------------------------
    def cast(self, module: str, x: Tensor, dtype: str) -> Tensor:
        """``x.to(dtype)``: the same tensor when the dtype matches, else a new storage (saves nothing)."""
        if x.dtype == dtype:
            return x
        return self.new(module, x.numel, dtype, x.requires_grad)

    def autocast_in(self, module: str, x: Tensor) -> Tensor:
        """Input cast of an op on autocast's lower-precision list."""
        if self.autocast is None or x.dtype not in ("fp32", "fp16", "bf16"):
            return x
        if x.is_param:
            key = str(x.id)
            if key not in self._weight_cast_cache:
                c = self.cast(module, x, self.autocast)
                if c is not x:
                    c.requires_grad = x.requires_grad
                    # autocast_mode.cpp caches casts of leaves that require grad, whatever the grad mode
                    c.autocast_cached = x.requires_grad
                self._weight_cast_cache[key] = c
            return self._weight_cast_cache[key]
        return self.cast(module, x, self.autocast)

    # -- elementwise -----------------------------------------------------------------------
    def mul(self, module: str, a: Tensor, b: Tensor | None, *, out_numel: Poly | None = None) -> Tensor:
        """``a * b`` (b=None: multiply by a Python scalar, saves nothing).

        mul saves ``b`` if ``a`` needs grad and ``a`` if ``b`` needs grad.
        """
        if b is None:
            return self.new(module, a.numel, a.dtype, a.requires_grad)
        if a.requires_grad:
            self.save(module, b)
        if b.requires_grad:
            self.save(module, a)
        numel = out_numel or (a.numel if a.numel.c >= b.numel.c else b.numel)
        return self.new(module, numel, promote(a.dtype, b.dtype), a.requires_grad or b.requires_grad)

    def add(self, module: str, a: Tensor, b: Tensor) -> Tensor:
        """``a + b``: saves nothing."""
        numel = a.numel if a.numel.c >= b.numel.c else b.numel
        return self.new(module, numel, promote(a.dtype, b.dtype), a.requires_grad or b.requires_grad)

    def unary_saving_input(self, module: str, x: Tensor, op: str) -> Tensor:
        """silu / gelu / relu-like ops whose backward reads their input (relu reads its output: same size)."""
        if x.requires_grad:
            self.save(module, x)
        return self.new(module, x.numel, x.dtype, x.requires_grad)

    def relu(self, module: str, x: Tensor) -> Tensor:
        """relu, tanh and sigmoid save their output (``threshold_backward(grad, result, 0)``,
        ``tanh_backward(grad, result)``, ``sigmoid_backward(grad, result)``)."""
        out = self.new(module, x.numel, x.dtype, x.requires_grad)
        if x.requires_grad:
            self.save(module, out)
        return out

    tanh = relu
    sigmoid = relu

    def dropout(self, module: str, x: Tensor, p: float) -> Tensor:
        """Training dropout: a bool mask (1 B/element) is saved; p = 0 is the identity."""
        if p <= 0:
            return x
        mask = self.new(module, x.numel, "bool", False)
        if x.requires_grad:
            self.save(module, mask)
        return self.new(module, x.numel, x.dtype, x.requires_grad)

    # -- matmuls ---------------------------------------------------------------------------
    def matmul(self, module: str, x: Tensor, w: Tensor, in_f: int, out_f: int, *, op: str = "linear",
               bias: Tensor | None = None, tokens: Poly | None = None, autocast: bool = True,
               detached: bool = False, fp8_cast: bool = False) -> Tensor:
        """``F.linear(x, w, bias)`` with x of ``tokens`` rows (default: x.numel / in_f).

        Saves x if w needs grad (for dW) and w if x needs grad (for dX; a parameter, so no
        extra memory unless it is an autocast copy).  ``detached``: the result is only used
        detached, so its graph is recorded (and holds its saved tensors) but never run backward.  ``fp8_cast``:
        a float8 training linear, which casts its input and weight (and, backward, its output's gradient) to fp8
        around the ``_scaled_mm`` (the op records their elements; the matmul keeps the 16-bit tensors).  FLOPs per flop_counter: 2*rows*in*out
        forward; backward 2*rows*in*out for dX (if x needs grad) plus the same for dW (if w needs grad).
        """
        rows = tokens if tokens is not None else x.numel * (1.0 / in_f)
        xin = self.autocast_in(module, x) if autocast else x
        win = self.autocast_in(module, w) if autocast else w
        self.reads(xin, win)
        if win.requires_grad:
            self.save(module, xin)
        if xin.requires_grad:
            self.save(module, win)
        mm = rows * (2.0 * in_f * out_f)
        bwd = ZERO
        if xin.requires_grad and not detached:
            bwd = bwd + mm
        if win.requires_grad and not detached:
            bwd = bwd + mm
        out_dtype = promote(xin.dtype, win.dtype) if (self.autocast is None or not autocast) else self.autocast
        if bias is not None:
            out_dtype = promote(out_dtype, bias.dtype) if self.autocast is None else out_dtype
        rg = xin.requires_grad or win.requires_grad or (bias is not None and bias.requires_grad)
        nb = dtype_bytes(xin.dtype)
        # recorded before its output exists: the op's watermark is its output's id (what checkpoint recompute
        # compares with the last saved tensor)
        # F.linear: addmm with a bias, mm without (the matmul of a 3-D input folds it to 2-D)
        self.flops(module, op, mm, bwd, rows * (nb * (in_f + out_f)) + Poly.const(in_f * out_f * dtype_bytes(win.dtype)),
                   aten="addmm" if bias is not None else "mm")
        if fp8_cast:
            self.trace.ops[-1].fp8_cast = (rows * in_f, Poly.const(in_f * out_f), rows * out_f)
        return self.returns(self.new(module, rows * out_f, out_dtype, rg))
