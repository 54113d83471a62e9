"""``train.compile: blocks``: compiled blocks train exactly as eager ones, compile once, and the
B/W split runs a compiled block's backward once. Pipelines (P = 2, sync and async, deferral,
checkpointing, FSDP) with compiled blocks are cells of tests/test_composability.py."""

from __future__ import annotations

import pytest
import torch
from helpers import grads, make_batch, make_model
from launching import TINY, mpc_dist, sets

from mpc_dist.config import ModelConfig, load_config
from mpc_dist.core import ComputeOptions, EngineOptions, HorizonEngine, Plan
from mpc_dist.core.compile import CompileStats, compile_blocks, is_compiled
from mpc_dist.core.deferral import input_backward, is_opaque
from mpc_dist.models import build_model
from mpc_dist.train import train
from mpc_dist.train.metrics import MetricsLogger

AOT = "aot_eager"  # dynamo + AOTAutograd without code generation: exact in float64


def train_steps(model, plan, compute, batches, lr=0.05):
    """Gradients of every step (SGD between them) and the compile counts of each step."""
    engine = HorizonEngine(model, plan, EngineOptions(compute=compute))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    per_step, compiled = [], []
    for x, y in batches:
        before = CompileStats.now()
        engine.train_microbatch(x, y)
        compiled.append(CompileStats.now().since(before))
        per_step.append(grads(model))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert engine.outstanding == 0
    return per_step, compiled, engine.memory.peak_bytes


@pytest.mark.parametrize("name", ["residual_mlp", "vit_tiny"])
def test_compiled_blocks_equal_eager_and_compile_in_the_first_two_steps(name):
    batches = [make_batch(seed=s) for s in range(3)]
    T = make_model(name).num_blocks
    for plan in (Plan("receding", 2, T), Plan("receding", T, T)):  # streams cross blocks; BP
        peaks = {}
        for checkpoint in (False, True):
            eager, _, _ = train_steps(
                make_model(name), plan, ComputeOptions(checkpoint_blocks=checkpoint), batches
            )
            compute = ComputeOptions(checkpoint_blocks=checkpoint, compile=AOT)
            model = make_model(name)
            got, compiled, peaks[checkpoint] = train_steps(model, plan, compute, batches)
            assert all(is_compiled(block) for block in model.blocks.values())
            for step, (a, b) in enumerate(zip(got, eager, strict=True)):
                assert a.keys() == b.keys()
                for key in a:
                    torch.testing.assert_close(
                        a[key],
                        b[key],
                        rtol=1e-12,
                        atol=1e-12,
                        msg=f"{name} {plan} step {step} {key}",
                    )
            assert all(c.graph_breaks == 0 for c in compiled), compiled
            assert all(c.graphs == 0 for c in compiled[2:]), f"recompiled: {compiled}"
        assert peaks[True] < peaks[False], peaks  # checkpointing still saves memory compiled


def test_identical_blocks_share_one_compiled_graph():
    torch._dynamo.reset()
    model = make_model("residual_mlp")  # 6 identical blocks, a stem and a head
    before = CompileStats.now()
    train_steps(model, Plan("receding", 6, 6), ComputeOptions(compile=AOT), [make_batch()])
    assert CompileStats.now().since(before).graphs == 3  # stem, one block graph, head


def test_deferred_weights_of_a_compiled_block_run_its_backward_once():
    """A compiled block is one opaque autograd node: the input pass takes the weight gradients
    in the same call, the weight pass adds them; the same gradients as without deferral."""
    model = make_model("residual_mlp")
    compile_blocks(model, AOT)
    leaf = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    params = model.block_parameters(2)
    out = model.block_forward(2, leaf)
    node = out.grad_fn
    assert is_opaque(node)
    calls = []
    node.register_hook(lambda grad_inputs, grad_outputs: calls.append(1))
    cotangent = torch.randn_like(out)
    grad, deferred = input_backward(out, cotangent, leaf, params)
    assert all(p.grad is None for p in params)
    deferred.run()
    assert len(calls) == 1
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    torch.autograd.backward(out, cotangent, inputs=[leaf, *params])
    torch.testing.assert_close(grad, leaf.grad, rtol=0, atol=0)
    for a, p in zip(got, params, strict=True):
        torch.testing.assert_close(a, p.grad, rtol=0, atol=0)


