"""kubetune's CPU kernels against what they replace, in one run.

**Causal attention backward**: kubetune's kernel against torch's flash-attention backward. Both
get the same bf16 inputs in the layout transformers hands sdpa ([batch, tokens, heads,
head_dim] memory viewed as [batch, heads, tokens, head_dim], GQA with half as many KV heads) and
the same forward output and logsumexp (torch's CPU flash-attention forward). Each shape is timed
several times, alternating the two kernels, and the median is reported, with the model TFLOPS of
the causal work (5 matmuls over the lower triangle) and the error of each against fp64.

**RMSNorm**, forward and backward in bf16: kubetune's C++ pass against fused_norm's tensor code
(the same autograd function with the kernel switched off), alternating, medians.

    PYTHONPATH=trainer-image python bench/cpu_kernels/run.py
    PYTHONPATH=trainer-image python bench/cpu_kernels/run.py --tokens 200 450 1000 --head-dims 32 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def _inputs(batch: int, tokens: int, heads: int, head_dim: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(tokens * 100 + head_dim)

    def make(h: int, scale: float) -> torch.Tensor:
        return (torch.randn(batch, tokens, h, head_dim, generator=g) * scale).bfloat16().transpose(1, 2)

    q, k, v, grad = make(heads, 1.5), make(heads // 2, 1.5), make(heads // 2, 1.0), make(heads, 1.0)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[:2]
    return {"q": q, "k": k, "v": v, "grad": grad, "out": out, "lse": lse, "scale": head_dim**-0.5}


def _error(grads: tuple[Any, ...], x: dict[str, Any]) -> float:
    """Largest relative error (norm) of dQ, dK, dV against fp64."""
    import torch.nn.functional as F

    q, k, v = (x[n].detach().double().requires_grad_() for n in "qkv")
    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(x["grad"].double())
    return max(
        ((g.double() - r.grad).norm() / r.grad.norm()).item() for g, r in zip(grads, (q, k, v), strict=True)
    )


def measure(batch: int, tokens: int, heads: int, head_dim: int, repeats: int) -> dict[str, Any]:
    import torch

    from kubetune_trainer.kernels import causal_attention_backward_op

    ours = causal_attention_backward_op()
    if ours is None:
        raise SystemExit("kubetune's kernel is not available on this machine (needs AVX-512 BF16 and AMX)")
    x = _inputs(batch, tokens, heads, head_dim)
    flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

    def torchs() -> tuple[Any, ...]:
        return tuple(
            flash_bwd(x["grad"], x["q"], x["k"], x["v"], x["out"], x["lse"], 0.0, True, scale=x["scale"])
        )

    def kubetunes() -> tuple[Any, ...]:
        return tuple(ours(x["grad"], x["q"], x["k"], x["v"], x["out"], x["lse"], x["scale"]))

    times: dict[str, list[float]] = {"torch": [], "kubetune": []}
    for fn in (torchs, kubetunes):
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in (("torch", torchs), ("kubetune", kubetunes)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    flops = 5 * 2 * (tokens * (tokens + 1) / 2) * head_dim * batch * heads
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "tokens": tokens,
        "heads": heads,
        "head_dim": head_dim,
        "torch_ms": med["torch"] * 1e3,
        "kubetune_ms": med["kubetune"] * 1e3,
        "ratio": med["kubetune"] / med["torch"],
        "kubetune_tflops": flops / med["kubetune"] / 1e12,
        "torch_error": _error(torchs(), x),
        "kubetune_error": _error(kubetunes(), x),
    }


def measure_norm(rows: int, hidden: int, repeats: int) -> dict[str, Any]:
    import torch

    from kubetune_trainer import fused_norm

    g = torch.Generator().manual_seed(hidden)
    weight = (torch.randn(hidden, generator=g) * 0.2 + 1).bfloat16()
    x = (torch.randn(rows, hidden, generator=g) * 3).bfloat16()
    grad = torch.randn(rows, hidden, generator=g).bfloat16()
    original = fused_norm._kernel_applies
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for i in range(repeats + 1):  # the first of each is a warm-up
            for kernel in (True, False) if i % 2 == 0 else (False, True):
                fused_norm._kernel_applies = lambda x, w, use=kernel: use  # type: ignore[assignment]
                xi = x.clone().requires_grad_()
                t0 = time.perf_counter()
                fused_norm.RMSNormFunction.apply(xi, weight, 1e-5).backward(grad)
                if i:
                    times[kernel].append(time.perf_counter() - t0)
    finally:
        fused_norm._kernel_applies = original
    ours, theirs = statistics.median(times[True]), statistics.median(times[False])
    return {
        "rows": rows,
        "hidden": hidden,
        "tensor_ms": theirs * 1e3,
        "kubetune_ms": ours * 1e3,
        "ratio": ours / theirs,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs="+", default=[100, 200, 450, 1000])
    ap.add_argument(
        "--head-dims", type=int, nargs="+", default=[32, 64], help="query heads: hidden 768 / head dim"
    )
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument(
        "--norm-hidden", type=int, nargs="+", default=[768, 2048], help="RMSNorm widths (4000 rows)"
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}", flush=True)
    print(f"{'tokens':>6} {'heads':>5} {'dim':>4} {'torch ms':>9} {'kubetune ms':>11} {'ratio':>6} "
          f"{'TFLOPS':>7} {'err torch':>9} {'err ours':>9}")  # fmt: skip
    rows = []
    for head_dim in args.head_dims:
        for tokens in args.tokens:
            r = measure(args.batch, tokens, 768 // head_dim, head_dim, args.repeats)
            rows.append(r)
            print(f"{r['tokens']:>6} {r['heads']:>5} {r['head_dim']:>4} {r['torch_ms']:>9.1f} {r['kubetune_ms']:>11.1f} "
                  f"{r['ratio']:>6.2f} {r['kubetune_tflops']:>7.3f} {r['torch_error']:>9.1e} {r['kubetune_error']:>9.1e}",
                  flush=True)  # fmt: skip
    print(
        f"\nRMSNorm forward + backward, bf16, 4000 rows\n{'hidden':>6} {'tensor ms':>9} {'kubetune ms':>11} {'ratio':>6}"
    )
    norms = []
    for hidden in args.norm_hidden:
        r = measure_norm(4000, hidden, args.repeats)
        norms.append(r)
        print(f"{hidden:>6} {r['tensor_ms']:>9.2f} {r['kubetune_ms']:>11.2f} {r['ratio']:>6.2f}", flush=True)
    if args.json:
        out = {"torch": torch.__version__, "rows": rows, "rms_norm": norms}
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
