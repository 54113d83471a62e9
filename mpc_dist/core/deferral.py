"""Splitting a block's backward into an input-gradient part now and a weight-gradient part later,
without computing anything twice (zero-bubble pipelines' B/W split, for one block's graph).

The input pass runs autograd from the block's output to its input only. On its way it passes
the *branch nodes*: nodes on the input path with a child that leads to weights without leading
back to the input. Their incoming gradients are captured there. The weight pass later runs, for
each branch node, autograd from that node (with its captured gradient) to the weights it
reaches off the input path only, so no input-path product is computed again. A block that needs
no input gradient from a stream defers its whole weight backward. The block's graph is kept for
the other streams that cross it.

A compiled block (``ComputeOptions.compile``) is one opaque node in autograd's graph
(AOTAutograd's ``CompiledFunctionBackward``): its backward computes the gradients of all its
inputs, weights included, whatever a call asks for, so the split above would run it twice. There
the input pass takes the weight gradients too, in the same call, and keeps them until the weight
pass adds them into ``.grad``: one backward, as without deferral, at the memory of one
weight-gradient copy per deferred (stream, block) until its W action.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.autograd.graph import GradientEdge, Node


def grad_node(tensor: torch.Tensor) -> Node:
    """The node gradients for ``tensor`` flow into: its grad_fn, or a leaf's AccumulateGrad."""
    if tensor.grad_fn is not None:
        return tensor.grad_fn
    return tensor.view_as(tensor).grad_fn.next_functions[0][0]


@dataclass
class DeferredWeights:
    """What the weight pass of one (stream, block) needs."""

    # per branch node: its edges with captured gradients, and the weights it reaches
    branches: list[tuple[list[GradientEdge], list[torch.Tensor], list[torch.Tensor]]] = field(
        default_factory=list
    )
    whole: tuple[torch.Tensor, torch.Tensor, list] | None = None  # output, cotangent, weights
    computed: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (w, dl/dw)

    def run(self) -> None:
        """Accumulate the weight gradients into ``.grad``; the graph is kept for other streams."""
        for param, grad in self.computed:
            param.grad = grad if param.grad is None else param.grad + grad
        if self.whole is not None:
            output, cotangent, params = self.whole
            torch.autograd.backward(output, cotangent, inputs=params, retain_graph=True)
        for edges, grads, params in self.branches:
            for param, grad in zip(
                params, torch.autograd.grad(edges, params, grads, retain_graph=True), strict=True
            ):
                param.grad = grad if param.grad is None else param.grad + grad


def input_backward(
    output: torch.Tensor, cotangent: torch.Tensor, leaf: torch.Tensor, params: list
) -> tuple[torch.Tensor, DeferredWeights]:
    """dl/d(leaf) now, and the weight part of the same backward for later."""
    by_node = {grad_node(p): p for p in params}
    branches = _branch_nodes(grad_node(output), grad_node(leaf), set(by_node))
    if any(is_opaque(node) for node in branches):
        grad, *weight_grads = torch.autograd.grad(
            output, [leaf, *params], cotangent, retain_graph=True, allow_unused=True
        )
        computed = [(p, g) for p, g in zip(params, weight_grads, strict=True) if g is not None]
        return grad, DeferredWeights(computed=computed)
    captured: dict[Node, tuple] = {}
    handles = [
        node.register_prehook(lambda grads, node=node: captured.__setitem__(node, grads))
        for node in branches
    ]
    try:
        (grad,) = torch.autograd.grad(output, leaf, cotangent, retain_graph=True)
    finally:
        for handle in handles:
            handle.remove()
    deferred = DeferredWeights()
    for node, weights in branches.items():
        edges = [
            (GradientEdge(node, i), g)
            for i, g in enumerate(captured.get(node, ()))
            if g is not None
        ]
        if edges:
            deferred.branches.append(
                ([e for e, _ in edges], [g for _, g in edges], [by_node[w] for w in weights])
            )
    return grad, deferred


def is_opaque(node: Node) -> bool:
    """A compiled region's backward node: it computes every input's gradient on each call."""
    return type(node).__name__.startswith("CompiledFunction")


def _branch_nodes(top: Node, input_node: Node, param_nodes: set[Node]) -> dict[Node, list[Node]]:
    """Branch nodes under ``top``, each with the weight nodes it reaches off the input path."""
    children: dict[Node, list[Node]] = {}
    stack = [top]
    while stack:
        node = stack.pop()
        if node not in children:
            children[node] = [child for child, _ in node.next_functions if child is not None]
            stack.extend(children[node])
    order: list[Node] = []  # children before parents (the graph is a DAG)
    done: set[Node] = set()
    todo: list[tuple[Node, bool]] = [(top, False)]
    while todo:
        node, expanded = todo.pop()
        if expanded:
            order.append(node)
        elif node not in done:
            done.add(node)
            todo.append((node, True))
            todo.extend((child, False) for child in children[node])
    reaches_input: dict[Node, bool] = {}
    weights_off_path: dict[Node, set[Node]] = {}  # weights reachable without the input path
    for node in order:
        kids = children[node]
        reaches_input[node] = node is input_node or any(reaches_input[k] for k in kids)
        own = {node} if node in param_nodes else set()
        weights_off_path[node] = own.union(
            *(weights_off_path[k] for k in kids if not reaches_input[k])
        )
    branches = {}
    for node in order:
        if reaches_input[node]:
            weights = set().union(
                *(weights_off_path[k] for k in children[node] if not reaches_input[k])
            )
            if weights:
                branches[node] = sorted(weights, key=id)
    return branches
