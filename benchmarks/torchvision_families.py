"""Channel graph and a 2x-FLOPs structured prune on torchvision models of every family.

    python -m benchmarks.torchvision_families                      # the README's table (64x64)
    python -m benchmarks.torchvision_families swin_t:224 resnet18   # chosen models, name[:size]

Each model runs in its own process under an 8 GB address-space limit (a graph that explodes fails
there, not on the machine), with one thread. Per model it prints: CPU seconds to build the channel
graph without and with the dry run, peak resident memory, the dense-FLOPs ratio after one global
L1 prune to half the FLOPs (``StructuredPruning(OneShot(0.5), target="flops")``'s plan), how many
groups stay whole (``ChannelGraph.held`` gives each one's reason). (That the pruned network computes
what the masked original computes is tested on tiny networks of each family, tests/test_grouped_convs.py
and tests/test_model_families.py.)
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
import warnings

MODELS = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "resnext50_32x4d", "regnet_x_400mf", "densenet121",
          "shufflenet_v2_x0_5", "convnext_tiny", "efficientnet_b0", "vit_b_16", "swin_t", "swin_t:224"]
MEMORY_LIMIT = 8 * 2**30


def build(name: str, size: int):
    import torchvision

    if name == "vit_b_16":  # torchvision's builder fixes 224x224
        from torchvision.models.vision_transformer import VisionTransformer

        return VisionTransformer(image_size=size, patch_size=16, num_layers=12, num_heads=12, hidden_dim=768,
                                 mlp_dim=3072, num_classes=10)
    return torchvision.models.get_model(name, weights=None, num_classes=10)


def measure(name: str, size: int) -> str:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    import torch

    from growprune import GrowPruneModule
    from growprune.metrics import dense_flops
    from growprune.schedules import OneShot
    from growprune.strategies import StructuredPruning
    from growprune.surgery.channels import ChannelGraph

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = build(name, size).eval()
    shape = (3, size, size)
    example = torch.zeros(1, *shape)
    start = time.process_time()
    ChannelGraph(model, example, check=False).groups()
    graph_seconds = time.process_time() - start
    start = time.process_time()
    ChannelGraph(model, example)
    checked_seconds = time.process_time() - start
    pl_module = GrowPruneModule(model, num_classes=10, input_shape=shape)
    dense = dense_flops(model, shape)
    strategy = StructuredPruning(OneShot(amount=0.5), target="flops")
    try:
        strategy.check(None, pl_module)
        groups = strategy.graph.groups()
        scores = {group.root: strategy.criterion.score(strategy.graph, group) for group in groups}
        plan = strategy.plan(pl_module, groups, scores, 0.5)
        strategy.graph.remove(plan)
        ratio = f"{dense / dense_flops(model, shape):.3f}x"
        held = str(len(strategy.graph.held))
    except ValueError as error:
        ratio, held = f"refused: {str(error)[:120]}", "-"
    memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    return (f"| {name} {size}x{size} | {graph_seconds:.2f} / {checked_seconds:.2f} s | {memory} MB | {ratio} | "
            f"{held} |")


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--one":
        print(measure(argv[1], int(argv[2])), flush=True)
        return
    print("| model | graph / with dry run (CPU) | peak RSS | dense FLOPs after a 0.5 prune | groups held whole |")
    print("| --- | --- | --- | --- | --- |")
    for entry in argv or MODELS:
        name, _, size = entry.partition(":")
        result = subprocess.run([sys.executable, "-m", "benchmarks.torchvision_families", "--one", name, size or "64"],
                                capture_output=True, text=True)
        line = result.stdout.strip().splitlines()[-1:] or [f"| {name} | failed: {result.stderr.strip().splitlines()[-1:]} |"]
        print(line[0], flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
