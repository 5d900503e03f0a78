"""Where Q/DQ pairs go: TensorRT's placement rules for explicit INT8, as a plan over an ONNX graph.

A plan is a set of *edges* (an activation tensor and one consumer input that reads it
through a DequantizeLinear) plus the weights to quantize; :mod:`calibration.qdq_insert`
writes it and :mod:`calibration.qdq` chooses the scales. Placing Q/DQ per consumer input,
not per tensor, is what lets one tensor be INT8 for a Conv and stay float for the Conv
side of a residual Add.

Rules of ``"tensorrt"`` placement (TensorRT developer guide, "Q/DQ Layer-Placement
Recommendations"; NVIDIA ModelOpt's ONNX INT8 placement does the same):

1. Weighted ops (``op_types``, default Conv, ConvTranspose, Gemm, MatMul): every
   activation input gets Q/DQ, weights per output channel (ConvTranspose: axis 0, the
   axis TensorRT's deconvolution kernels take), biases never. No Q/DQ on their outputs,
   so nothing sits between a Conv and the BatchNormalization / Relu / Clip / Sigmoid*x
   that TensorRT fuses into it.
2. Residual Add: an Add one of whose inputs is a Conv (or ConvTranspose) output, through
   at most BatchNormalization / Relu / Clip / constant Add or Mul / x*Sigmoid(x), each
   tensor on the way read by nothing else, is a Conv+Add fusion. Its *other* (skip)
   input gets Q/DQ and the Conv-side input stays float: the precision of the skip input
   decides whether the fused Conv writes INT8. When both inputs come from such Convs
   (ResNet's downsample block), the Conv further from the two branches' nearest common
   ancestor is the fused one and the other branch (the shortcut) is quantized; a tie
   quantizes input 0. An Add whose Conv is excluded is not a fusion and gets nothing.
3. Concat: when its output gets Q/DQ, every activation input gets Q/DQ too and all of
   them (output included, transitively through chained Concats and shared tensors) form
   one group that gets one scale, so TensorRT can drop the requantization at the Concat
   (its Q/DQ rewrites only fire between equal scales). The group's amax is the largest
   amax among the Concat inputs of the group (the output holds exactly those values).
4. Pooling: AveragePool / GlobalAveragePool do not commute with quantization; TensorRT
   runs them in INT8 only fused with a DQ input and a Q output. Their input gets Q/DQ
   when their output gets Q/DQ, directly or through Flatten / Reshape / Squeeze /
   Unsqueeze (which TensorRT moves a Q across). MaxPool commutes with Q and DQ:
   TensorRT moves the consumer's Q ahead of it, so it gets no Q/DQ of its own.

``"inputs"`` placement is the earlier rule: Q/DQ on the activation inputs of
``op_types`` and *every* consumer of such a tensor reads the DQ, as onnxruntime's
QDQQuantizer writes it (weights as in rule 1; onnxruntime >= 1.18 itself would put a
ConvTranspose's weight scales on axis 1, which TensorRT does not take).

``exclude_nodes`` (names or fnmatch globs) removes Q/DQ from the inputs of those nodes:
they stay in float, for precision tuning.
"""

from __future__ import annotations

import fnmatch
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

from calibration.collect import QUANTIZABLE_OP_TYPES
from calibration.errors import CalibrationError

PLACEMENTS = ("tensorrt", "inputs")
FLOAT32 = 1  # onnx.TensorProto.FLOAT
OTHER_FLOATS = {10: "float16", 11: "float64", 16: "bfloat16"}

#: ops between a Conv and a residual Add that TensorRT fuses into the Conv
EPILOGUE_OPS = ("BatchNormalization", "Relu", "Clip", "LeakyRelu")
#: binary ops that fuse as an epilogue when their other input is a constant
CONST_EPILOGUE_OPS = ("Add", "Mul", "Sub", "Div")
BACKBONE_OPS = ("Conv", "ConvTranspose")
POOL_OPS = ("AveragePool", "GlobalAveragePool")
#: shape-only ops TensorRT moves a Q across (between a pool and its quantized consumer)
COPY_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze")