def test_inductor_compiled_blocks_equal_eager_in_float32(tmp_path, monkeypatch):
    """Inductor's generated kernels (C++ on CPU), once: float32 within 1e-6 relative."""
    import torch._inductor.config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # compile, not a cache hit
    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)  # no worker pool
    spec = ModelConfig(name="deep_linear", num_blocks=2, width=8)

    def model():
        return build_model(spec, (1, 8, 8), 10, seed=0)

    x, y = make_batch()
    batches = [(x.float(), y)] * 3
    plan = Plan("receding", 2, 2)
    eager, _, _ = train_steps(model(), plan, ComputeOptions(), batches)
    got, compiled, _ = train_steps(model(), plan, ComputeOptions(compile="inductor"), batches)
    assert compiled[0].graphs > 0 and all(c.graphs == 0 for c in compiled[1:]), compiled
    for a, b in zip(got, eager, strict=True):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)


def test_training_reports_compile_time_and_no_recompilation(tmp_path):
    config = load_config(
        None,
        [
            *TINY,
            f"run.out_dir={tmp_path}",
            "train.compile=blocks",
            "train.compile_backend=aot_eager",
            "train.max_steps=4",
            "data.num_microbatches=2",
        ],
    )
    summary = train(config)
    assert summary["compile, first step (s)"] > 0
    records = MetricsLogger.read(config.run_dir / "metrics.jsonl")
    compiles = [r for r in records if r["kind"] == "compile"]
    assert [r["step"] for r in compiles] == [1, 2, 4]
    final = compiles[-1]
    assert final["graphs_first_step"] > 0 and final["graph_breaks"] == 0
    assert final["recompiles_after_second_step"] == 0


@pytest.mark.multiprocess
def test_a_compiled_pipeline_reports_its_compilation_from_the_last_stage(tmp_path):
    """P = 2 through the launcher: the message groups wait as long as collectives while the
    first two steps compile, pipeline.timeout after them; the last stage logs what it compiled
    (no graph after the second step, no graph break)."""
    items = [*TINY, f"run.out_dir={tmp_path}", "run.name=p2", "train.compile=blocks",
             "train.compile_backend=aot_eager", "pipeline.stages=2"]  # fmt: skip
    result = mpc_dist("train", "--nproc", "2", *sets(*items), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = MetricsLogger.read(tmp_path / "p2" / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "compile"] == [1, 2, 4]
    final = [r for r in records if r["kind"] == "compile"][-1]
    assert final["graphs_first_step"] > 0 and final["compile_first_step_s"] > 0
    assert final["graph_breaks"] == 0 and final["recompiles_after_second_step"] == 0


def test_bench_engine_times_every_block_compiled_against_eager(capsys):
    """``mpc-dist bench-engine --compile``: a row per block (F/B/W eager and compiled) and
    engine steps both ways (the numbers are a benchmark's; here that they are measured)."""
    import argparse

    from mpc_dist.bench.engine_overhead import compare_compiled

    spec = ModelConfig(name="residual_mlp", num_blocks=3, width=8, hidden=8)
    model = build_model(spec, (1, 28, 28), 10)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    compare_compiled(model, x, y, argparse.Namespace(compile=AOT, blocks=3, repeats=1, steps=1))
    out = capsys.readouterr().err
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit()]
    assert [row[0] for row in rows] == ["0", "1", "2"], out
    assert all(float(row[-1]) > 0 for row in rows), out  # compiled / eager time ratio
    for name in ("eager receding h=2", "compiled receding h=2", "compiled receding h=3"):
        assert name in out, out
    assert "0 graph breaks" in out, out
