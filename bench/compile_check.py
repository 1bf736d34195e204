"""Can torch.compile take the isometry term's launches away? What dynamo does with it, on this torch.

On a GPU the isometry step is launch-bound (docs/benchmarks.md, "Where the isometry step's time goes"), so the lever
would be one compiled graph (or a CUDA graph) for the term. This runs `core.geometry.isometry_terms` on a small
diffusers UNet (through `hspace.encoder_at`, as training does) three ways: eager; with the encoder compiled and the
JVP/VJP called from eager (how one would drop it into training); and with the whole term (JVP, VJP with
create_graph, and the parameter gradient) inside one compiled function. For each it prints whether the values and
parameter gradients equal eager's, and dynamo's own counters: frames compiled of frames seen, graph breaks and
what it could not trace. A lever exists only where the term compiles into few graphs with no break.

    python -m bench.compile_check                 # CPU, aot_eager (no C++ compiler needed): about a minute
    python -m bench.compile_check --backend inductor --device cuda
"""

from __future__ import annotations

import argparse
import sys

import torch
from diffusers import UNet2DModel

from isosweep.core.geometry import isometry_terms
from isosweep.core.hspace import encoder_at


def small_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="aot_eager", help="torch.compile backend (inductor needs a C++ compiler on the CPU)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    unet = small_unet().to(args.device)
    params = [p for p in unet.parameters()]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=gen).to(args.device)
    probes = torch.randn(2, 3, 16, 16, generator=gen).to(args.device)
    t = torch.tensor([700, 700], device=args.device)

    def term(encoder) -> list[torch.Tensor]:
        tr_r, tr_r2 = isometry_terms(encoder, x, probes=probes)
        loss = tr_r2.mean() / tr_r.mean() ** 2
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return [loss.detach()] + [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]

    eager = term(encoder_at(unet, t))
    ways = {
        "encoder compiled, JVP/VJP from eager": lambda: term(torch.compile(encoder_at(unet, t), backend=args.backend)),
        "whole term in one compiled function": lambda: torch.compile(lambda: term(encoder_at(unet, t)), backend=args.backend)(),
    }
    print(f"# torch {torch.__version__}, backend {args.backend}, device {args.device}; a 2-level UNet2DModel with attention, "
          f"16 px, batch 2")
    print()
    print("| how | same values and gradients as eager | frames compiled / seen | graph breaks | what dynamo could not trace |")
    print("|---|---|---|---|---|")
    for name, way in ways.items():
        dynamo.reset()
        counters.clear()
        try:
            out = way()
            same = all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(out, eager))
        except Exception as e:  # noqa: BLE001  (a failure is a result here: print it)
            same = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        frames = counters["frames"]
        unsupported = sorted({reason.splitlines()[0][:90] for reason in counters["unimplemented"]})
        print(f"| {name} | {same} | {frames.get('ok', 0)} / {frames.get('total', 0)} | {sum(counters['graph_break'].values())} | "
              f"{'; '.join(unsupported) or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
