"""vittt: Test-Time-Training vision backbones (ViT³, H-ViT³, Vision-TTT) for PyTorch, timm-native."""

from vittt import compat as _compat  # noqa: F401  (must run before torchvision/timm are imported)

__version__ = "0.1.0"

from . import models  # noqa: E402,F401  (registers the models in timm)
from .models import CheckpointError, create_dit  # noqa: E402
from .layers import fast_path, fast_path_settings, set_fast_path  # noqa: E402,F401  (switch execution paths)
from . import tasks  # noqa: E402,F401  (registers the tasks recipes name)
