"""Cache the ImageNet weights params.yaml asks for, at image build time.

Run from the project root inside the image build; the files land in torchvision's
cache ($TORCH_HOME/hub/checkpoints), where dfcvae.weights looks first, so Ray pods
never download weights at run time.
"""

from dfcvae.config import Config
from dfcvae.weights import load_imagenet_state_dict


def main() -> None:
    cfg = Config.load()
    wanted = {
        (cfg.perceptual.backbone, cfg.perceptual.weights),
        (cfg.eval.reference_backbone, cfg.eval.reference_weights),
    }
    for backbone in sorted(name for name, weights in wanted if weights == "imagenet"):
        load_imagenet_state_dict(backbone)
        print(f"ImageNet weights for {backbone} cached")


if __name__ == "__main__":
    main()