# -- graph index ------------------------------------------------------------------------------
@dataclass
class GraphIndex:
    """Producers, consumers and kinds of every tensor of a graph (nodes by name)."""

    nodes: list[Any]
    by_name: dict[str, Any]
    producer: dict[str, Any]
    consumers: dict[str, list[tuple[Any, int]]]
    initializers: dict[str, int]  # name -> rank
    const: set[str]
    types: dict[str, int]
    graph_outputs: set[str]

    @classmethod
    def build(cls, model: Any) -> "GraphIndex":
        from calibration.collect import _constant_tensors, _element_types

        graph = model.graph
        producer: dict[str, Any] = {}
        consumers: dict[str, list[tuple[Any, int]]] = {}
        for node in graph.node:
            for out in node.output:
                if out:
                    producer[out] = node
            for i, name in enumerate(node.input):
                if name:
                    consumers.setdefault(name, []).append((node, i))
        return cls(nodes=list(graph.node), by_name={n.name: n for n in graph.node}, producer=producer,
                   consumers=consumers, initializers={i.name: len(i.dims) for i in graph.initializer},
                   const=_constant_tensors(model), types=_element_types(model),
                   graph_outputs={o.name for o in graph.output})

    def is_activation(self, name: str) -> bool:
        """A float32 tensor computed from the graph inputs (or a float32 graph input)."""
        return bool(name) and name not in self.const and self.types.get(name, FLOAT32) == FLOAT32

    def only_consumer(self, name: str) -> Optional[Any]:
        """The single node reading ``name``, or None when it has several readers or is a graph output."""
        readers = self.consumers.get(name, [])
        if len(readers) != 1 or name in self.graph_outputs:
            return None
        return readers[0][0]


def name_nodes(model: Any) -> dict[int, str]:
    """Give every unnamed or duplicate-named node a unique name (``<op_type>_<index>``), in
    place: placement reports and exclusions are keyed by node name. Returns ``{node index:
    new name}`` for the nodes renamed (torch exports name every node uniquely: none)."""
    seen: set[str] = set()
    taken = {n.name for n in model.graph.node if n.name}
    renamed: dict[int, str] = {}
    for i, node in enumerate(model.graph.node):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = f"{node.op_type}_{i}"
        name, k = base, 1
        while name in taken or name in seen:
            name, k = f"{base}_{k}", k + 1
        node.name = name
        seen.add(name)
        taken.add(name)
        renamed[i] = name
    return renamed


