"""The language's elementwise primitives: arithmetic, comparisons and math functions.

One table for every part of the compiler and runtime that needs to know them: the
builder (which names are math functions, how many arguments each takes), the emitter
(node names), the IR's arithmetic nodes (the port of each operand), ``explain`` and
``diff`` (how a node reads as text), and ``docs/ops.md``.

An arithmetic node (``Kind.ARITH``) holds one primitive; its operands sit on the ports
of :data:`PORTS`, each either an input edge (a signal) or an argument (a scalar).
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["BINARY", "COMPARISONS", "FUNCTIONS", "MATRIX", "REDUCTIONS", "REDUCE_IDS", "SCOPES", "SHAPES", "PORTS", "NODE_NAMES",
           "SUMMARIES", "is_mask_op", "is_matrix", "is_reduction", "is_shape", "per_tensor", "text"]

#: infix operators on numbers, lowest precedence group last: ``+ - * / % **``
BINARY = ("+", "-", "*", "/", "%", "**")
#: comparisons: a mask (per element) or a boolean (two scalars)
COMPARISONS = ("<", "<=", ">", ">=", "==", "!=")

#: the math functions and how many arguments each takes
FUNCTIONS: dict[str, int] = {
    "abs": 1, "sign": 1, "sqrt": 1, "exp": 1, "log": 1,
    "max": 2, "min": 2, "clamp": 3, "where": 3,
    "matmul": 2, "transpose": 1, "eigvecs": 1, "qr": 1, "matrix_power": 3, "descending": 1,
}

#: the matrix functions (a subset of ``FUNCTIONS``): they act on each parameter's matrix view (a
#: tensor of more than two dimensions as ``(shape[0], -1)``), so they run tensor by tensor, and
#: their value may have another shape than the parameter (``matmul(g, transpose(g))`` is m×m)
MATRIX: dict[str, int] = {"matmul": 2, "transpose": 1, "eigvecs": 1, "qr": 1, "matrix_power": 3, "descending": 1}
#: the operands of each matrix function that are matrices (signals); the others are numbers
MATRIX_OPERANDS: dict[str, tuple[str, ...]] = {"matmul": ("lhs", "rhs"), "matrix_power": ("lhs",)}

#: the reductions, by the name a user writes, and how many operands each takes (``mean(x, over=tensor)``);
#: ``max``, ``min`` and ``rms`` are also a math function or an op: with ``over=`` they are the reduction
REDUCTIONS: dict[str, int] = {"sum": 1, "mean": 1, "norm": 1, "rms": 1, "max": 1, "min": 1, "dot": 2}
#: the primitive (``Kind.ARITH`` op) of each reduction: ``max`` and ``min`` are taken by the elementwise functions
REDUCE_IDS: dict[str, str] = {**{r: r for r in REDUCTIONS}, "max": "amax", "min": "amin"}
#: the scopes of ``over=``: one value per tensor, over the route, per row, per column
SCOPES = ("tensor", "global", "rows", "cols")
#: the shape values, one number per parameter tensor: ``numel``, ``rows`` (size of dim -2), ``cols`` (dim -1), ``ndim``
SHAPES = ("numel", "rows", "cols", "ndim")

#: the ports of each primitive's operands, in argument order
PORTS: dict[str, tuple[str, ...]] = {
    **{op: ("lhs", "rhs") for op in BINARY + COMPARISONS},
    "neg": ("lhs",),
    **{f: ("lhs",) for f, n in FUNCTIONS.items() if n == 1},
    "max": ("lhs", "rhs"), "min": ("lhs", "rhs"), "matmul": ("lhs", "rhs"), "matrix_power": ("lhs", "power", "eps"),
    "clamp": ("lhs", "lo", "hi"),
    # ``like`` (optional): for a mask choosing between two scalars, a signal to take the dtype from
    "where": ("cond", "lhs", "rhs", "like"),
    # a reduction's scope is a word on the ``over`` port (an argument, never a signal)
    **{REDUCE_IDS[r]: ("lhs", "rhs", "over") if n == 2 else ("lhs", "over") for r, n in REDUCTIONS.items()},
    **{s: () for s in SHAPES},
    # a per-tensor value (a reduction's, a shape value) expanded to the parameter's shape, where an op needs one
    "broadcast": ("lhs",),
}

#: the node name of each primitive (``main/mul``, ``main/lt``, ``main/where``)
NODE_NAMES: dict[str, str] = {
    "+": "add", "-": "sub", "*": "mul", "/": "div", "%": "mod", "**": "pow", "neg": "neg",
    "<": "lt", "<=": "le", ">": "gt", ">=": "ge", "==": "eq", "!=": "ne",
    **{f: f for f in FUNCTIONS},
    **{i: r for r, i in REDUCE_IDS.items()}, **{s: s for s in SHAPES}, "broadcast": "broadcast",
}
_REDUCTION_OF = {i: r for r, i in REDUCE_IDS.items()}

#: one line per math function and operator, for ``docs/ops.md``
SUMMARIES: dict[str, str] = {
    "abs(x)": "|x|, elementwise",
    "sign(x)": "-1, 0 or 1 by the sign of x (sign(0) = 0); as a stage, the op `sign`",
    "sqrt(x)": "the square root of x (a constant must be >= 0)",
    "exp(x)": "e to the power x",
    "log(x)": "the natural logarithm of x (a constant must be > 0)",
    "max(a, b)": "the larger of a and b, elementwise (NaN if either is NaN)",
    "min(a, b)": "the smaller of a and b, elementwise (NaN if either is NaN)",
    "clamp(x, lo, hi)": "min(max(x, lo), hi)",
    "where(cond, a, b)": "a where cond holds, else b; cond is a mask or a boolean (a comparison)",
    "matmul(a, b)": "the matrix product of a and b, per parameter tensor; a signal of the parameter's shape is its "
                    "matrix view (a tensor of more than two dimensions as (shape[0], -1)); "
                    "matmul(g, transpose(g)) is G Gᵀ (m×m)",
    "transpose(x)": "the transpose of x's matrix view, per parameter tensor (n×m for an m×n parameter)",
    "eigvecs(a)": "the eigenvectors of the symmetric matrix a (torch.linalg.eigh), as the columns of an orthogonal "
                  "matrix, by decreasing eigenvalue",
    "descending(v)": "the permutation matrix P (k×k) that orders the k elements of v (a row or a column, e.g. "
                     "a reduction over cols) by decreasing value: matmul(v, P) is v sorted; matmul(a, P) reorders "
                     "a's columns, matmul(transpose(P), a) its rows (SOAP's eigenvalue order)",
    "qr(a)": "the orthonormal factor Q of a = Q R (torch.linalg.qr, reduced): an orthonormal basis of a's columns",
    "matrix_power(a, p, eps)": "(a + eps I) ** p for the symmetric matrix a, from its eigendecomposition: "
                               "V diag((λ + eps) ** p) Vᵀ (|λ + eps|, as an SVD gives); Shampoo's inverse roots",
    "a < b, <=, >, >=, ==, !=": "a mask (per element) if a side is a signal, a boolean if both are scalars",
    "sum(x, over=S)": "the sum of x; S (required) is tensor (one value per parameter tensor), global (over every "
                      "tensor of the route, as one flat vector), rows (per row: the last dim) or cols (per column: "
                      "dim -2)",
    "mean(x, over=S)": "the mean of x over scope S (see sum)",
    "norm(x, over=S)": "the L2 norm sqrt(sum(x^2)) over scope S",
    "rms(x, over=S)": "sqrt(mean(x^2)) over scope S; without over= it is the op rms (RMSprop)",
    "max(x, over=S)": "the largest element over scope S; max(a, b) is elementwise",
    "min(x, over=S)": "the smallest element over scope S; min(a, b) is elementwise",
    "dot(a, b, over=S)": "sum(a * b, over=S)",
    "numel, ndim": "the parameter's number of elements, its number of dimensions (per tensor)",
    "rows, cols": "the parameter's size in dim -2 and dim -1 (per tensor; a parameter of fewer than 2 dims is an "
                  "error)",
    "a % b": "remainder with the sign of b (Python's %): on scalars, whole numbers only; on signals, "
             "torch.remainder",
    "previous(x), previous(x, init)": "the value x had in the previous step (init, 0 by default, before the "
                                      "first): a state cell; `state NAME = init then update` declares one "
                                      "(docs/language.md 4.7)",
    "grad_at(point)": "the gradient of the loss with every parameter of the route set to point (a signal of the "
                      "parameter's shape, computed without state), by a second call of the step's closure; the "
                      "parameters are restored bit for bit before the update (SAM: pipelines/sam_sgd.grad; "
                      "docs/language.md 5.14)",
}


def is_mask_op(op: str) -> bool:
    """Whether the primitive's value is a mask or a boolean rather than a number."""
    return op in COMPARISONS


