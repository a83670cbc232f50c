"""P4: one training step of the hand-written-convolution CNN (``hand_cnn``, im2col + matmul) against
its ``nn.Conv2d`` twin (``cnn``), same options, same batch of real images, same optimiser.

    .venv/bin/python -m benchmarks.training_step [--quick] [--image-size 64] [--batch-size 64]

The defaults are the lab's handwritten-conv study (64 px, batch 64, the nets' default options) and
the training recipe's loss and optimiser (``training.engine.make_optimizer``); the two steps take turns.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from training.config import ClassifyConfig
from training.data.vehicles import load_images, split_vehicles
from training.engine import make_optimizer
from training.nets import build_classifier

from .common import command_line, data_root, interleaved_medians, machine, save_result, utc_now

NETS = ("hand_cnn", "cnn")


def real_batch(size: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` training images spread over the classes (repeated when the sample has fewer)."""
    train = split_vehicles(data_root("vehicles")).train
    samples = (train[:: max(1, len(train) // size)] * size)[:size]
    images, labels = load_images(samples, (image_size, image_size))
    return torch.from_numpy(images), torch.from_numpy(labels)


def training_step(net: str, images: torch.Tensor, labels: torch.Tensor):
    torch.manual_seed(0)
    config = ClassifyConfig(net=net, image_size=images.shape[-1], batch_size=len(images))
    model = build_classifier(net, 3, (config.image_size, config.image_size), config.normalization).train()
    optimizer = make_optimizer(config, model)

    def step():
        loss = F.cross_entropy(model(images), labels, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def measure(quick: bool = False, image_size: int = 64, batch_size: int = 64) -> dict:
    images, labels = real_batch(batch_size, image_size)
    seconds = interleaved_medians({net: training_step(net, images, labels) for net in NETS},
                                  repeats=2 if quick else 20, warmup=2 if quick else 3)
    return {"image_size": image_size, "batch_size": batch_size, "torch_threads": torch.get_num_threads(),
            "step_ms": {net: round(value * 1000, 2) for net, value in seconds.items()},
            "hand_over_conv2d": round(seconds["hand_cnn"] / seconds["cnn"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 timed steps each")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    result = {"date": utc_now(), "command": command_line("benchmarks.training_step"), "machine": machine(),
              **measure(args.quick, args.image_size, args.batch_size)}
    print(f"training step, batch {args.batch_size} at {args.image_size} px: {result['step_ms']} ms; "
          f"hand_cnn / cnn = {result['hand_over_conv2d']}")
    print("saved", save_result("training_step", result, args.quick))


if __name__ == "__main__":
    main()