def resolve_excludes(patterns: Iterable[str], names: Sequence[str]) -> list[str]:
    """Node names matched by ``patterns`` (exact names or fnmatch globs, case-sensitive), in
    graph order. A pattern that matches no node is an error naming it."""
    if isinstance(patterns, str):
        patterns = [patterns]
    chosen: set[str] = set()
    unmatched: list[str] = []
    known = set(names)
    for pattern in patterns:
        hits = [pattern] if pattern in known else [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            unmatched.append(pattern)
        chosen.update(hits)
    if unmatched:
        sample = ", ".join(repr(n) for n in list(names)[:3])
        raise CalibrationError(f"exclude_nodes: {', '.join(repr(p) for p in unmatched)} match(es) no node of the model; "
                               f"use ONNX node names (e.g. {sample}) or fnmatch globs such as '/layer1/*'")
    return [n for n in names if n in chosen]


# -- the plan --------------------------------------------------------------------------------
@dataclass
class Placement:
    """What to quantize. ``edges``: activation tensor -> ``[(node name, input index)]`` that
    read it through its DequantizeLinear. ``weights``: ``(node name, input index,
    initializer, axis)`` (axis None: per tensor). The rest explains the plan."""

    rules: str
    edges: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    weights: list[tuple[str, int, str, Optional[int]]] = field(default_factory=list)
    residual_adds: list[dict[str, Any]] = field(default_factory=list)
    concat_groups: list[dict[str, Any]] = field(default_factory=list)
    pools: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    float_constants: list[dict[str, Any]] = field(default_factory=list)

    def add_edge(self, tensor: str, node: str, index: int) -> bool:
        uses = self.edges.setdefault(tensor, [])
        if (node, index) in uses:
            return False
        uses.append((node, index))
        return True

    def reads_dq(self, node: str, index: int, tensor: str) -> bool:
        return (node, index) in self.edges.get(tensor, ())

    def quantized_inputs(self, index: GraphIndex) -> dict[str, list[str]]:
        """``{node name: [input tensors it reads through a DQ]}`` (weights included), graph order."""
        marks: dict[str, dict[int, str]] = {}
        for tensor, uses in self.edges.items():
            for node, i in uses:
                marks.setdefault(node, {})[i] = tensor
        for node, i, weight, _ in self.weights:
            marks.setdefault(node, {})[i] = weight
        return {n.name: [marks[n.name][i] for i in sorted(marks[n.name])] for n in index.nodes if n.name in marks}

    def expected_precision(self, index: GraphIndex) -> dict[str, str]:
        """``"int8"`` for every node with a quantized input, ``"float"`` for the others."""
        marked = self.quantized_inputs(index)
        return {n.name: "int8" if n.name in marked else "float" for n in index.nodes}


def plan_placement(model: Any, *, rules: str = "tensorrt", op_types: Sequence[str] = QUANTIZABLE_OP_TYPES,
                   exclude_nodes: Iterable[str] = (), index: Optional[GraphIndex] = None) -> Placement:
    """The Q/DQ plan of ``model`` (nodes already named, constants folded) under ``rules``."""
    if rules not in PLACEMENTS:
        raise CalibrationError(f"unknown Q/DQ placement {rules!r}; use one of {', '.join(PLACEMENTS)}")
    index = index or GraphIndex.build(model)
    excluded = set(resolve_excludes(exclude_nodes, [n.name for n in index.nodes]))
    plan = Placement(rules=rules, excluded=[n.name for n in index.nodes if n.name in excluded])
    weighted = [n for n in index.nodes if n.op_type in op_types and n.name not in excluded]
    for node in weighted:
        _weighted_inputs(plan, index, node)
    if rules == "inputs":
        _every_consumer(plan, index, excluded)
        return plan
    quantized_convs = {n.name for n in weighted if n.op_type in BACKBONE_OPS}
    _residual_adds(plan, index, excluded, quantized_convs)
    _pools_and_concats(plan, index, excluded)
    return plan


def weight_axis(node: Any, input_index: int, rank: int) -> Optional[int]:
    """The per-channel axis of a weight: Conv output channels (0); ConvTranspose axis 0 (its
    input channels: TensorRT's deconvolution kernels take per-channel scales on axis 0
    only); Gemm's output features (0 with transB, else 1); MatMul's last axis. None (per
    tensor) for a constant first operand or a 1-D weight."""
    if input_index != 1 or rank < 2:
        return None
    if node.op_type in ("Conv", "ConvTranspose"):
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return rank - 1


def _weighted_inputs(plan: Placement, index: GraphIndex, node: Any) -> None:
    """Rule 1: activation inputs and weights of a weighted op (bias, Gemm's C, never)."""
    for i, name in enumerate(node.input[:2]):
        if not name:
            continue
        if name in index.initializers:
            plan.weights.append((node.name, i, name, weight_axis(node, i, index.initializers[name])))
        elif name in index.const:
            plan.float_constants.append({"node": node.name, "input": name,
                                         "why": "computed from constants by nodes, not an initializer: left float"})
        elif index.types.get(name, FLOAT32) in OTHER_FLOATS:
            raise CalibrationError(f"input {name!r} of {node.op_type} node {node.name!r} is "
                                   f"{OTHER_FLOATS[index.types[name]]}; Q/DQ export needs a float32 model: export in "
                                   f"FP32, or exclude the node (exclude_nodes)")
        elif index.is_activation(name):
            plan.add_edge(name, node.name, i)


def _every_consumer(plan: Placement, index: GraphIndex, excluded: set[str]) -> None:
    """``inputs`` rule: each quantized tensor is read through its DQ by all its consumers."""
    for tensor in list(plan.edges):
        for node, i in index.consumers.get(tensor, []):
            if node.name not in excluded:
                plan.add_edge(tensor, node.name, i)


# -- rule 2: residual Adds -------------------------------------------------------------------
def conv_backbone(index: GraphIndex, tensor: str) -> Optional[Any]:
    """The Conv whose output reaches ``tensor`` through ops TensorRT fuses into it (see
    :data:`EPILOGUE_OPS`, constant Add/Mul/Sub/Div, x*Sigmoid(x)), every tensor on the
    way read only by the next op; None when there is none."""
    current = tensor
    for _ in range(16):  # a Conv epilogue is a few ops long
        node = index.producer.get(current)
        if node is None:
            return None
        if node.op_type in BACKBONE_OPS:
            return node if index.only_consumer(node.output[0]) is not None else None
        nxt = _epilogue_input(index, node)
        if nxt is None:
            return None
        current = nxt
    return None


def _epilogue_input(index: GraphIndex, node: Any) -> Optional[str]:
    """The activation input of a fusible epilogue op whose output has one reader, else None."""
    if index.only_consumer(node.output[0]) is None:
        return None
    acts = [t for t in node.input if index.is_activation(t)]
    if node.op_type in EPILOGUE_OPS and acts and acts[0] == node.input[0]:
        return node.input[0]
    if node.op_type in CONST_EPILOGUE_OPS and len(acts) == 1:
        return acts[0]
    if node.op_type == "Mul" and len(acts) == 2:  # swish: x * Sigmoid(x)
        for x, s in ((acts[0], acts[1]), (acts[1], acts[0])):
            sig = index.producer.get(s)
            readers = {c.name for c, _ in index.consumers.get(x, [])}
            if sig is not None and sig.op_type == "Sigmoid" and sig.input[0] == x \
                    and index.only_consumer(s) is node and readers == {sig.name, node.name} \
                    and x not in index.graph_outputs:
                return x
    return None


def _ancestor_distances(index: GraphIndex, start: Any) -> dict[str, int]:
    """Hops from node ``start`` back to each tensor it depends on (graph inputs included;
    constants not), breadth first, so each distance is the shortest."""
    dist: dict[str, int] = {}
    queue = deque([(start, 0)])
    while queue:
        node, depth = queue.popleft()
        for name in node.input:
            if not name or name in index.const or name in dist:
                continue
            dist[name] = depth + 1
            parent = index.producer.get(name)
            if parent is not None:
                queue.append((parent, depth + 1))
    return dist


def fused_input(index: GraphIndex, conv0: Any, conv1: Any) -> int:
    """Which of an Add's two Conv-fed inputs TensorRT fuses with its Conv: the one whose
    Conv lies further from the branches' nearest common ancestor (the main path); the
    shorter branch is the shortcut. Ties (and no common ancestor) fuse input 1."""
    d0, d1 = _ancestor_distances(index, conv0), _ancestor_distances(index, conv1)
    common = set(d0) & set(d1)
    if not common:
        return 1
    lca = min(common, key=lambda t: (d0[t] + d1[t], t))  # the nearest common ancestor tensor
    return 0 if d0[lca] > d1[lca] else 1


def _residual_adds(plan: Placement, index: GraphIndex, excluded: set[str], quantized_convs: set[str]) -> None:
    """Rule 2: the skip input of every Conv+Add fusion whose Conv is quantized gets Q/DQ."""
    for node in index.nodes:
        if node.op_type != "Add" or node.name in excluded or len(node.input) != 2:
            continue
        if not all(index.is_activation(t) for t in node.input):
            continue
        convs = [conv_backbone(index, t) for t in node.input]
        convs = [c if c is not None and c.name in quantized_convs else None for c in convs]
        if convs[0] is None and convs[1] is None:
            continue
        if convs[0] is not None and convs[1] is not None:
            fused = fused_input(index, convs[0], convs[1])
        else:
            fused = 0 if convs[0] is not None else 1
        skip = 1 - fused
        plan.add_edge(node.input[skip], node.name, skip)
        plan.residual_adds.append({"node": node.name, "skip_input": node.input[skip], "skip_index": skip,
                                   "fused_input": node.input[fused], "fused_conv": convs[fused].name})


# -- rules 3 and 4: Concat groups, pooling ---------------------------------------------------
def _reaches_quantized(plan: Placement, index: GraphIndex, tensor: str) -> bool:
    """``tensor`` has Q/DQ, or reaches a tensor that has through single-reader copy ops."""
    for _ in range(16):
        if plan.edges.get(tensor):
            return True
        reader = index.only_consumer(tensor)
        if reader is None or reader.op_type not in COPY_OPS or reader.input[0] != tensor:
            return False
        tensor = reader.output[0]
    return False


def _pools_and_concats(plan: Placement, index: GraphIndex, excluded: set[str]) -> None:
    """Rules 3 and 4 to a fixed point (a pool may feed a Concat and a Concat a pool)."""
    pools = [n for n in index.nodes if n.op_type in POOL_OPS and n.name not in excluded
             and index.is_activation(n.input[0])]
    concats = [n for n in index.nodes if n.op_type == "Concat" and n.name not in excluded]
    changed = True
    while changed:
        changed = False
        for pool in pools:
            if not plan.reads_dq(pool.name, 0, pool.input[0]) and _reaches_quantized(plan, index, pool.output[0]):
                changed |= plan.add_edge(pool.input[0], pool.name, 0)
        for concat in reversed(concats):
            if plan.edges.get(concat.output[0]):
                for i, name in enumerate(concat.input):
                    if index.is_activation(name):
                        changed |= plan.add_edge(name, concat.name, i)
    plan.pools = [p.name for p in pools if plan.reads_dq(p.name, 0, p.input[0])]
    plan.concat_groups = _concat_groups(plan, index, [c for c in concats if plan.edges.get(c.output[0])])


def _concat_groups(plan: Placement, index: GraphIndex, concats: list[Any]) -> list[dict[str, Any]]:
    """Union of each quantized Concat's output and activation inputs (union-find), in graph
    order: ``{"concats", "tensors", "inputs"}``; ``inputs`` are the members whose amax
    decides the group's scale."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for concat in concats:
        out = concat.output[0]
        find(out)
        for name in concat.input:
            if index.is_activation(name):
                parent[find(name)] = find(out)
    groups: dict[str, dict[str, Any]] = {}
    for concat in concats:
        group = groups.setdefault(find(concat.output[0]), {"concats": [], "tensors": [], "inputs": []})
        group["concats"].append(concat.name)
        for name in [*concat.input, concat.output[0]]:
            if index.is_activation(name) and name not in group["tensors"]:
                group["tensors"].append(name)
        for name in concat.input:
            if index.is_activation(name) and name not in group["inputs"]:
                group["inputs"].append(name)
    return list(groups.values())


__all__ = ["PLACEMENTS", "GraphIndex", "Placement", "plan_placement", "name_nodes", "resolve_excludes",
           "conv_backbone", "fused_input", "weight_axis"]
