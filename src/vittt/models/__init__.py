"""ViT³ / H-ViT³ / Vision-TTT backbones, registered in timm's registry on import; DiT³ / DiT generators
(:func:`create_dit`, not in timm's registry: they are not classifiers)."""
from .hvit3 import HViT3, HViT3Stage
from .official import CheckpointError, convert_official_file, convert_official_state_dict
from .vit3 import ViT3
from .vision_ttt import VisionTTT, VisionTTTBlock
from .dit3 import DiT3, create_dit