def is_matrix(op: str) -> bool:
    """Whether the primitive is a matrix function (``matmul``, ``transpose``)."""
    return op in MATRIX


def is_reduction(op: str) -> bool:
    """Whether the primitive is a reduction (``sum``, ``mean``, ``amax``...: ``REDUCE_IDS``'s values)."""
    return op in _REDUCTION_OF


def is_shape(op: str) -> bool:
    """Whether the primitive is a shape value (``numel``, ``rows``, ``cols``, ``ndim``)."""
    return op in SHAPES


def per_tensor(op: str, over: object = None) -> bool:
    """Whether a primitive computes one value per parameter tensor, row or column (a shape value, or a
    reduction over ``tensor``, ``rows`` or ``cols``, given as ``over``), so it runs tensor by tensor."""
    return op in SHAPES or op in MATRIX or (op in _REDUCTION_OF and over != "global")


def text(op: str, operands: Sequence[str]) -> str:
    """How a primitive applied to ``operands`` reads: ``a * b``, ``-a``, ``clamp(x, lo, hi)``,
    ``mean(x, over=tensor)``, ``numel``."""
    if op in _REDUCTION_OF:
        return f"{_REDUCTION_OF[op]}({', '.join(operands[:-1])}, over={operands[-1]})"
    if op in SHAPES:
        return op
    if op == "where":
        operands = operands[:3]
    if op == "neg":
        return f"-{operands[0]}"
    if op in BINARY or op in COMPARISONS:
        return f"{operands[0]} {op} {operands[1]}"
    return f"{op}({', '.join(operands)})"
