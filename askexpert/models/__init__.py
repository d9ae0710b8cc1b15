"""The networks: askexpert's 32-px ViT variants in timm's registry (registry.py) and pretrained weights for any
timm model (pretrained.py). `import askexpert.models` registers the variants, so `timm.create_model(name)` knows
them; `create_network` builds any of them (or any timm model) the way every module and the cost model do."""

from askexpert.models.registry import ARCHITECTURES, create_network, model_names

__all__ = ["ARCHITECTURES", "create_network", "model_names"]
