#!/usr/bin/env bash
# train.compile: blocks on ONE GPU (at most about 9 minutes), from any directory:
#   bash scripts/gpu/compile.sh          # PY=... for another interpreter
# 1. inductor's Triton kernels equal eager: the quickstart's blocks and the tiny ViT, fp32
#    without TF32, three engine steps (receding h = 2, and back-propagation), gradients within
#    1e-5 relative; no graph compiled after the first step.
# 2. bench-compile single-process on the GPU (synthetic MNIST-shaped data, nothing to download):
#    step time eager vs compiled, the first step's compile seconds cold and cached.
# One line per check: PASS or FAIL; the exit code is 1 if one failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
fail=0

timeout 240 "${PY}" - <<'PYTHON' || fail=1
import copy

import torch

from mpc_dist.config import ModelConfig
from mpc_dist.core import ComputeOptions, EngineOptions, HorizonEngine, Plan
from mpc_dist.core.compile import CompileStats
from mpc_dist.models import build_model

torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
specs = {
    "quickstart": ModelConfig(name="residual_mlp", num_blocks=8, width=256, hidden=512),
    "vit_tiny": ModelConfig(name="vit_tiny", num_blocks=4, width=64, hidden=128, num_heads=4,
                            patch_size=7),
}
failed = False
for name, spec in specs.items():
    base = build_model(spec, (1, 28, 28), 10, seed=0).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    batches = [(torch.randn(128, 1, 28, 28, device="cuda", generator=g),
                torch.randint(0, 10, (128,), device="cuda", generator=g)) for _ in range(3)]
    for h in (2, spec.num_blocks):
        grads = {}
        for backend in (None, "inductor"):
            model = copy.deepcopy(base)
            options = EngineOptions(ComputeOptions(device_type="cuda", compile=backend))
            engine = HorizonEngine(model, Plan("receding", h, spec.num_blocks), options)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
            counts = []
            for x, y in batches:
                before = CompileStats.now()
                engine.train_microbatch(x, y)
                counts.append(CompileStats.now().since(before).graphs)
                grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()}
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        worst = max(
            float((grads["inductor"][n] - g).norm() / g.norm().clamp_min(1e-30))
            for n, g in grads[None].items()
        )
        ok = worst <= 1e-5 and all(c == 0 for c in counts[1:])
        failed |= not ok
        print(f"{'PASS' if ok else 'FAIL'}: {name} receding h={h}: inductor vs eager, largest "
              f"relative gradient difference {worst:.2e}; graphs compiled per step {counts}")
raise SystemExit(1 if failed else 0)
PYTHON

for config in ${CONFIGS:-quickstart vit_tiny_pipeline}; do
  if timeout 300 "${PY}" -m mpc_dist.cli bench-compile --config "configs/${config}.yaml" \
      --steps 60 --repeats 2 --set data.dataset=synthetic --set data.synthetic_size=16384 \
      --set train.device=cuda --set train.tf32=false; then
    echo "PASS: bench-compile ${config} on the GPU"
  else
    echo "FAIL: bench-compile ${config} on the GPU"
    fail=1
  fi
done
exit "${fail}"
