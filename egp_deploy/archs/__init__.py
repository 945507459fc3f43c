"""Reference architectures behind a name registry (as timm's ``create_model``).

Module names follow torchvision where practical so its state_dicts load; every rectifier is its
own module (EGP measures each activation site separately).
"""

from egp_deploy.archs.registry import check_arch, create_model, list_archs, register_arch

# importing the modules fills the registry
from egp_deploy.archs import mobilenet_v2, resnet, swin, vgg, vit  # noqa: F401,E402

__all__ = ["check_arch", "create_model", "list_archs", "register_arch"]
